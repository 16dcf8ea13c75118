"""The operator's page in a real browser (Debian's chromium through Playwright).

Figures:
- render: a fresh page load until the table shows every active alarm (snapshot over
  server-sent events, parse, sort, first render), 10,000 active alarms against the
  same for 1,000 (the baseline), median of REPEAT loads each;
- update latency: an active-alarms record produced -> its row changed in the page's DOM,
  with 10,000 alarms on the page, against a bare aiokafka consumer reading the same records.

The active-alarms records are produced directly (the engine is not what is measured here).
`python -m bench.web --screenshot docs/screenshot.png` instead runs a worker on a small
realistic set of alarms and saves the README's screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from bench import common

REPEAT = 3
UPDATES = 30
LOCATIONS = ["Injector/Gun", "Injector/Buncher", "Linac/Sector 1", "Linac/Sector 2", "Linac/Sector 3",
             "Ring/Arc A", "Ring/Arc B", "Hall A", "Hall B", "Cryo plant"]
CATEGORIES = {"Cooling": "TEMP", "Vacuum": "GAUGE", "RF": "FWD", "Magnets": "CURR", "Cryo": "LEVEL"}
PRIORITIES = ["P1_LIFE"] + ["P2_PROPERTY"] * 3 + ["P3_PRODUCTIVITY"] * 10 + ["P4_DIAGNOSTIC"] * 4
SEVERITIES = ["MAJOR", "MAJOR", "MINOR", "MINOR", "MINOR", "INVALID"]


def _run(coro):
    """common.run in a thread of its own: Playwright's sync API keeps an event loop in this one."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(common.run, coro).result()


def _definition(i: int, rnd: random.Random) -> dict:
    cat = rnd.choice(list(CATEGORIES))
    return {"producer": {"source": "bench"}, "location": rnd.choice(LOCATIONS), "category": cat,
            "priority": rnd.choice(PRIORITIES), "description": f"{cat} out of range", "docUrl": "", "edmPath": ""}


def _shown(i: int, rnd: random.Random, defn: dict, message: str | None = None) -> dict:
    sev = rnd.choice(SEVERITIES)
    return {"priority": defn["priority"], "state": "ACTIVE", "severity": sev, "cause": "EXTERNAL",
            "message": message or f"B{i:05d}:{CATEGORIES[defn['category']]} {sev}",
            "since": int(time.time() * 1000) - rnd.randint(0, 3_600_000), "shelving": None}


async def _write_alarms(s, codec, start: int, n: int, rnd: random.Random, defs: dict) -> None:
    recs_def, recs_act = [], []
    for i in range(start, start + n):
        name = f"bench alarm {i:05d}"
        defs[name] = _definition(i, rnd)
        recs_def.append((name.encode(), codec.encode("alarms", defs[name])))
        recs_act.append((name.encode(), codec.encode("active-alarms", _shown(i, rnd, defs[name]))))
    await common.produce(s, s.topic("alarms"), recs_def)
    await common.produce(s, s.topic("active-alarms"), recs_act)


def _wait_total(web, n: int, timeout: float = 120.0) -> None:
    def ready():
        status, body = web.request("GET", "/api/v1/status")
        return status == 200 and body["caughtUp"] and body["lag"] == 0 and \
            web.request("GET", "/api/v1/alarms")[1]["total"] == n
    common.wait_until(ready, timeout, f"the web server to show {n} alarms", interval=0.5)


def _load(browser, url: str, n: int) -> dict:
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    try:
        page.goto(url)
        page.wait_for_function(f"window.__page.firstFullRender !== null && window.__page.firstFullRender.rows === {n}",
                               timeout=120_000)
        r = page.evaluate("({...window.__page.firstFullRender, snapshotMs: window.__page.snapshotMs})")
        return {"load_ms": r["atMs"], "render_ms": r["renderMs"], "snapshot_ms": r["snapshotMs"]}
    finally:
        page.close()


class BareFollower:
    """A plain consumer following active-alarms: when each key's latest record arrived."""

    def __init__(self, s):
        self.s = s
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self._stop = False
        threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True).start()

    async def _run(self):
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(**self.s.kafka_kwargs(), group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=100)
        await c.start()
        try:
            topic = self.s.topic("active-alarms")
            if not c.partitions_for_topic(topic):
                await c._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
            c.assign(tps)
            await c.seek_to_end(*tps)
            for tp in tps:
                await c.position(tp)
            self.ready.set()
            while not self._stop:
                for _, msgs in (await c.getmany(timeout_ms=100)).items():
                    now = time.time() * 1000
                    for m in msgs:
                        self.seen[m.key.decode()] = now
        finally:
            await c.stop()

    def close(self):
        self._stop = True


def _updates(browser, url: str, s, codec, defs: dict, n_updates: int) -> tuple[list[float], list[float]]:
    rnd = random.Random(7)
    follower = BareFollower(s)
    follower.ready.wait(30)
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    page_lat, bare_lat, parts = [], [], []
    try:
        page.goto(url)
        page.wait_for_function(f"window.__page.firstFullRender !== null && window.__page.firstFullRender.rows === {len(defs)}",
                               timeout=120_000)
        names = sorted(defs)
        for k in range(n_updates):
            name = rnd.choice(names)
            datum = _shown(k, rnd, defs[name], message=f"update {k}")
            value = codec.encode("active-alarms", datum)
            t0 = time.time() * 1000
            _run(common.produce(s, s.topic("active-alarms"), [(name.encode(), value)]))
            page.wait_for_function(f"(window.__page.seen[{name!r}] || 0) >= {t0}", timeout=30_000)
            seen = page.evaluate(f"window.__page.seen[{name!r}]")
            sent, received = page.evaluate(f"[window.__page.sent[{name!r}], window.__page.received[{name!r}]]")
            parts.append((sent - t0, received - t0, seen - t0))
            common.wait_until(lambda: follower.seen.get(name, 0) >= t0, 30, "the bare consumer")
            page_lat.append(seen - t0)
            bare_lat.append(follower.seen[name] - t0)
            time.sleep(0.2)
    finally:
        page.close()
        follower.close()
    print("update: (server sent, page received, row rendered) ms after the produce:",
          [tuple(round(x) for x in p) for p in parts], flush=True)
    return page_lat, bare_lat


def run(quick: bool = False) -> dict:
    from playwright.sync_api import sync_playwright

    from alarm_engine.history import ensure_topic
    from alarm_engine.registry import make_codec
    from alarm_engine.topics import ensure_topics
    from tests.integration.browser import WebServer, launch

    small, big = (100, 1000) if quick else (1000, 10000)
    s = common.settings_for("web")
    common.run(ensure_topics(s))
    common.run(ensure_topic(s))
    codec = make_codec(s)
    rnd = random.Random(1)
    defs: dict = {}
    tmp = common.WORK / f"{s.topic_prefix}web"
    tmp.mkdir(parents=True, exist_ok=True)
    web = WebServer(s, tmp)
    try:
        web.start()
        with sync_playwright() as p:
            browser = launch(p)
            loads = {}
            _run(_write_alarms(s, codec, 0, small, rnd, defs))
            _wait_total(web, small)
            loads[small] = [_load(browser, web.url + "/", small) for _ in range(REPEAT)]
            _run(_write_alarms(s, codec, small, big - small, rnd, defs))
            _wait_total(web, big)
            loads[big] = [_load(browser, web.url + "/", big) for _ in range(REPEAT)]
            page_lat, bare_lat = _updates(browser, web.url + "/", s, codec, defs, 10 if quick else UPDATES)
            browser.close()
    finally:
        web.stop()
    med = {n: statistics.median(x["load_ms"] for x in v) for n, v in loads.items()}
    med_render = {n: statistics.median(x["render_ms"] for x in v) for n, v in loads.items()}
    result = {
        "name": "web", "value": round(med[big]), "unit": f"ms(load+render {big})",
        "baseline": round(med[small]), "ratio": round(med[big] / med[small], 2),
        "target": f"{big} alarms rendered in < 2 s of browser time; page update < 1 s",
        "met": med[big] < 2000 and common.percentile(page_lat, 95) < 1000,
        "extra": {
            "loads_ms": {str(n): [round(x["load_ms"]) for x in v] for n, v in loads.items()},
            "first_render_frame_ms": {str(n): round(v, 1) for n, v in med_render.items()},
            "update_latency_ms": {"median": round(statistics.median(page_lat), 1),
                                  "p95": round(common.percentile(page_lat, 95), 1),
                                  "max": round(max(page_lat), 1), "n": len(page_lat),
                                  "alarms_on_page": big},
            "bare_consumer_latency_ms": {"median": round(statistics.median(bare_lat), 1),
                                         "p95": round(common.percentile(bare_lat, 95), 1)},
        },
    }
    print(f"web: load+render {small}: {med[small]:.0f} ms, {big}: {med[big]:.0f} ms "
          f"(render frame {med_render[small]:.1f} / {med_render[big]:.1f} ms); update latency median "
          f"{statistics.median(page_lat):.0f} ms p95 {common.percentile(page_lat, 95):.0f} ms "
          f"(bare consumer median {statistics.median(bare_lat):.0f} ms)", flush=True)
    return result


# --- the README's screenshot ----------------------------------------------------------------

def screenshot(path: str) -> None:
    """A worker, about 30 alarms from PV states written to pv-state, a shelving, the page."""
    import json

    from playwright.sync_api import sync_playwright

    from alarm_engine import cli
    from alarm_engine.topics import ensure_topics
    from tests.integration.browser import WebServer, launch

    s = common.settings_for("shot")
    common.run(ensure_topics(s))
    rnd = random.Random(4)
    defs, states = [], []
    for i in range(30):
        loc, cat = rnd.choice(LOCATIONS), rnd.choice(list(CATEGORIES))
        pv = f"{loc.split('/')[0][:4].upper()}{i:02d}:{CATEGORIES[cat]}"
        name = f"{loc.split('/')[-1]} {cat.lower()} {i:02d}"
        defs.append((name, {"producer": {"pv": pv}, "location": loc, "category": cat, "priority": rnd.choice(PRIORITIES),
                            "description": f"{cat} reading out of range: check {pv}", "docUrl": "",
                            "edmPath": f"screens/{cat.lower()}.edl"}))
        sev = rnd.choice(SEVERITIES)
        connected = sev != "INVALID"
        ts = int(time.time() * 1000)
        states.append((pv.encode(), json.dumps({
            "connection": "CONNECTED" if connected else "DISCONNECTED",
            "value": round(rnd.uniform(80, 120), 2) if connected else None, "severity": sev,
            "status": {"MAJOR": "HIHI", "MINOR": "HIGH", "INVALID": "DISCONNECTED"}[sev],
            "iocTimestamp": ts, "receivedAt": ts}).encode()))
    common.run(common.produce(s, s.topic("alarms"), [(n.encode(), json.dumps(d).encode()) for n, d in defs]))
    w = common.worker(s, "w1", common.data_dir(s, "w1"), common.free_port()).start()
    tmp = common.WORK / f"{s.topic_prefix}web"
    tmp.mkdir(parents=True, exist_ok=True)
    web = WebServer(s, tmp, users={"op": "demo"})
    try:
        common.wait_until(lambda: w.check() or any("Ready" in ln for ln in w.lines), 90, "the worker")
        # In three waves, so that the alarm-rate KPIs have something to show.
        for k in range(3):
            common.run(common.produce(s, s.topic("pv-state"), states[k * 10:(k + 1) * 10]))
            time.sleep(1.5)
        def run_cli(*args):
            assert cli.main(["--topic-prefix", s.topic_prefix, *args]) == 0, args

        # The facility's tree (alarm-locations): areas above their sections.
        for loc in LOCATIONS:
            if "/" in loc:
                top = loc.split("/")[0]
                run_cli("set-location", top)
                run_cli("set-location", loc, "--parent", top)
        run_cli("set-shelved", defs[3][0], "--user", "alice", "--reason", "Maintenance", "--duration", "2h")
        time.sleep(2)  # the last wave shown before the acknowledgements
        # A few acknowledged by the operator: drawn dimmed, below the unacknowledged ones.
        run_cli("ack", *(d[0] for d in defs[4:30:4]), "--user", "alice")
        web.start()
        time.sleep(6)  # one KPI refresh
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1920, "height": 1080})
            page.goto(web.url + "/")
            page.wait_for_function("window.__page.firstFullRender !== null")
            page.click("tr.alarm >> nth=2")
            page.wait_for_selector("#d-history li")
            time.sleep(1)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=path)
            browser.close()
        print(f"screenshot: {path}")
    finally:
        web.stop()
        w.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.web")
    ap.add_argument("--screenshot", metavar="PNG", help="save the README's screenshot instead of measuring")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    if args.screenshot:
        screenshot(args.screenshot)
        return 0
    r = run(args.quick)
    print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
