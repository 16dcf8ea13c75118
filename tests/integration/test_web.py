"""The operator's page as a person uses it: real stack, engine worker, softioc IOC,
`alarm-engine web`, and Debian's chromium driven by Playwright."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from tests.integration.ioc import caput
from tests.integration.browser import WebServer, launch
from tests.integration.engine import FAST_FAILOVER, ActiveView, SupervisedWorker, Worker

from alarm_engine import cli, history
from alarm_engine import stack

pytestmark = pytest.mark.integration

NORMAL, MAJOR = 10, 95
PASSWORD = "s3cret-pw"


def _in_thread(fn, *args):
    """Runs fn in a thread of its own: Playwright's sync API keeps an event loop in this one."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result()


@pytest.fixture
def rig(settings, tmp_path, running_ioc):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    settings = dataclasses.replace(settings, connect_grace_s=2.0)
    view = ActiveView(settings)
    workers, servers = [], []

    class Rig:
        s = settings
        ioc = running_ioc
        tmp = tmp_path

        def cli(self, *args):
            assert _in_thread(cli.main, ["--topic-prefix", settings.topic_prefix, *args]) == 0, args

        def worker(self, supervised=False):
            kind = SupervisedWorker if supervised else Worker
            w = kind(settings, tmp_path / "w1", "w1", extra_env=FAST_FAILOVER if supervised else None).start()
            workers.append(w)
            view.workers.append(w)
            return w

        def web(self, **kw):
            w = WebServer(settings, tmp_path, users={"op": PASSWORD}, **kw).start()
            servers.append(w)
            return w

    r = Rig()
    r.view = view
    with sync_playwright() as p:
        r.browser = launch(p)
        try:
            yield r
        finally:
            r.browser.close()
            view.close()
            for s in servers:
                s.stop()
            for w in workers:
                w.kill()


def _open(rig, web):
    page = rig.browser.new_page(viewport={"width": 1920, "height": 1080})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(web.url + "/")
    page.wait_for_function("window.__page.firstFullRender !== null", timeout=30_000)
    return page, errors


def _row(name):
    return f'tr.alarm[data-name="{name}"]'


def test_page_shows_filters_shelves_and_clears(rig, capsys):
    pv = rig.ioc.pv("PV20")
    caput(pv, NORMAL)
    rig.cli("set-monitored", pv)
    rig.cli("set-alarm", "web pv", "--pv", pv, "--location", "Hall W/Bay 1", "--category", "Cooling",
            "--priority", "P2_PROPERTY", "--description", "Close the valve",
            "--rationale", "Protects the magnet coils", "--display", "Cooling overview=https://ops.example/cooling")
    rig.cli("set-alarm", "web ext", "--external", "--location", "Hall W/Bay 2", "--category", "Safety")
    rig.worker()
    web = rig.web()
    page, errors = _open(rig, web)
    rig.cli("set-active", "web ext", "--note", "door open")
    page.wait_for_selector(_row("web ext"), timeout=30_000)

    # The caput that raises the alarm, and the moment the page shows it.
    t0 = time.time()
    caput(pv, MAJOR)
    page.wait_for_selector(_row("web pv"), timeout=30_000)
    shown_ms = page.evaluate("window.__page.seen['web pv']")
    with capsys.disabled():
        print(f"\ncaput -> row on the page: {shown_ms - t0 * 1000:.0f} ms")
    row = page.locator(_row("web pv"))
    assert "MAJOR" in row.inner_text() and "Hall W/Bay 1" in row.inner_text()
    # Sorted by priority: the P2 alarm above the P3 one.
    names = page.eval_on_selector_all("tr.alarm", "rows => rows.map(r => r.dataset.name)")
    assert names.index("web pv") < names.index("web ext")

    # Filters: by location (select and tree), by priority, with counts.
    page.select_option("#f-location", "Hall W/Bay 2")
    page.wait_for_selector(_row("web pv"), state="detached")
    assert page.locator("tr.alarm").count() == 1
    assert "(1)" in page.inner_text("#f-location")
    page.click("#f-clear")
    page.wait_for_selector(_row("web pv"))
    page.click('#tree .node[data-path="Hall W/Bay 1"]')
    page.wait_for_selector(_row("web ext"), state="detached")
    page.click("#f-clear")
    # The tree is alarm-locations: Bay 1 under Hall W; Bay 2, with no record, a top of its own.
    rig.cli("set-location", "Hall W")
    rig.cli("set-location", "Hall W/Bay 1", "--parent", "Hall W")
    page.wait_for_selector('#tree .node[data-path="Hall W"] + ul .node[data-path="Hall W/Bay 1"]')
    assert page.inner_text('#tree .node[data-path="Hall W/Bay 1"] span') == "Bay 1"
    page.click('#tree .node[data-path="Hall W"]')
    page.wait_for_selector(_row("web ext"), state="detached")
    assert page.locator(_row("web pv")).count() == 1
    status, body = web.request("GET", "/api/v1/alarms?location=Hall%20W")
    assert status == 200 and [a["name"] for a in body["alarms"]] == ["web pv"]
    page.click("#f-clear")
    page.select_option("#f-priority", "P3_PRODUCTIVITY")
    page.wait_for_selector(_row("web pv"), state="detached")
    assert page.locator("tr.alarm").count() == 1
    page.click("#f-clear")

    # Shelving without credentials is refused, on the page and through the API.
    page.click(_row("web pv"))
    page.wait_for_selector("#d-def dd:has-text('Close the valve')")
    assert "Protects the magnet coils" in page.inner_text("#d-def")
    assert page.get_attribute("#d-def a:has-text('Cooling overview')", "href") == "https://ops.example/cooling"
    page.click("#shelve-btn")
    page.wait_for_selector("#act-result.err")
    assert "401" in page.inner_text("#act-result")
    page.fill("#act-user", "op")
    page.fill("#act-password", "wrong")
    page.click("#shelve-btn")
    page.wait_for_function("document.querySelector('#act-result').textContent.includes('refused (401)')")
    status, body = web.request("POST", "/api/v1/alarms/web%20pv/shelve", {"duration": "1h"})
    assert status == 401 and body["field"] == "Authorization"

    # With the password: acknowledged from the page (the row loses its UNACK mark), then shelved.
    page.fill("#act-password", PASSWORD)
    assert "UNACK" in page.inner_text(_row("web pv"))
    page.click("#ack-btn")
    page.wait_for_function("document.querySelector('#act-result').textContent.includes('acknowledged by op')")
    rig.view.wait_for(lambda st: st.get("web pv", {}).get("ackState") == "ACK", what="acknowledged by the page")
    page.wait_for_selector(f'{_row("web pv")}:not(.unack)', timeout=30_000)
    page.select_option("#act-duration", "1h")
    page.select_option("#act-reason", "Maintenance")
    page.click("#shelve-btn")
    page.wait_for_selector("#act-result.ok")
    rig.view.wait_for(lambda st: st.get("web pv", {}).get("state") == "SHELVED", what="shelved by the page")
    page.wait_for_selector(f'{_row("web pv")}.state-SHELVED', timeout=30_000)
    assert "op" in page.inner_text(_row("web pv"))
    capsys.readouterr()
    rig.cli("list-active", "--json")
    shown = json.loads(capsys.readouterr().out)
    assert shown["web pv"]["state"] == "SHELVED" and shown["web pv"]["shelving"]["user"] == "op"
    assert shown["web ext"]["state"] == "ACTIVE"  # the refused attempts left it alone
    rig.cli("list-shelved")
    out = capsys.readouterr().out
    assert "web pv" in out and "op" in out and "Maintenance" in out

    # The alarm's history on the page and in the CLI: the shelving, by whom, from where.
    page.wait_for_selector("#d-history li:has-text('shelve: Maintenance')", timeout=30_000)
    deadline = time.monotonic() + 30
    while True:
        rig.cli("history", "web pv", "--since", "10m", "--json")
        entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        shelves = [e for e in entries if e["kind"] == "shelve"]
        if shelves or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shelves and shelves[0]["user"] == "op" and shelves[0]["host"] == "127.0.0.1"
    assert any(e["kind"] == "shown" and e["severity"] == "MAJOR" for e in entries)
    assert all(e["location"] == "Hall W/Bay 1" for e in entries)
    # KPIs from the same history: Bay 1's activation counts in Hall W above it.
    rig.cli("kpi", "--since", "10m", "--json")
    k = json.loads(capsys.readouterr().out)
    assert k["locations"]["Hall W/Bay 1"]["activations"] >= 1
    assert k["locations"]["Hall W"]["activations"] == k["locations"]["Hall W/Bay 1"]["activations"]
    assert k["locations"]["Hall W"]["top"][0]["alarm"] == "web pv"

    # Cleared: the row goes away.
    caput(pv, NORMAL)
    page.wait_for_selector(_row("web pv"), state="detached", timeout=30_000)
    page.screenshot(path=str(rig.tmp / "page.png"))
    assert "ENGINE DOWN" not in page.inner_text("#banner")
    assert not errors, errors


def test_api_errors(rig):
    rig.cli("set-alarm", "api ext", "--external", "--location", "L", "--category", "C")
    rig.worker()
    web = rig.web()
    rig.cli("set-active", "api ext")
    rig.view.wait_for(lambda st: "api ext" in st)
    deadline = time.monotonic() + 30
    while web.request("GET", "/api/v1/alarms")[1]["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    status, body = web.request("GET", "/api/v1/alarms?state=ACTIVE")
    assert status == 200 and [a["name"] for a in body["alarms"]] == ["api ext"]
    assert body["counts"]["location"] == {"L": 1}
    auth = {"user": "op", "password": PASSWORD}
    cases = [
        ("GET", "/api/v1/alarms?colour=red", None, {}, 400, "colour"),
        ("GET", "/api/v1/alarms/no%20such", None, {}, 404, "name"),
        ("POST", "/api/v1/alarms/no%20such/shelve", {}, auth, 404, "name"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {"duration": "soon"}, auth, 400, "duration"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {"duraton": "1h"}, auth, 400, "duraton"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {"oneshot": "yes"}, auth, 400, "oneshot"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {"expiration": "2001-01-01T00:00Z"}, auth, 400, "expiration"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {"duration": "1h", "expiration": 1}, auth, 400, "expiration"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", b"{not json", auth, 400, "body"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", [1, 2], auth, 400, "body"),
        ("POST", "/api/v1/alarms/api%20ext/shelve", {}, {"user": "op", "password": "nope"}, 401, "Authorization"),
        ("POST", "/api/v1/alarms/api%20ext/ack", {"comment": 3}, auth, 400, "body"),
        ("POST", "/api/v1/alarms/no%20such/ack", {}, auth, 404, "name"),
        ("POST", "/api/v1/alarms/api%20ext/ack", {}, {}, 401, "Authorization"),
        ("GET", "/api/v1/history?since=forever", None, {}, 400, "since"),
        ("GET", "/api/v1/nothing", None, {}, 404, "path"),
    ]
    # A cross-site form post (not JSON), and a foreign origin, even with credentials.
    status, body = web.request("POST", "/api/v1/alarms/api%20ext/unshelve", b"a=b", **auth,
                               content_type="application/x-www-form-urlencoded")
    assert (status, body["field"]) == (415, "Content-Type")
    status, body = web.request("POST", "/api/v1/alarms/api%20ext/unshelve", None, **auth,
                               headers={"Origin": "http://evil.example"})
    assert (status, body["field"]) == (403, "Origin")
    for method, path, payload, who, code, field in cases:
        status, body = web.request(method, path, payload, **who)
        assert (status, body.get("field")) == (code, field), (method, path, payload, body)
        assert body["error"]
    status, spec = web.request("GET", "/api/v1/openapi.json")
    assert status == 200 and "/api/v1/alarms/{name}/shelve" in spec["paths"]
    # Acknowledge and withdraw it through the API: the operator and comment on active-alarms.
    rig.view.wait_for(lambda st: st.get("api ext", {}).get("ackState") == "UNACK")
    assert web.request("POST", "/api/v1/alarms/api%20ext/ack", {"comment": "on it"}, **auth)[0] == 202
    rig.view.wait_for(lambda st: st.get("api ext", {}).get("ackState") == "ACK")
    assert rig.view.state["api ext"]["ack"]["user"] == "op" and rig.view.state["api ext"]["ack"]["comment"] == "on it"
    assert web.request("POST", "/api/v1/alarms/api%20ext/unack", None, **auth)[0] == 202
    rig.view.wait_for(lambda st: st.get("api ext", {}).get("ackState") == "UNACK")
    # Unshelve through the API: a tombstone, and the user in alarm-history.
    assert web.request("POST", "/api/v1/alarms/api%20ext/shelve", {"oneshot": True}, **auth)[0] == 202
    rig.view.wait_for(lambda st: st.get("api ext", {}).get("state") == "SHELVED")
    assert web.request("POST", "/api/v1/alarms/api%20ext/unshelve", None, **auth)[0] == 202
    rig.view.wait_for(lambda st: st.get("api ext", {}).get("state") == "ACTIVE")
    deadline = time.monotonic() + 30
    while True:
        entries = history.select(_in_thread(history.run_read, rig.s, 0), name="api ext")
        kinds = [e["kind"] for e in entries]
        if "unshelve" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    unshelve = [e for e in entries if e["kind"] == "unshelve"]
    assert unshelve and unshelve[0]["user"] == "op", kinds


def test_reads_need_a_login_unless_anonymous(rig):
    rig.cli("set-alarm", "priv", "--external", "--location", "L", "--category", "C")
    web = rig.web(anonymous_read=False)
    assert web.request("GET", "/api/v1/alarms")[0] == 401
    assert web.request("GET", "/api/v1/alarms", user="op", password=PASSWORD)[0] == 200
    # No worker runs for these topics: the status says the engine is down.
    deadline = time.monotonic() + 30
    while True:
        st = web.request("GET", "/api/v1/status", user="op", password=PASSWORD)[1]
        if st["engineWorkers"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["engineWorkers"] == 0 and st["stale"]
    assert any("no engine worker" in r for r in st["reasons"]), st


def test_kafka_down_page_says_stale_keeps_state_and_recovers(rig):
    kafka = stack.service("kafka")
    if stack.bootstrap_servers() != rig.s.bootstrap or kafka.pid() is None:
        pytest.skip("the stack's Kafka is not controllable from here (ports as for make test)")
    rig.cli("set-alarm", "kept", "--external", "--location", "L", "--category", "C")
    rig.cli("set-alarm", "after", "--external", "--location", "L", "--category", "C")
    rig.worker(supervised=True)
    web = rig.web()
    page, errors = _open(rig, web)
    rig.cli("set-active", "kept")
    page.wait_for_selector(_row("kept"), timeout=30_000)
    try:
        kafka.stop()
        page.wait_for_function("document.querySelector('#banner').textContent.includes('ENGINE DOWN OR DATA STALE')",
                               timeout=60_000)
        assert "Kafka unreachable" in page.inner_text("#banner")
        # The last known state stays, on the page and in the API.
        assert page.locator(_row("kept")).count() == 1
        status, body = web.request("GET", "/api/v1/alarms")
        assert status == 200 and body["status"]["stale"] and [a["name"] for a in body["alarms"]] == ["kept"]
        status, body = web.request("POST", "/api/v1/alarms/kept/shelve", {}, user="op", password=PASSWORD)
        assert status == 503 and "Kafka" in body["error"]
    finally:
        stack.start_service("kafka")
    page.wait_for_function("document.querySelector('#banner').className === 'live'", timeout=120_000)
    rig.cli("set-active", "after")
    page.wait_for_selector(_row("after"), timeout=120_000)
    assert not errors, errors
