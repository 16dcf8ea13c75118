"""`alarm-engine web`: the operator's page and the JSON API (/api/v1), on aiohttp.

The page is plain HTML, CSS and JavaScript from this package (no CDN, no build
step). It gets a snapshot and then the changes pushed as server-sent events
(/api/v1/events). Reads may be anonymous (configured); shelve and unshelve
need an authenticated user (alarm_engine/web/auth.py), whose name and host go
with the record (Kafka headers `user` and `host`) into alarm-history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

from aiohttp import web

from alarm_engine import history, kpi
from alarm_engine.config import Settings
from alarm_engine.web.auth import Auth
from alarm_engine.web.model import Feed, LiveState

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
SEND_TIMEOUT_S = 10.0
KPI_EVERY_S = 5.0
SHELVE_FIELDS = {"duration", "expiration", "oneshot", "reason", "comment"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, separators=(",", ":")))


class Client:
    """One page's event stream: what changed since the last message (coalesced)."""

    def __init__(self):
        self.rows: set[str] = set()
        self.history: set[str] = set()
        self.flags: set[str] = set()
        self.wake = asyncio.Event()

    def mark(self, kind: str, name: str | None) -> None:
        if kind == "row":
            self.rows.add(name)
        elif kind == "history":
            self.history.add(name)
        else:
            self.flags.add(kind)
        self.wake.set()


class WebApp:
    def __init__(self, settings: Settings, auth: Auth, cfg: kpi.KpiConfig = kpi.KpiConfig(),
                 history_window_ms: int = 86_400_000):
        self.settings = settings
        self.auth = auth
        self.cfg = cfg
        self.state = LiveState(history_window_ms=history_window_ms)
        self.feed = Feed(settings, self.state, history_since_ms=int(time.time() * 1000) - history_window_ms)
        self.feed.listeners.append(self._changed)
        self.clients: set[Client] = set()
        self.kpi_now: dict = {}
        self._producer = None
        self._codec = None
        self._tasks: list[asyncio.Task] = []

    def _changed(self, kind: str, name: str | None) -> None:
        for c in self.clients:
            c.mark(kind, name)

    # --- life cycle ---------------------------------------------------------
    async def start(self, app: web.Application) -> None:
        self._tasks = [asyncio.create_task(self.feed.run()), asyncio.create_task(self._kpi_loop())]

    async def stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            c.flags.add("bye")
            c.wake.set()
        if self._producer is not None:
            await self._producer.stop()

    async def _kpi_loop(self) -> None:
        while True:
            try:
                self.kpi_now = self.live_kpi()
                self._changed("kpi", None)
            except Exception:
                log.exception("live KPIs")
            await asyncio.sleep(KPI_EVERY_S)

    def live_kpi(self, now_ms: int | None = None) -> dict:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        entries = list(self.state.entries)
        parents = dict(self.state.parents)
        hour = kpi.compute(entries, now_ms - 3_600_000, now_ms + 1, self.cfg, parents)["overall"]
        return {"recent": kpi.recent_rate(entries, now_ms, self.cfg, parents),
                "lastHour": {k: hour[k] for k in ("activations", "rate_per_bucket", "priority_percent",
                                                  "chattering", "fleeting", "stale", "top", "shelving")},
                "historyAvailable": bool(entries) or self.feed.kafka_ok}

    # --- helpers --------------------------------------------------------------
    def user(self, request: web.Request) -> str | None:
        return self.auth.identify(request.headers, request.remote)

    def need_read(self, request: web.Request) -> None:
        if self.auth.reads_need_login and self.user(request) is None:
            raise ApiError(401, "authentication required to read (HTTP basic or the trusted proxy header)",
                           "Authorization")

    def need_write(self, request: web.Request) -> str:
        # A browser may attach cached basic credentials to a form another site posts here:
        # a form cannot send application/json without a CORS preflight (which this server
        # never grants), and a foreign Origin is refused outright.
        if request.content_type != "application/json":
            raise ApiError(415, "send the request with Content-Type: application/json", "Content-Type")
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:
            raise ApiError(403, f"cross-site request from {origin[:100]} refused", "Origin")
        if not self.auth.configured:
            raise ApiError(403, "operator actions are disabled: no users file (ALARM_ENGINE_WEB_USERS) "
                                "and no trusted proxy header (ALARM_ENGINE_WEB_TRUSTED_HEADER) configured")
        user = self.user(request)
        if user is None:
            raise ApiError(401, "authentication required: give a user name and password", "Authorization")
        return user

    def client_host(self, request: web.Request) -> str:
        fwd = request.headers.get("X-Forwarded-For", "")
        if fwd and request.remote in self.auth.trusted_proxies:
            return fwd.split(",")[0].strip()[:128]
        return request.remote or ""

    def snapshot(self) -> dict:
        return {"alarms": self.state.rows(), "locations": self.state.locations(), "tree": self.state.tree(),
                "status": self.feed.status(), "kpi": self.kpi_now, "server": socket.gethostname(),
                "readOnly": not self.auth.configured, "shelveReasons": list(self.settings.shelve_reasons)}

    async def _send(self, topic: str, key: str, datum: dict | None, headers: list) -> None:
        from aiokafka import AIOKafkaProducer

        from alarm_engine.kafka_io import _start
        from alarm_engine.registry import make_codec

        try:
            if self._codec is None:
                self._codec = await asyncio.to_thread(make_codec, self.settings)
            value = None if datum is None else await asyncio.to_thread(self._codec.encode, topic, datum)
        except Exception as e:
            raise ApiError(503, f"schema registry unreachable: {e.__class__.__name__}: {e}") from e
        try:
            if self._producer is None:
                p = AIOKafkaProducer(**self.settings.kafka_kwargs(), acks="all", linger_ms=0,
                                     request_timeout_ms=int(SEND_TIMEOUT_S * 1000))
                await asyncio.wait_for(_start(p), SEND_TIMEOUT_S)
                self._producer = p
            fut = await asyncio.wait_for(
                self._producer.send(self.settings.topic(topic), key=key.encode(), value=value, headers=headers),
                SEND_TIMEOUT_S)
            await asyncio.wait_for(fut, SEND_TIMEOUT_S)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(503, f"Kafka at {self.settings.bootstrap} did not take the record: "
                                f"{e.__class__.__name__}: {e}") from e

    # --- handlers -------------------------------------------------------------
    async def page(self, request: web.Request) -> web.StreamResponse:
        if self.auth.reads_need_login and self.user(request) is None:
            return web.Response(status=401, text="authentication required",
                                headers={"WWW-Authenticate": 'Basic realm="alarm-engine"'})
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def api_index(self, request):
        return _json({"version": "v1", "openapi": "/api/v1/openapi.json"})

    async def openapi(self, request):
        return web.FileResponse(STATIC / "openapi.json")

    async def status(self, request):
        self.need_read(request)
        return _json(self.feed.status())

    async def whoami(self, request):
        return _json({"user": self.user(request), "authConfigured": self.auth.configured,
                      "readsNeedLogin": self.auth.reads_need_login})

    async def alarms(self, request):
        self.need_read(request)
        allowed = {"location", "category", "priority", "state"}
        for k in request.query:
            if k not in allowed:
                raise ApiError(400, f"unknown query parameter {k!r} (use {', '.join(sorted(allowed))})", k)
        rows = self.state.rows()
        loc = request.query.get("location")
        rows = [r for r in rows if self.state.in_location(r["location"], loc)
                and all(request.query.get(f) in (None, r.get(f)) for f in ("category", "priority", "state"))]
        counts = {f: {} for f in ("state", "priority", "severity", "location", "category")}
        for r in rows:
            for f in counts:
                counts[f][r.get(f, "")] = counts[f].get(r.get(f, ""), 0) + 1
        return _json({"alarms": rows, "total": len(rows), "counts": counts, "status": self.feed.status()})

    async def alarm(self, request):
        self.need_read(request)
        d = self.state.detail(request.match_info["name"])
        if d is None:
            raise ApiError(404, f"no alarm {request.match_info['name']!r}", "name")
        return _json(d)

    async def alarm_history(self, request):
        self.need_read(request)
        name = request.match_info["name"]
        if self.state.detail(name) is None and not self.state.alarm_history(name):
            raise ApiError(404, f"no alarm {name!r}", "name")
        return _json({"alarm": name, "history": [{**e, "text": history.describe(e)}
                                                  for e in self.state.alarm_history(name)]})

    def _since(self, request, default: str) -> int:
        from alarm_engine.cli import CLIError, parse_duration_ms

        try:
            return int(time.time() * 1000) - parse_duration_ms(request.query.get("since", default))
        except CLIError as e:
            raise ApiError(400, str(e), "since") from None

    async def history_all(self, request):
        self.need_read(request)
        since = self._since(request, "1h")
        es = history.select(list(self.state.entries), name=request.query.get("name"),
                            location=request.query.get("location"), since_ms=since, parents=self.state.parents)
        return _json({"since": since, "history": [{**e, "text": history.describe(e)} for e in es[-5000:]]})

    async def kpis(self, request):
        self.need_read(request)
        now = int(time.time() * 1000)
        since = self._since(request, "1h")
        return _json(kpi.compute(list(self.state.entries), since, now + 1, self.cfg, dict(self.state.parents)))

    async def shelve(self, request):
        user = self.need_write(request)
        name = request.match_info["name"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise ApiError(400, "the body is not valid JSON", "body") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "body")
        for k in body:
            if k not in SHELVE_FIELDS:
                raise ApiError(400, f"unknown field {k!r} (use {', '.join(sorted(SHELVE_FIELDS))})", k)
        for k in ("reason", "comment"):
            if not isinstance(body.get(k, ""), str):
                raise ApiError(400, f"{k} must be a string", k)
        if not isinstance(body.get("oneshot", False), bool):
            raise ApiError(400, "oneshot must be true or false", "oneshot")
        if name not in self.state.definitions:
            raise ApiError(404, f"no alarm {name!r}", "name")
        now = int(time.time() * 1000)
        expiration = None
        from alarm_engine.cli import CLIError, parse_duration_ms, parse_time_ms

        if body.get("duration") not in (None, "") and body.get("expiration") not in (None, ""):
            raise ApiError(400, "give duration or expiration, not both", "expiration")
        try:
            if body.get("duration") not in (None, ""):
                d = body["duration"]
                if isinstance(d, bool) or not isinstance(d, (str, int)):
                    raise ApiError(400, "duration must be a string such as 90s, 15m, 2h", "duration")
                expiration = now + (parse_duration_ms(d) if isinstance(d, str) else parse_duration_ms(f"{d}ms"))
            elif body.get("expiration") not in (None, ""):
                x = body["expiration"]
                if isinstance(x, bool) or not isinstance(x, (str, int)):
                    raise ApiError(400, "expiration must be an ISO 8601 time or epoch ms", "expiration")
                expiration = parse_time_ms(str(x))
                if expiration <= now:
                    raise ApiError(400, "expiration is in the past", "expiration")
        except CLIError as e:
            raise ApiError(400, str(e), "duration" if body.get("duration") else "expiration") from None
        datum = {"user": user, "reason": body.get("reason", ""), "comment": body.get("comment", ""),
                 "expiration": expiration, "oneshot": body.get("oneshot", False), "duration": None,
                 "host": self.client_host(request)}
        from alarm_engine import records
        from alarm_engine.codec import BadRecord

        try:
            records.validate("shelved-alarms", name, datum, self.settings)
        except BadRecord as e:
            raise ApiError(400, str(e), "reason") from None
        await self._send("shelved-alarms", name, datum, self._headers(request, user))
        return _json({"alarm": name, "shelved": True, "user": user, "expiration": expiration}, 202)

    async def unshelve(self, request):
        user = self.need_write(request)
        name = request.match_info["name"]
        if name not in self.state.definitions and name not in self.state.shelved:
            raise ApiError(404, f"no alarm {name!r}", "name")
        await self._send("shelved-alarms", name, None, self._headers(request, user))
        return _json({"alarm": name, "shelved": False, "user": user}, 202)

    async def ack(self, request):
        """POST /api/v1/alarms/{name}/ack (and /unack): body {"comment": "..."} optional."""
        user = self.need_write(request)
        name = request.match_info["name"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise ApiError(400, "the body is not valid JSON", "body") from None
        if not isinstance(body, dict) or set(body) - {"comment"} or not isinstance(body.get("comment", ""), str):
            raise ApiError(400, 'the body must be {} or {"comment": "..."}', "body")
        if name not in self.state.definitions:
            raise ApiError(404, f"no alarm {name!r}", "name")
        unack = request.path.endswith("/unack")
        datum = {"user": user, "host": self.client_host(request), "comment": body.get("comment", ""),
                 "time": int(time.time() * 1000), "unack": unack}
        from alarm_engine import records
        from alarm_engine.codec import BadRecord

        try:
            records.validate("alarm-acks", name, datum, self.settings)
        except BadRecord as e:
            raise ApiError(400, str(e), "comment") from None
        await self._send("alarm-acks", name, datum, self._headers(request, user))
        return _json({"alarm": name, "acknowledged": not unack, "user": user}, 202)

    def _headers(self, request, user: str) -> list:
        return [("user", user.encode()), ("host", self.client_host(request).encode()),
                ("client", b"alarm-engine web")]

    async def events(self, request):
        self.need_read(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        client = Client()
        self.clients.add(client)

        async def send(event: str, data) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        try:
            await resp.write(b"retry: 2000\n\n")
            await send("snapshot", self.snapshot())
            while True:
                try:
                    await asyncio.wait_for(client.wake.wait(), 15)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                client.wake.clear()
                rows, hist, flags = client.rows, client.history, client.flags
                client.rows, client.history, client.flags = set(), set(), set()
                if "bye" in flags:
                    break
                if "snapshot" in flags:
                    await send("snapshot", self.snapshot())
                    continue
                msg = {}
                if rows:
                    msg["rows"] = [self.state.row(n) or {"name": n, "removed": True} for n in sorted(rows)]
                if hist:
                    msg["history"] = sorted(hist)
                if "locations" in flags:
                    msg["locations"] = self.state.locations()
                    msg["tree"] = self.state.tree()
                if "status" in flags or rows:
                    msg["status"] = self.feed.status()
                if "kpi" in flags:
                    msg["kpi"] = self.kpi_now
                if msg:
                    msg["sentMs"] = int(time.time() * 1000)
                    await send("changes", msg)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(client)
        return resp


@web.middleware
async def json_errors(request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        body = {"error": e.message, "status": e.status}
        if e.field:
            body["field"] = e.field
        headers = {}
        if e.status == 401 and not request.headers.get("X-Requested-With"):
            headers["WWW-Authenticate"] = 'Basic realm="alarm-engine"'
        return web.json_response(body, status=e.status, headers=headers)
    except web.HTTPException as e:
        if not request.path.startswith("/api/"):
            raise
        return web.json_response({"error": e.reason, "status": e.status, "field": "path"}, status=e.status)


def make_app(settings: Settings, auth: Auth | None = None, cfg: kpi.KpiConfig = kpi.KpiConfig(),
             history_window_ms: int = 86_400_000) -> web.Application:
    w = WebApp(settings, auth or Auth.from_env(), cfg, history_window_ms)
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    app["web"] = w
    app.on_startup.append(w.start)
    app.on_shutdown.append(w.stop)
    r = app.router
    r.add_get("/", w.page)
    r.add_static("/static/", STATIC, append_version=False)
    r.add_get("/api/v1", w.api_index)
    r.add_get("/api/v1/openapi.json", w.openapi)
    r.add_get("/api/v1/status", w.status)
    r.add_get("/api/v1/whoami", w.whoami)
    r.add_get("/api/v1/alarms", w.alarms)
    r.add_get("/api/v1/alarms/{name}", w.alarm)
    r.add_get("/api/v1/alarms/{name}/history", w.alarm_history)
    r.add_post("/api/v1/alarms/{name}/shelve", w.shelve)
    r.add_post("/api/v1/alarms/{name}/unshelve", w.unshelve)
    r.add_post("/api/v1/alarms/{name}/ack", w.ack)
    r.add_post("/api/v1/alarms/{name}/unack", w.ack)
    r.add_get("/api/v1/history", w.history_all)
    r.add_get("/api/v1/kpi", w.kpis)
    r.add_get("/api/v1/events", w.events)
    return app


def kpi_config_from_env(env=None) -> kpi.KpiConfig:
    env = os.environ if env is None else env
    return kpi.KpiConfig(flood_threshold=int(env.get("ALARM_ENGINE_FLOOD_THRESHOLD", 10)))


async def serve(settings: Settings, host: str, port: int, ready=None) -> None:
    """Runs until cancelled (Ctrl-C)."""
    app = make_app(settings, cfg=kpi_config_from_env())
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    auth = app["web"].auth
    mode = ("writes need a login; " + ("reads anonymous" if not auth.reads_need_login else "reads need a login")
            if auth.configured else "read-only: no users file or trusted header configured")
    print(f"alarm-engine web: http://{host}:{port}/  ({mode}; Kafka {settings.bootstrap})", flush=True)
    if ready is not None:
        ready()
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
