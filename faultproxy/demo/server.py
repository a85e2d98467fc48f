"""The demo's backend: the built-in SSE origin extended with a simulated upload and the page's API.

`DemoServer` subclasses :class:`faultproxy.testing.origin.OriginServer` (its HTTP/1.1 plumbing, request log
and disconnect watching) and adds, in front of the origin's own routes:

    GET  /                       the page            GET /static/<file>   its CSS and JS (package data)
    POST /api/upload             start a task: ?heartbeat=<s|0>&accel=0|1&flush=1|0&scale=<f>
    GET  /events?task=ID         the task's progress as SSE (id: on every event, Last-Event-ID honoured)
    GET  /api/progress?task=ID&after=N   the same events as JSON (the resilient client's polling fallback)
    GET  /api/profiles           shipped profiles, with the origin switch that fixes each (if any)
    POST /api/faults?profile=NAME|none&scale=F   load that profile into the proxy, scoped to /events
    GET  /api/journal            the proxy's fault journal, relayed live from the control API (SSE)

A task is a simulated file upload on an absolute schedule, in production seconds multiplied by the time
scale: 10 progress events 2 s apart while the bytes go up (5..50 %), then 400 s of server-side processing
(virus scan, transcoding) with nothing to report, then 10 more events 2 s apart (55..100 %); the last one is
`event: done`. The silent stretch is what idle timeouts cut (nginx 60 s, ALB 60 s, NLB 350 s). A client that
reconnects with Last-Event-ID gets the events it missed at once, then the rest on schedule.

Scoping: the demo loads profiles through the control API (`PUT /profiles` with YAML), after adding
`match.path: /events` to every rule and multiplying every duration by the time scale (see
:func:`scoped_profile_yaml`). The page, its API calls and the journal stream cross the same proxy on the same
HTTP/2 connection and are never faulted; the proxy's own `fault_time_scale` stays 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..errors import ProfileError
from ..profile import load_profile, shipped_profiles
from ..testing.origin import OriginServer
from ..testing.origin.server import BadRequest, ClientGone, Exchange, Handler, Query, Request

__all__ = ["DemoServer", "Scenario", "Task", "scoped_profile_yaml", "FIXES"]

EVENTS_PATH = "/events"
MAX_TASKS = 200
DEFAULT_PROFILE = "h2-rst-stream"


@dataclass(frozen=True)
class Scenario:
    """The simulated upload, in production seconds (multiplied by the time scale when a task starts)."""

    upload_events: int = 10
    interval: float = 2.0
    processing: float = 400.0
    finish_events: int = 10

    @property
    def count(self) -> int:
        return self.upload_events + self.finish_events

    def offsets(self) -> list[float]:
        """Seconds after the task's start at which each event (1-based seq = index + 1) is due."""
        ups = [self.interval * (i + 1) for i in range(self.upload_events)]
        last = ups[-1] if ups else 0.0
        fins = [last + self.processing + self.interval * (i + 1) for i in range(self.finish_events)]
        return ups + fins

    def phase(self, seq: int) -> str:
        if seq <= self.upload_events:
            return "upload"
        return "done" if seq == self.count else "processing"


# The origin switch that fixes each shipped profile for a client that does not resume (None: no origin
# switch can; the text says what does). The page offers "apply the fix" from this table.
FIXES: dict[str, dict[str, Any]] = {
    "h2-rst-stream": {"switches": None, "text": "No origin switch: the stream is reset whatever it carries. "
                      "Fix: the client resumes with Last-Event-ID."},
    "nginx-read-timeout": {"switches": {"heartbeat": 15}, "text": "Heartbeat comments more often than "
                           "proxy_read_timeout (60 s)."},
    "nginx-gzip-buffered": {"switches": {"accel": True}, "text": "X-Accel-Buffering: no on the SSE response "
                            "(or gzip off for text/event-stream). Heartbeats do not help: they are held too."},
    "aws-alb": {"switches": {"heartbeat": 15}, "text": "Heartbeat comments more often than the ALB idle "
                "timeout (60 s)."},
    "aws-nlb": {"switches": {"heartbeat": 15}, "text": "Heartbeat comments more often than the NLB idle "
                "timeout (350 s); only a client watchdog notices the black hole."},
    "cloudflare": {"switches": {"heartbeat": 15}, "text": "Heartbeat comments more often than Cloudflare's "
                   "100 s proxy read timeout."},
    "cloudfront": {"switches": {"heartbeat": 15, "flush": True}, "text": "Headers at once and heartbeats "
                   "more often than the 30 s origin read timeout."},
    "heroku": {"switches": {"heartbeat": 15, "flush": True}, "text": "First byte at once (H12, 30 s) and "
               "heartbeats more often than 55 s (H15)."},
    "gcp-lb": {"switches": None, "text": "No origin switch: the 30 s limit is on the whole response. "
               "Fix: a longer timeoutSec, and a client that resumes."},
    "go-write-timeout": {"switches": None, "text": "No origin switch here: clear the write deadline in the "
                         "SSE handler (ResponseController.SetWriteDeadline); clients resume."},
    "corporate-proxy": {"switches": None, "text": "No origin switch: the scanner holds the stream. "
                        "Fix: a client watchdog that falls back to polling."},
    "h2-goaway-drain": {"switches": None, "text": "No origin switch: the client reconnects and resumes "
                        "with Last-Event-ID."},
    "nginx-upstream-closed": {"switches": None, "text": "No origin switch: the client resumes with "
                              "Last-Event-ID."},
    "flaky-mobile": {"switches": None, "text": "No origin switch: a watchdog, backoff and resumption on "
                     "the client."},
}


# ----------------------------------------------------------------------------------------------------
# Profiles, scoped and scaled
# ----------------------------------------------------------------------------------------------------


def scoped_profile_yaml(ref: str, scale: float, path: str = EVENTS_PATH) -> str:
    """One profile document: `ref`'s rules (its `extends` flattened in), every duration times `scale`, and
    every rule narrowed to requests for `path` (added to `match`; a rule's own path conditions still
    hold too). The name stays the shipped one, so journal records say `nginx-read-timeout`."""
    profile = load_profile(ref).scaled(scale)
    rules: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rule in profile.rules:
        # Defaults left out (they come back on load); an explicit null where the default is not null stays.
        data = rule.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        name = data["name"]
        for n in itertools.count(2):  # a base rule and the extending profile's may share a name
            if name not in seen:
                break
            name = f"{data['name']}-{n}"
        seen.add(name)
        data["name"] = name
        match = dict(data.get("match") or {})
        exact = "^" + re.escape(path) + "$"
        if not match.get("path") and not match.get("path_regex"):
            match["path"] = [path]
        elif not match.get("path_regex"):
            match["path_regex"] = exact
        else:  # both must hold: the path is `path`, and the rule's own regex is found in it
            match["path_regex"] = f"^(?={re.escape(path)}$)(?=.*?(?:{match['path_regex']}))"
        data["match"] = match
        rules.append(data)
    doc: dict[str, Any] = {"version": 1, "name": profile.name, "description": profile.description}
    if profile.seed is not None:
        doc["seed"] = profile.seed
    doc["rules"] = rules
    return str(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------


@dataclass
class Task:
    id: str
    scenario: Scenario
    scale: float
    heartbeat: float | None  # production seconds; None: no heartbeat comments
    accel: bool  # send X-Accel-Buffering: no
    flush_headers: bool  # headers at once (True) or with the first body byte (False)
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.offsets = [o * self.scale for o in self.scenario.offsets()]

    @property
    def count(self) -> int:
        return self.scenario.count

    def due(self, seq: int) -> float:
        return self.started + self.offsets[seq - 1]

    def due_now(self, now: float | None = None) -> int:
        """How many events are due by now (the highest seq the server has produced)."""
        now = time.monotonic() if now is None else now
        return sum(1 for o in self.offsets if self.started + o <= now)

    def payload(self, seq: int) -> dict[str, Any]:
        return {
            "task": self.id,
            "seq": seq,
            "progress": seq * 100 // self.count,
            "phase": self.scenario.phase(seq),
        }

    def event_bytes(self, seq: int) -> bytes:
        lines = []
        if seq == self.count:
            lines.append("event: done")
        lines.append(f"id: {seq}")
        lines.append("data: " + json.dumps(self.payload(seq), separators=(",", ":")))
        return ("\n".join(lines) + "\n\n").encode()

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.id,
            "count": self.count,
            "scale": self.scale,
            "started_at": self.started_wall,
            "offsets": [round(o, 6) for o in self.offsets],
            "total": round(self.offsets[-1], 6) if self.offsets else 0.0,
            "heartbeat": self.heartbeat,
            "heartbeat_interval": self.heartbeat * self.scale if self.heartbeat else None,
            "accel": self.accel,
            "flush_headers": self.flush_headers,
            "scenario": {
                "upload_events": self.scenario.upload_events,
                "interval": self.scenario.interval,
                "processing": self.scenario.processing,
                "finish_events": self.scenario.finish_events,
            },
        }


# ----------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------


_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class DemoServer(OriginServer):
    """The origin plus the demo's page and API. ``control_url`` is set once the proxy is up."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, control_url: str | None = None) -> None:
        super().__init__(host, port)
        self.control_url = control_url
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self._task_ids = itertools.count(1)
        self.current: dict[str, Any] = {"profile": None, "scale": None}

    # -- routing --
    def _route(self, req: Request) -> Handler:
        path = req.path
        if path in ("/", "/index.html"):
            return self._get(req, self._page)
        if path.startswith("/static/"):
            return self._get(req, self._static)
        if path == EVENTS_PATH and "task" in req.query:
            return self._get(req, self._task_events)
        api: dict[str, tuple[str, Handler]] = {
            "/api/upload": ("POST", self._upload_task),
            "/api/progress": ("GET", self._progress),
            "/api/profiles": ("GET", self._profiles),
            "/api/faults": ("POST", self._faults),
            "/api/journal": ("GET", self._journal),
        }
        if path in api:
            method, handler = api[path]
            if req.method != method:
                raise BadRequest(f"{req.method} not allowed on {path}; use {method}", status=405)
            return handler
        return super()._route(req)

    @staticmethod
    def _get(req: Request, handler: Handler) -> Handler:
        if req.method not in ("GET", "HEAD"):
            raise BadRequest(f"{req.method} not allowed on {req.path}; use GET", status=405)
        return handler

    # -- the page --
    async def _page(self, x: Exchange) -> bool:
        return await self._send_static(x, "index.html")

    async def _static(self, x: Exchange) -> bool:
        return await self._send_static(x, x.req.path.removeprefix("/static/"))

    async def _send_static(self, x: Exchange, name: str) -> bool:
        if not name or "/" in name or name.startswith(".") or "\\" in name:
            raise BadRequest(f"no such file {name!r}", status=404)
        suffix = name[name.rfind(".") :] if "." in name else ""
        ctype = _STATIC_TYPES.get(suffix)
        node = resources.files(__package__).joinpath("static", name)
        if ctype is None or not node.is_file():
            raise BadRequest(f"no such file {name!r}", status=404)
        body = node.read_bytes()
        return await x.respond(200, body, ctype, [("Cache-Control", "no-cache")])

    # -- tasks --
    async def _upload_task(self, x: Exchange) -> bool:
        q = Query(x.req.query)
        scale = q.number("scale", 0.02, minimum=0.001, maximum=1.0)
        heartbeat = q.number("heartbeat", 0.0, maximum=600.0)
        accel = q.choice("accel", "0", ("0", "1")) == "1"
        flush = q.choice("flush", "1", ("0", "1")) == "1"
        base = Scenario()
        scenario = Scenario(
            upload_events=_int(q.integer("upload_events", base.upload_events, minimum=1, maximum=100)),
            interval=_num(q.number("interval", base.interval, minimum=0.01, maximum=60.0)),
            processing=_num(q.number("processing", base.processing, maximum=3600.0)),
            finish_events=_int(q.integer("finish_events", base.finish_events, minimum=1, maximum=100)),
        )
        task_id = f"t{next(self._task_ids)}"
        task = Task(task_id, scenario, _num(scale), heartbeat or None, accel, flush)
        self.tasks[task_id] = task
        while len(self.tasks) > MAX_TASKS:
            self.tasks.popitem(last=False)
        # The request log is the origin's test aid; a demo left running for hours must not grow it forever.
        if len(self.log._records) > 20_000:
            self.log.clear()
        return await x.respond_json(200, task.describe())

    def _task(self, x: Exchange) -> Task:
        task_id = x.req.query.get("task", "")
        task = self.tasks.get(task_id)
        if task is None:
            raise BadRequest(f"no such task {task_id!r} (start one with POST /api/upload)", status=404)
        return task

    async def _task_events(self, x: Exchange) -> bool:
        task = self._task(x)
        last = _last_event_id(x.req)
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        headers.append(("Transfer-Encoding", "chunked"))
        x.out.chunked = True
        if task.accel:
            headers.append(("X-Accel-Buffering", "no"))
        headers.append(("Connection", "close"))
        await x.head(200, headers, defer=not task.flush_headers)
        heartbeat = task.heartbeat * task.scale if task.heartbeat else None
        for seq in range(min(last, task.count) + 1, task.count + 1):
            due = task.due(seq)
            while heartbeat is not None and x.out.last_write + heartbeat < due:
                await x.pause(x.out.last_write + heartbeat - time.monotonic())
                await x.out.body(b": ping\n\n")
                x.count("pings_sent")
            await x.pause(due - time.monotonic())
            await x.out.body(task.event_bytes(seq))
            x.count("events_sent")
        await x.out.finish_chunked()
        return False

    async def _progress(self, x: Exchange) -> bool:
        task = self._task(x)
        after = _int(Query(x.req.query).integer("after", 0))
        due = task.due_now()
        events = [{"id": s, **task.payload(s)} for s in range(after + 1, due + 1)]
        body = {
            "task": task.id,
            "count": task.count,
            "due": due,
            "progress": due * 100 // task.count,
            "done": due >= task.count,
            "events": events,
        }
        return await x.respond_json(200, body)

    # -- profiles and the proxy's control API --
    async def _profiles(self, x: Exchange) -> bool:
        out = []
        for name in shipped_profiles():
            try:
                description = " ".join(load_profile(name).description.split())
            except ProfileError as e:
                description = f"invalid: {e.issues[0]}"
            fix = FIXES.get(name, {"switches": None, "text": ""})
            out.append({"name": name, "description": description, "fix": fix["switches"], "fix_text": fix["text"]})
        body = {"profiles": out, "default": DEFAULT_PROFILE, "current": self.current, "control_api": bool(self.control_url)}
        return await x.respond_json(200, body)

    async def _faults(self, x: Exchange) -> bool:
        q = Query(x.req.query)
        name = q.text("profile") or "none"
        scale = _num(q.number("scale", 0.02, minimum=0.001, maximum=1.0))
        if name == "none":
            payload: dict[str, Any] = {"profiles": []}
        else:
            if name not in shipped_profiles():
                raise BadRequest(f"no shipped profile {name!r}", status=404)
            try:
                text = scoped_profile_yaml(name, scale)
            except ProfileError as e:
                raise BadRequest(f"profile {name!r} is invalid: {e.issues[0]}", status=422) from None
            payload = {"profiles": [{"yaml": text, "source": f"{name}.yaml (demo: /events only, x{scale:g})"}]}
        status, answer = await self._control("PUT", "/profiles", payload)
        if status != 200:
            return await x.respond_json(502, {"error": "the control API refused", "status": status, "answer": answer})
        self.current = {"profile": None if name == "none" else name, "scale": scale}
        rules = [r["key"] for p in answer.get("profiles", []) for r in p.get("rules", [])]
        return await x.respond_json(200, {**self.current, "rules": rules, "generation": answer.get("generation")})

    async def _control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request to the control API (HTTP/1.1, Connection: close); (status, parsed JSON)."""
        if not self.control_url:
            raise BadRequest("the proxy's control API is not known yet", status=503)
        url = urlsplit(self.control_url)
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), 5.0)
        except (OSError, TimeoutError) as e:
            raise BadRequest(f"cannot reach the control API at {self.control_url}: {e}", status=502) from None
        try:
            writer.write(head.encode("latin-1") + data)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(-1), 10.0)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head_bytes, _, payload = raw.partition(b"\r\n\r\n")
        try:
            status = int(head_bytes.split(b" ", 2)[1])
            return status, json.loads(payload or b"null")
        except (IndexError, ValueError):
            raise BadRequest("the control API answered something unreadable", status=502) from None

    async def _journal(self, x: Exchange) -> bool:
        """Relay the control API's journal stream (`GET /events`) to the page, byte for byte."""
        if not self.control_url:
            raise BadRequest("the proxy's control API is not known yet", status=503)
        url = urlsplit(self.control_url)
        # EventSource sends Last-Event-ID when it reconnects by itself; the page passes ?lastEventId= when it
        # has to make a new EventSource. Without either, ask for the recent backlog: a record can be lost
        # when the connection that carried it is the one a fault closes (heroku's H15, GOAWAY), and the
        # page ignores records of other tasks anyway.
        last = (x.req.header("last-event-id") or x.req.query.get("lastEventId") or "").strip()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), 5.0)
        except (OSError, TimeoutError) as e:
            raise BadRequest(f"cannot reach the control API: {e}", status=502) from None
        try:
            resume = last.isdigit()
            target = "/events" if resume else "/events?backlog=64"
            extra = f"Last-Event-ID: {last}\r\n" if resume else ""
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1"))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise BadRequest("the control API refused the journal stream", status=502)
            await x.head(
                200,
                [
                    ("Content-Type", "text/event-stream"),
                    ("Cache-Control", "no-cache"),
                    ("X-Accel-Buffering", "no"),
                    ("Transfer-Encoding", "chunked"),
                    ("Connection", "close"),
                ],
            )
            x.out.chunked = True
            await x.out.body(b"retry: 1000\n\n")
            gone = asyncio.ensure_future(x.gone.event.wait())
            try:
                while True:
                    read = asyncio.ensure_future(reader.read(65536))
                    done, _ = await asyncio.wait({read, gone}, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
                    if gone in done:
                        read.cancel()
                        raise ClientGone
                    if not done:
                        read.cancel()
                        await x.out.body(b": relay keep-alive\n\n")
                        continue
                    data = read.result()
                    if not data:
                        break  # the proxy went away; the page's EventSource reconnects
                    await x.out.body(data)
            finally:
                gone.cancel()
            await x.out.finish_chunked()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return False


def _last_event_id(req: Request) -> int:
    raw = req.header("last-event-id") or req.query.get("lastEventId") or ""
    raw = raw.strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise BadRequest(f"Last-Event-ID {raw!r}: expected an integer")
    return int(raw)


def _int(value: int | None) -> int:
    assert value is not None
    return value


def _num(value: float | None) -> float:
    assert value is not None
    return value

