"""The test origin's routes: SSE streams with every knob a fault test needs, deterministic byte bodies,
uploads, status codes and delays (see ENDPOINTS_HELP), on the HTTP/1.1 server of server.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .server import (
    MAX_BYTES_SIZE,
    BadRequest,
    Closed,
    Exchange,
    HttpServer,
    Query,
    Request,
    body_pieces,
    reads_body,
)

ENDPOINTS_HELP = """\
GET  /events     SSE. count, interval, start_delay, heartbeat, accel=yes|no, flush_headers=0|1,
                 first_byte_delay, retry (ms), size, end=clean|close|hang, max_life, close_after,
                 task, framing=chunked|close, lastEventId (or the Last-Event-ID header)
GET  /bytes      size, seed, chunk, rate (bytes/s); header X-Content-SHA256
POST /upload     any body (chunked or Content-Length) -> {"size","sha256","seconds"}
GET  /status/<code>, /delay/<seconds>, /health, /_log
"""


# ----------------------------------------------------------------------------------------------------
# Deterministic payloads
# ----------------------------------------------------------------------------------------------------


def expected_bytes(size: int, seed: int = 0) -> bytes:
    """The exact body ``GET /bytes?size=SIZE&seed=SEED`` serves.

    SHAKE-256 is an extendable-output function in the standard library: any length, stable across Python
    versions and platforms (unlike ``random.randbytes``), and fast because it runs in C.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    return hashlib.shake_256(f"faultproxy-bytes:{seed}".encode()).digest(size)


def expected_sha256(size: int, seed: int = 0) -> str:
    """Hex SHA-256 of :func:`expected_bytes` — what the ``X-Content-SHA256`` header carries."""
    return hashlib.sha256(expected_bytes(size, seed)).hexdigest()


def sse_event_bytes(
    seq: int,
    count: int,
    *,
    task: str | None = None,
    size: int | None = None,
) -> bytes:
    """One SSE event exactly as ``/events`` writes it (tests use it for byte-exact assertions)."""
    data: dict[str, Any] = {"seq": seq}
    if task is not None:
        # Integer percent, floor, so the last event is exactly 100 and earlier ones never round up to it.
        data = {"task": task, "progress": seq * 100 // count if count else 100, "seq": seq}
    text = json.dumps(data, separators=(",", ":"))
    if size is not None:
        overhead = len(',"pad":""')
        missing = size - len(text) - overhead
        if missing > 0:
            data["pad"] = "x" * missing
            text = json.dumps(data, separators=(",", ":"))
    lines = []
    if task is not None and seq == count:
        lines.append("event: done")
    lines.append(f"id: {seq}")
    lines.append(f"data: {text}")
    return ("\n".join(lines) + "\n\n").encode()



@dataclass(frozen=True)
class EventOptions:
    """Parameters of ``GET /events``. Query values; bad ones are a 400 naming the parameter.

    Every event is ``id: <seq>`` + ``data: {"seq":<seq>}`` (1-based; see :func:`sse_event_bytes`), one write
    and, when chunked, one HTTP chunk. The response always carries ``Connection: close``.

    * ``count`` (10): events in all; with a last event id *k* the stream sends k+1..count.
    * ``interval`` (0.1 s) between events, on an absolute schedule; ``start_delay`` before the first.
    * ``heartbeat`` (s, >= 0.01): a ``: ping`` comment whenever nothing was written for that long (not
      during ``end=hang``, which sends nothing more).
    * ``accel`` (``yes``/``no``): sends ``X-Accel-Buffering``.
    * ``flush_headers`` (1): 0 holds the head back until the first body write (normally the first event;
      the retry block or a ping if one comes first) — a late flush.
    * ``first_byte_delay`` (s): before the status line is written.
    * ``retry`` (ms): a ``retry:`` block before the first event (its own write when headers are flushed
      at once, else in the first event's write).
    * ``size`` (bytes): pads each event's data JSON (``"pad"``) to about this length.
    * ``end``: ``clean`` terminating chunk (or, for framing=close, the close); ``close`` closes without the
      terminating chunk; ``hang`` sends nothing more and keeps the connection open until the client leaves
      or ``max_life`` (600 s; it bounds the whole response) runs out, then closes.
    * ``close_after`` (n): close without a clean end after n events written on this connection (0: right
      after the headers).
    * ``task`` (id): data is ``{"task","progress","seq"}`` with progress = seq*100//count; the last event
      has ``event: done``.
    * ``framing``: ``chunked``, or ``close`` (no Transfer-Encoding or Content-Length: read until close).
    * ``lastEventId`` or the ``Last-Event-ID`` header (which wins): resume after that id.
    """

    count: int = 10
    interval: float = 0.1
    start_delay: float = 0.0
    heartbeat: float | None = None
    accel: str | None = None
    flush_headers: bool = True
    first_byte_delay: float = 0.0
    retry: int | None = None
    size: int | None = None
    end: str = "clean"
    max_life: float = 600.0
    close_after: int | None = None
    task: str | None = None
    framing: str = "chunked"
    last_event_id: int | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str], last_event_header: str | None) -> EventOptions:
        q = Query(query)
        last_event_id = q.integer("lastEventId", None)
        if last_event_header is not None and last_event_header.strip():
            # The header wins: it is what a reconnecting EventSource sends; the query form is for polyfills.
            try:
                last_event_id = int(last_event_header.strip())
            except ValueError:
                raise BadRequest(f"Last-Event-ID {last_event_header!r}: expected an integer") from None
            if last_event_id < 0:
                raise BadRequest(f"Last-Event-ID {last_event_header!r}: expected >= 0")
        flush = q.choice("flush_headers", "1", ("0", "1"))
        return cls(
            count=_require(q.integer("count", 10, maximum=10_000_000)),
            interval=_require(q.number("interval", 0.1)),
            start_delay=_require(q.number("start_delay", 0.0)),
            # A floor on the heartbeat keeps a typo (heartbeat=0.0001) from turning into a busy loop.
            heartbeat=q.number("heartbeat", None, minimum=0.01),
            accel=q.choice("accel", None, ("yes", "no")),
            flush_headers=flush == "1",
            first_byte_delay=_require(q.number("first_byte_delay", 0.0)),
            retry=q.integer("retry", None),
            size=q.integer("size", None, maximum=16 * 1024 * 1024),
            end=_require(q.choice("end", "clean", ("clean", "close", "hang"))),
            max_life=_require(q.number("max_life", 600.0, maximum=86_400.0, exclusive_minimum=True)),
            close_after=q.integer("close_after", None),
            task=q.text("task"),
            framing=_require(q.choice("framing", "chunked", ("chunked", "close"))),
            last_event_id=last_event_id,
        )


_T = TypeVar("_T")


def _require(value: _T | None) -> _T:
    # Only for parameters with a non-None default: narrows the Optional the generic parser returns.
    assert value is not None
    return value



# ----------------------------------------------------------------------------------------------------
# Endpoints: each takes the exchange and returns whether the connection may be reused.
# ----------------------------------------------------------------------------------------------------


async def _index(x: Exchange) -> bool:
    return await x.respond(200, ENDPOINTS_HELP.encode(), "text/plain; charset=utf-8")


async def _health(x: Exchange) -> bool:
    return await x.respond_json(200, {"ok": True})


async def _log_endpoint(x: Exchange) -> bool:
    return await x.respond_json(200, [r.to_dict() for r in x.log.snapshot()])


async def _status(x: Exchange) -> bool:
    raw = x.req.path.removeprefix("/status/")
    if not raw.isdigit() or not 200 <= int(raw) <= 599:
        raise BadRequest(f"/status/{raw}: expected a status code from 200 to 599")
    code = int(raw)
    return await x.respond_json(code, {"status": code})


async def _delay(x: Exchange) -> bool:
    raw = x.req.path.removeprefix("/delay/")
    seconds = Query({"seconds": raw}).number("seconds", None)
    if seconds is None:
        raise BadRequest("/delay/<seconds>: seconds missing")
    await x.pause(seconds)
    return await x.respond_json(200, {"delayed": seconds})


async def _bytes(x: Exchange) -> bool:
    q = Query(x.req.query)
    size = _require(q.integer("size", 1024, maximum=MAX_BYTES_SIZE))
    seed = _require(q.integer("seed", 0, minimum=-(2**63), maximum=2**63))
    chunk = _require(q.integer("chunk", 65536, minimum=1, maximum=16 * 1024 * 1024))
    rate = q.number("rate", None, maximum=1e12, exclusive_minimum=True)
    if size > 4 * 1024 * 1024:
        # Large bodies are generated off the loop so other connections keep their timing.
        data = await asyncio.to_thread(expected_bytes, size, seed)
    else:
        data = expected_bytes(size, seed)
    keep = not x.req.wants_close
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(size)),
        ("X-Content-SHA256", hashlib.sha256(data).hexdigest()),
    ]
    if not keep:
        headers.append(("Connection", "close"))
    await x.head(200, headers)
    view = memoryview(data)
    started = time.monotonic()
    for offset in range(0, size, chunk):
        if rate is not None:
            # Absolute schedule (not sleep-per-chunk) so pacing does not drift with write time.
            await x.pause(started + offset / rate - time.monotonic())
        piece = bytes(view[offset : offset + chunk])
        await x.out.body(piece)
        x.count("body_bytes_sent", len(piece))
    return keep


@reads_body
async def _upload(x: Exchange) -> bool:
    if (x.req.header("expect") or "").lower() == "100-continue":
        await x.out.raw(b"HTTP/1.1 100 Continue\r\n\r\n")
    digest = hashlib.sha256()
    size = 0
    first: float | None = None
    last: float | None = None
    async for piece in body_pieces(x.req, x.inp, x.body_timeout):
        last = time.monotonic()
        if first is None:
            first = last
        digest.update(piece)
        size += len(piece)
        x.count("request_body_bytes", len(piece))
    x.start_watch()
    seconds = (last - first) if first is not None and last is not None else 0.0
    return await x.respond_json(200, {"size": size, "sha256": digest.hexdigest(), "seconds": seconds})


async def _events(x: Exchange) -> bool:
    await _SseStream(x, EventOptions.parse(x.req.query, x.req.header("last-event-id"))).run()
    return False  # streams never reuse the connection (see _SseStream.run)


class _SseStream:
    """One ``GET /events`` response, driven by its :class:`EventOptions`."""

    def __init__(self, x: Exchange, opts: EventOptions) -> None:
        self.x = x
        self.opts = opts
        self.life_end = time.monotonic() + opts.max_life

    async def run(self) -> None:
        """Write the stream; returns after a clean end, raises Closed/LifeEnded/ClientGone otherwise."""
        x, opts = self.x, self.opts
        await x.pause_until(time.monotonic() + opts.first_byte_delay, self.life_end)
        await x.head(200, self._headers(), defer=not opts.flush_headers)

        prefix = b""
        if opts.retry is not None:
            prefix = f"retry: {opts.retry}\n\n".encode()
            if opts.flush_headers:
                await x.out.body(prefix)
                prefix = b""
        if opts.close_after == 0:
            await x.close_abruptly()
            raise Closed

        first_seq = (opts.last_event_id or 0) + 1
        first_due = time.monotonic() + opts.start_delay
        for index, seq in enumerate(range(first_seq, opts.count + 1)):
            # Absolute schedule: event i is due at first_due + i*interval, whatever writes cost.
            await self._idle_until(first_due + index * opts.interval)
            await x.out.body(prefix + sse_event_bytes(seq, opts.count, task=opts.task, size=opts.size))
            prefix = b""
            x.count("events_sent")
            if opts.close_after is not None and index + 1 >= opts.close_after:
                await x.close_abruptly()
                raise Closed

        if prefix:
            await x.out.body(prefix)
        await self._end()

    def _headers(self) -> list[tuple[str, str]]:
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if self.opts.framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
            self.x.out.chunked = True
        if self.opts.accel is not None:
            headers.append(("X-Accel-Buffering", self.opts.accel))
        # Streams are never reused: the connection closes after one, which keeps connection counting in
        # tests simple and is required anyway for framing=close.
        headers.append(("Connection", "close"))
        return headers

    async def _end(self) -> None:
        x = self.x
        if self.opts.end == "clean":
            if x.out.chunked:
                await x.out.finish_chunked()
            else:
                await x.out.flush_pending_head()  # framing=close: the connection close is the clean end
            return
        if self.opts.end == "close":
            await x.close_abruptly()
            raise Closed
        # end=hang: nothing more is sent; the connection stays open until the client leaves or max_life.
        await x.out.flush_pending_head()
        await x.pause_until(self.life_end, self.life_end)

    async def _idle_until(self, due: float) -> None:
        """Wait until ``due``, sending ``: ping`` comments whenever the stream has been idle a heartbeat."""
        x, heartbeat = self.x, self.opts.heartbeat
        while True:
            if heartbeat is not None:
                ping_at = x.out.last_write + heartbeat
                if ping_at < min(due, self.life_end):
                    await x.pause(ping_at - time.monotonic())
                    await x.out.body(b": ping\n\n")
                    x.count("pings_sent")
                    continue
            await x.pause_until(due, self.life_end)
            return


_GET_ROUTES: dict[str, Callable[[Exchange], Awaitable[bool]]] = {
    "/events": _events,
    "/bytes": _bytes,
    "/health": _health,
    "/_log": _log_endpoint,
    "/": _index,
}



class OriginServer(HttpServer):
    """The test origin. Use as ``with`` (background thread) or ``async with`` / ``await start()``."""

    def _route(self, req: Request) -> Callable[[Exchange], Awaitable[bool]]:
        path = req.path
        if path in _GET_ROUTES:
            if req.method != "GET":
                raise BadRequest(f"{req.method} not allowed on {path}; use GET", status=405)
            return _GET_ROUTES[path]
        if path == "/upload":
            if req.method not in ("POST", "PUT"):
                raise BadRequest(f"{req.method} not allowed on /upload; use POST", status=405)
            return _upload
        if path.startswith("/status/"):
            return _status
        if path.startswith("/delay/"):
            return _delay
        raise BadRequest(f"no such endpoint {path}", status=404)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m faultproxy.testing.origin``: serve until SIGINT/SIGTERM. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m faultproxy.testing.origin",
        description="A test SSE origin.",
        epilog=ENDPOINTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_serve_until_signal(args.host, args.port))
    except OSError as exc:
        print(f"origin: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


async def _serve_until_signal(host: str, port: int) -> int:
    server = OriginServer(host, port)
    await server.start()
    print(f"origin listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0

