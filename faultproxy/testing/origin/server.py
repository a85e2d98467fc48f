"""The HTTP/1.1 server under the test origin (and the demo): request heads, bodies, exchanges, the request log.

Written by hand on asyncio streams instead of using a framework, because a fault proxy is tested by
what reaches the wire: every byte, every chunk boundary, every flush and every close here is explicit,
so a route can ask for "headers late", "no terminating chunk" or "body delimited by close" and know it
got exactly that. Routes (routes.py) are coroutines that take an `Exchange` and return whether the
connection may be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BYTES_SIZE = 512 * 1024 * 1024
MAX_SECONDS = 3600.0
# A watcher keeps reading while a response is produced (to notice the client leaving); past this much
# unread input the client is flooding us, so the watcher stops buffering rather than grow without bound.
_MAX_WATCH_BUFFER = 1024 * 1024

Outcome = Literal[
    "complete",  # response fully written as the parameters asked
    "closed",  # server closed on purpose without a clean end (end=close, close_after)
    "max_life",  # the stream's max_life ran out (end=hang, or a stream longer than max_life)
    "client_disconnected",  # client went away (EOF / reset) before the response was done
    "server_stopped",  # OriginServer.stop() cut the response
    "bad_request",  # 4xx produced by the origin itself
]



# ----------------------------------------------------------------------------------------------------
# Request log
# ----------------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What the origin saw of one request. Times are ``time.monotonic()`` seconds of the origin's process
    (the same clock a test in the same process reads); compare them, don't print them."""

    id: int
    connection_id: int
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: tuple[tuple[str, str], ...]
    last_event_id: int | None
    connection_opened_at: float
    received_at: float
    status: int | None = None
    events_sent: int = 0
    pings_sent: int = 0
    body_bytes_sent: int = 0
    request_body_bytes: int = 0
    client_closed_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """First request header called ``name`` (case-insensitive)."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default

    @property
    def client_disconnected(self) -> bool:
        return self.client_closed_at is not None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["headers"] = [list(pair) for pair in self.headers]
        return data


class RequestLog:
    """Thread-safe log: the origin's loop thread writes, test threads read snapshots and wait.

    Records are mutated only through :meth:`update` under the lock, and readers get copies, so a test
    never sees a half-updated record.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._records: list[RequestRecord] = []
        self._next_id = 1

    def add(self, **fields: Any) -> RequestRecord:
        with self._cond:
            record = RequestRecord(id=self._next_id, **fields)
            self._next_id += 1
            self._records.append(record)
            self._cond.notify_all()
            return record

    def update(self, record: RequestRecord, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(record, name, value)
            self._cond.notify_all()

    def increment(self, record: RequestRecord, name: str, by: int = 1) -> None:
        with self._cond:
            setattr(record, name, getattr(record, name) + by)
            self._cond.notify_all()

    def snapshot(self) -> list[RequestRecord]:
        with self._cond:
            return [_copy_record(r) for r in self._records]

    def clear(self) -> None:
        with self._cond:
            self._records.clear()
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[RequestRecord], bool], timeout: float) -> RequestRecord:
        """First record satisfying ``predicate`` (a copy), waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self._records:
                    copy = _copy_record(record)
                    if predicate(copy):
                        return copy
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [r.to_dict() for r in self._records]
                    raise TimeoutError(f"no request matched within {timeout} s; log: {seen}")
                self._cond.wait(remaining)

    def find(self, predicate: Callable[[RequestRecord], bool]) -> RequestRecord | None:
        with self._cond:
            for record in self._records:
                copy = _copy_record(record)
                if predicate(copy):
                    return copy
        return None


def _copy_record(record: RequestRecord) -> RequestRecord:
    return dataclasses.replace(record, query=dict(record.query))


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed or reset the connection; the handler unwinds and logs it."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    raw_query: str
    query: dict[str, str]
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def wants_close(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens


def _parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable request head") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0]!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise BadRequest("obsolete header line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line!r}")
        headers.append((name, value.strip()))
    split = urlsplit(target)
    path = split.path or "/"
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    return Request(method, target, path, split.query, query, version, tuple(headers))


class _Input:
    """Buffered reader over a StreamReader.

    All reads go through this buffer so that a background *watcher* can keep reading while a response is
    produced — to notice the client's EOF or reset at once — without losing bytes of a pipelined next
    request: they stay in the buffer for the connection loop.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self._reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        start = 0
        while True:
            index = self._buf.find(separator, start)
            if index >= 0:
                end = index + len(separator)
                data = bytes(self._buf[:end])
                del self._buf[:end]
                return data
            if len(self._buf) > limit:
                raise BadRequest("request head or chunk line too large", status=431)
            start = max(0, len(self._buf) - len(separator) + 1)
            if not await self._fill():
                raise ClientGone

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise ClientGone
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read_some(self, n: int) -> bytes:
        if not self._buf and not await self._fill():
            raise ClientGone
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def watch_eof(self, gone: Gone) -> None:
        """Read (into the buffer) until EOF, then set ``gone``. Cancelled when the response is done."""
        while len(self._buf) <= _MAX_WATCH_BUFFER:
            if not await self._fill():
                gone.set()
                return
        # Flooded: stop reading; a disconnect will still surface as a failed write.
        await asyncio.Event().wait()


class _Output:
    """Writes to the client; one ``send`` is one write (and, when chunked, one HTTP chunk)."""

    def __init__(self, writer: asyncio.StreamWriter, gone: Gone) -> None:
        self._writer = writer
        self._gone = gone
        self.pending_head: bytes | None = None
        self.chunked = False
        self.body_bytes = 0
        self.last_write = time.monotonic()

    async def raw(self, data: bytes) -> None:
        if self._writer.is_closing():
            self._gone.set()  # we never write after closing ourselves, so the transport died under us
        if self._gone.is_set():
            raise ClientGone
        self._writer.write(data)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._gone.set()
            raise ClientGone from exc
        self.last_write = time.monotonic()

    async def head(self, status: int, headers: Sequence[tuple[str, str]], *, defer: bool = False) -> None:
        data = _head_bytes(status, headers)
        if defer:
            # A late flush: the head waits in our buffer and leaves with the first body write.
            self.pending_head = data
        else:
            await self.raw(data)

    async def body(self, data: bytes) -> None:
        framed = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        if self.pending_head is not None:
            framed = self.pending_head + framed
            self.pending_head = None
        await self.raw(framed)
        self.body_bytes += len(data)

    async def finish_chunked(self) -> None:
        data = b"0\r\n\r\n"
        if self.pending_head is not None:
            data = self.pending_head + data
            self.pending_head = None
        await self.raw(data)

    async def flush_pending_head(self) -> None:
        if self.pending_head is not None:
            data, self.pending_head = self.pending_head, None
            await self.raw(data)


def _head_bytes(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Query:
    """Typed access to query parameters; every bad value becomes a 400 naming the parameter."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def _raw(self, name: str) -> str | None:
        value = self._values.get(name)
        return None if value is None or value == "" else value

    def number(
        self,
        name: str,
        default: float | None,
        *,
        minimum: float = 0.0,
        maximum: float = MAX_SECONDS,
        exclusive_minimum: bool = False,
    ) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"{name}={raw!r}: expected a number") from None
        low_ok = value > minimum if exclusive_minimum else value >= minimum
        if not math.isfinite(value) or not low_ok or value > maximum:
            low = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
            raise BadRequest(f"{name}={raw!r}: expected a number {low} and <= {maximum}")
        return value

    def integer(self, name: str, default: int | None, *, minimum: int = 0, maximum: int = 10**9) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"{name}={raw!r}: expected an integer") from None
        if not minimum <= value <= maximum:
            raise BadRequest(f"{name}={raw!r}: expected an integer from {minimum} to {maximum}")
        return value

    def choice(self, name: str, default: str | None, choices: Sequence[str]) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw not in choices:
            raise BadRequest(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return raw

    def text(self, name: str, *, max_length: int = 200) -> str | None:
        raw = self._raw(name)
        if raw is not None and len(raw) > max_length:
            raise BadRequest(f"{name}: at most {max_length} characters")
        return raw



# ----------------------------------------------------------------------------------------------------
# One request/response exchange
# ----------------------------------------------------------------------------------------------------


class Gone:
    """Set once when the client is seen to leave (EOF, reset, failed write); remembers when."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.at: float | None = None

    def set(self) -> None:
        if self.at is None:
            self.at = time.monotonic()
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class LifeEnded(Exception):
    """``max_life`` of a stream ran out."""


class Exchange:
    """State of one request while its handler runs."""

    def __init__(
        self,
        req: Request,
        inp: _Input,
        writer: asyncio.StreamWriter,
        record: RequestRecord | None,
        log: RequestLog,
        *,
        body_timeout: float,
    ) -> None:
        self.req = req
        self.body_timeout = body_timeout
        self.inp = inp
        self.gone = Gone()
        self.out = _Output(writer, self.gone)
        self.writer = writer
        self.record = record
        self.log = log
        self.head_sent = False
        self.keep_alive_allowed = True
        self._watcher: asyncio.Task[None] | None = None

    # -- log helpers (no-ops for the unlogged /_log endpoint) --
    def note(self, **changes: Any) -> None:
        if self.record is not None:
            self.log.update(self.record, **changes)

    def count(self, name: str, by: int = 1) -> None:
        if self.record is not None:
            self.log.increment(self.record, name, by)

    # -- disconnect watching --
    def start_watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self.inp.watch_eof(self.gone))

    async def stop_watch(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise :class:`ClientGone` the moment the client leaves."""
        if self.gone.is_set():
            raise ClientGone
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.gone.event.wait(), seconds)
        except TimeoutError:
            return
        raise ClientGone

    async def pause_until(self, when: float, life_end: float | None = None) -> None:
        target = when if life_end is None else min(when, life_end)
        await self.pause(target - time.monotonic())
        if life_end is not None and time.monotonic() >= life_end:
            raise LifeEnded

    # -- responses --
    async def head(self, status: int, headers: Sequence[tuple[str, str]], *, defer: bool = False) -> None:
        self.note(status=status)
        self.head_sent = True
        await self.out.head(status, headers, defer=defer)

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """A complete Content-Length response; returns whether the connection may be reused."""
        keep = self.keep_alive_allowed and not self.req.wants_close and not self.inp.eof
        headers: list[tuple[str, str]] = []
        if status not in (204, 304):
            headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        else:
            body = b""
        headers += list(extra)
        if not keep:
            headers.append(("Connection", "close"))
        await self.head(status, headers)
        if body:
            await self.out.body(body)
            self.count("body_bytes_sent", len(body))
        return keep

    async def respond_json(self, status: int, value: Any) -> bool:
        return await self.respond(status, (json.dumps(value) + "\n").encode())

    async def close_abruptly(self) -> None:
        """Close without a clean end: flush what is buffered (so the last event does arrive), then FIN."""
        await self.out.flush_pending_head()
        self.writer.close()


async def body_pieces(req: Request, inp: _Input, timeout: float) -> AsyncIterator[bytes]:
    """Yield the request body in pieces as they arrive, for either framing."""
    te = req.header("transfer-encoding")
    cl = req.header("content-length")
    if te is not None:
        if cl is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if te.strip().lower() != "chunked":
            raise BadRequest(f"unsupported Transfer-Encoding {te!r}", status=501)
        while True:
            line = await asyncio.wait_for(inp.readuntil(b"\r\n", 4096), timeout)
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(f"bad chunk size line {line!r}") from None
            if size == 0:
                while await asyncio.wait_for(inp.readuntil(b"\r\n", 8192), timeout) != b"\r\n":
                    pass  # trailers are read and ignored
                return
            remaining = size
            while remaining:
                piece = await asyncio.wait_for(inp.read_some(min(remaining, 65536)), timeout)
                remaining -= len(piece)
                yield piece
            if await asyncio.wait_for(inp.readexactly(2), timeout) != b"\r\n":
                raise BadRequest("chunk not followed by CRLF")
    elif cl is not None:
        if not cl.strip().isdigit():
            raise BadRequest(f"bad Content-Length {cl!r}")
        remaining = int(cl)
        while remaining:
            piece = await asyncio.wait_for(inp.read_some(min(remaining, 65536)), timeout)
            remaining -= len(piece)
            yield piece



class Closed(Exception):
    """The handler closed the connection on purpose (end=close, close_after)."""


def lenient_last_event_id(req: Request) -> int | None:
    raw = req.header("last-event-id") or req.query.get("lastEventId")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def error_bytes(status: int, message: str) -> bytes:
    body = (message + "\n").encode()
    head = _head_bytes(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), ("Connection", "close")],
    )
    return head + body


Handler = Callable[[Exchange], Awaitable[bool]]


def reads_body(handler: Handler) -> Handler:
    """Mark a route that reads the request body itself; for the others an unexpected body is read and
    dropped before they run (keeping a keep-alive connection in sync)."""
    handler.reads_body = True  # type: ignore[attr-defined]
    return handler


class HttpServer:
    """An HTTP/1.1 server whose every byte is explicit; subclasses give `_route`. Use as ``with`` (background
    thread) or ``async with`` / ``await start()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keepalive_timeout: float = 60.0) -> None:
        self.host = host
        self._requested_port = port
        self.keepalive_timeout = keepalive_timeout
        self.log = RequestLog()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connection_ids = iter(range(1, 1 << 62))

    # -- addresses --
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HttpServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections being served right now (closed ones, by either side, are not counted)."""
        return len(self._tasks)

    # -- request log --
    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot (copies) of every request so far, oldest first; ``/_log`` itself is not logged."""
        return self.log.snapshot()

    def clear_requests(self) -> None:
        self.log.clear()

    def wait_for_request(
        self, predicate: Callable[[RequestRecord], bool] = lambda r: True, timeout: float = 5.0
    ) -> RequestRecord:
        """Block (not on the origin's own loop) until a logged request matches ``predicate``."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop:
            raise RuntimeError("wait_for_request would block the origin's loop; use wait_for_request_async")
        return self.log.wait_for(predicate, timeout)

    async def wait_for_request_async(
        self, predicate: Callable[[RequestRecord], bool] = lambda r: True, timeout: float = 5.0
    ) -> RequestRecord:
        deadline = time.monotonic() + timeout
        while True:
            found = self.log.find(predicate)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no request matched within {timeout} s")
            await asyncio.sleep(0.01)

    # -- async lifecycle (caller's loop) --
    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self._requested_port, limit=MAX_HEAD_BYTES
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Cut live responses (a hanging SSE stream would otherwise keep wait_closed waiting forever).
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync lifecycle (own loop in a background thread) --
    def start_in_thread(self, timeout: float = 10.0) -> HttpServer:
        if self._thread is not None:
            raise RuntimeError("HttpServer already started")
        loop = asyncio.new_event_loop()
        # Daemon: a test that forgets to stop the origin must not keep the interpreter alive at exit.
        thread = threading.Thread(target=loop.run_forever, name="faultproxy-origin", daemon=True)
        thread.start()
        self._thread = thread
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._thread = None
            raise
        return self

    def stop_in_thread(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._thread = None

    def __enter__(self) -> HttpServer:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()

    # -- connections --
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection_id = next(self._connection_ids)
        opened_at = time.monotonic()
        inp = _Input(reader)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(inp.readuntil(b"\r\n\r\n", MAX_HEAD_BYTES), self.keepalive_timeout)
                    req = _parse_head(head)
                except (ClientGone, TimeoutError):
                    return
                except BadRequest as exc:
                    writer.write(error_bytes(exc.status, str(exc)))
                    return
                if not await self._exchange(req, inp, writer, connection_id, opened_at):
                    return
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _exchange(
        self, req: Request, inp: _Input, writer: asyncio.StreamWriter, connection_id: int, opened_at: float
    ) -> bool:
        record = None
        if req.path != "/_log":
            record = self.log.add(
                connection_id=connection_id,
                method=req.method,
                path=req.path,
                query=dict(req.query),
                raw_query=req.raw_query,
                headers=req.headers,
                last_event_id=lenient_last_event_id(req),
                connection_opened_at=opened_at,
                received_at=time.monotonic(),
            )
        x = Exchange(req, inp, writer, record, self.log, body_timeout=self.keepalive_timeout)
        outcome: Outcome | None = None
        keep = False
        try:
            try:
                handler = self._route(req)
                if not getattr(handler, "reads_body", False):
                    # Keep the connection in sync for keep-alive: an unexpected body is read and dropped.
                    async for _ in body_pieces(req, inp, self.keepalive_timeout):
                        pass
                    x.start_watch()
                keep = await handler(x)
                outcome = "complete"
            except BadRequest as exc:
                if x.head_sent:
                    raise ClientGone from exc  # too late for a 400: just cut
                x.keep_alive_allowed = False  # the request body may be unread: don't reuse
                await x.respond(exc.status, (str(exc) + "\n").encode(), "text/plain; charset=utf-8")
                outcome = "bad_request"
        except ClientGone:
            outcome = "client_disconnected" if x.gone.is_set() or inp.eof else "closed"
            keep = False
        except Closed:
            outcome = "closed"
            keep = False
        except LifeEnded:
            outcome = "max_life"
            keep = False
        except TimeoutError:
            outcome = "client_disconnected"
            keep = False
        except asyncio.CancelledError:
            outcome = "server_stopped"
            raise
        finally:
            await x.stop_watch()
            changes: dict[str, Any] = {"finished_at": time.monotonic(), "outcome": outcome}
            if x.gone.at is not None:
                changes["client_closed_at"] = x.gone.at
            elif inp.eof:
                changes["client_closed_at"] = time.monotonic()
            x.note(**changes)
        return keep and not inp.eof

    def _route(self, req: Request) -> Handler:
        """The handler for a request (subclasses route); raise BadRequest for none."""
        raise BadRequest(f"no such endpoint {req.path}", status=404)
