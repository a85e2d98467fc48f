"""faultproxy._mitm against the installed mitmproxy: what it relies on, and what it does on real sockets.

Two kinds of tests:

* internals: fail with a message naming the mitmproxy internal that moved (see _mitm.check_internals);
* functional: a real `mitmdump` (same venv as this interpreter) in reverse mode and in regular mode,
  with an addon script written here that drives faultproxy._mitm, in front of a small asyncio
  HTTP/1.1 origin defined here (chunked SSE, one `data: n\\n\\n` event per 50 ms). Clients: the raw
  `h2` library over TLS (frame-level assertions) and plain HTTP/1.1 sockets.

Loopback only; every wait is a poll for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hyperframe.frame import DataFrame, Frame

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from faultproxy import _mitm  # noqa: E402

MITMDUMP = Path(sys.executable).parent / "mitmdump"
LOCAL = "127.0.0.1"


def event_bytes(i: int) -> bytes:
    return b"data: %d\n\n" % i


def events_bytes(n: int, start: int = 0) -> bytes:
    return b"".join(event_bytes(i) for i in range(start, start + n))


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ==================================================================================================
# Internals: fail loudly, naming what moved


def test_internals_check_passes():
    problems = _mitm.check_internals()
    assert not problems, "mitmproxy internals faultproxy._mitm relies on have moved:\n  " + "\n  ".join(problems)


def test_version_is_parsed():
    assert _mitm.MITMPROXY_VERSION[:1] in ((11,), (12,)), (
        f"faultproxy._mitm was written against mitmproxy 11.0.2 and 12.3.1, found {_mitm.MITMPROXY_VERSION}"
    )


def test_error_code_type_matches_protocol_error_events():
    from mitmproxy.proxy.layers.http import RequestProtocolError, ResponseProtocolError

    for code in (0, 2, 7, 8, 13):
        # 12.x asserts the type in the constructors: this raises if http2_error_code gives the wrong kind.
        RequestProtocolError(1, "x", _mitm.http2_error_code(code))
    ResponseProtocolError(1, "x", _mitm.server_error_code())
    RequestProtocolError(1, "x", _mitm.client_gone_code())


def test_stream_handler_default_upstream_limit_is_what_we_raise():
    """ConnectionHandler.max_conns is the per-client-connection upstream limit raise_stream_limits changes."""
    from mitmproxy.connection import Client
    from mitmproxy.options import Options
    from mitmproxy.proxy import server
    from mitmproxy.proxy.context import Context

    class H(server.ConnectionHandler):
        async def handle_hook(self, hook):  # pragma: no cover - never called
            pass

    async def make() -> Any:
        client = Client(peername=(LOCAL, 1), sockname=(LOCAL, 2), timestamp_start=0)
        return H(Context(client, Options()))

    h = asyncio.run(make())
    sem = h.max_conns[("example", 80)]
    assert isinstance(sem, asyncio.Semaphore), (
        "mitmproxy.proxy.server.ConnectionHandler.max_conns no longer holds asyncio.Semaphore per address"
    )
    if not getattr(server.ConnectionHandler.__init__, "_faultproxy_patched", False):
        assert sem._value == _mitm.MITM_DEFAULT_UPSTREAM_CONNS, (
            f"ConnectionHandler's upstream limit changed from 5 to {sem._value}: re-check raise_stream_limits"
        )


def test_layer_dispatches_through_instance_handle_event():
    """The stream wrapper relies on Layer.handle_event calling the *instance's* _handle_event."""
    from mitmproxy.connection import Client
    from mitmproxy.options import Options
    from mitmproxy.proxy import commands, events, layer
    from mitmproxy.proxy.context import Context

    class L(layer.Layer):
        def _handle_event(self, event):
            yield commands.Log("class")

    lay = L(Context(Client(peername=(LOCAL, 1), sockname=(LOCAL, 2), timestamp_start=0), Options()))

    def patched(event):
        yield commands.Log("instance")

    lay._handle_event = patched
    out = list(lay.handle_event(events.Start()))
    assert [c.message for c in out] == ["instance"], (
        "mitmproxy.proxy.layer.Layer.handle_event no longer goes through the instance's _handle_event"
    )


def test_tunnel_layers_pass_foreign_events_down():
    """_Op events must cross the layers above the HttpLayer (TLS, mode layers) unchanged."""
    import inspect

    from mitmproxy.proxy import tunnel
    from mitmproxy.proxy.layers import modes

    src = inspect.getsource(tunnel.TunnelLayer._handle_event)
    assert "yield from self.event_to_child(event)" in src.split("else:")[-1], (
        "mitmproxy.proxy.tunnel.TunnelLayer._handle_event no longer forwards non-connection events to its child"
    )
    assert "self._handle_event = self.child_layer.handle_event" in inspect.getsource(modes.DestinationKnown.finish_start), (
        "mitmproxy.proxy.layers.modes.DestinationKnown no longer hands all events to its child after start"
    )


def test_h2_goaway_frame_builds():
    from hyperframe.frame import GoAwayFrame

    raw = GoAwayFrame(0, last_stream_id=5, error_code=2, additional_data=b"x").serialize()
    assert raw[3] == 0x7 and raw[9:13] == (5).to_bytes(4, "big") and raw[13:17] == (2).to_bytes(4, "big")


# ==================================================================================================
# The origin: asyncio HTTP/1.1 in a thread


@dataclass
class Rec:
    tag: str
    path: str
    connected_at: float = 0.0
    eof_at: float | None = None
    sent: list[tuple[float, int]] = field(default_factory=list)
    progress: list[tuple[float, int]] = field(default_factory=list)
    body: bytes = b""
    finished: bool = False


class Origin:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.records: dict[str, Rec] = {}
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="origin", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("origin did not start")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def rec(self, tag: str, timeout: float = 5.0) -> Rec:
        return wait_for(lambda: self.records.get(tag), timeout, f"origin request {tag}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, LOCAL, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        url = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        rec = Rec(tag=q.get("id", uuid.uuid4().hex), path=url.path, connected_at=time.monotonic())
        self.records[rec.tag] = rec
        try:
            if method == "POST":
                rec.body = await self._read_body(reader, headers)
            watcher = asyncio.ensure_future(self._watch_eof(reader, rec))
            if url.path == "/sse":
                await self._sse(writer, rec, int(q.get("n", "20")), float(q.get("interval", "0.05")))
            elif url.path == "/slow":
                await asyncio.wait([watcher], timeout=float(q.get("delay", "3")))
                if rec.eof_at is None:
                    await self._small(writer, b"slow answer")
            elif url.path == "/bulk":
                await self._bulk(writer, rec, int(q["size"]))
            elif url.path == "/upload":
                info = {"len": len(rec.body), "sha256": hashlib.sha256(rec.body).hexdigest()}
                await self._small(writer, json.dumps(info).encode(), "application/json")
            else:
                await self._small(writer, b"hello", status="404 Not Found")
            # "finished": the whole response went out before the peer went away
            rec.finished = rec.eof_at is None
            await asyncio.wait([watcher], timeout=2)
            watcher.cancel()
        except (ConnectionError, OSError):
            if rec.eof_at is None:
                rec.eof_at = time.monotonic()
        finally:
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        body = b""
        while "chunked" in headers.get("transfer-encoding", ""):
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return body

    async def _watch_eof(self, reader: asyncio.StreamReader, rec: Rec) -> None:
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        rec.eof_at = time.monotonic()

    async def _small(self, writer, body: bytes, ctype: str = "text/plain", status: str = "200 OK") -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _sse(self, writer, rec: Rec, n: int, interval: float) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        for i in range(n):
            if rec.eof_at is not None:
                return
            ev = event_bytes(i)
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await writer.drain()
            rec.sent.append((time.monotonic(), i))
            await asyncio.sleep(interval)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _bulk(self, writer, rec: Rec, size: int) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
            f"Connection: close\r\n\r\n".encode()
        )
        total = 0
        block = bulk_block()
        rec.progress.append((time.monotonic(), 0))
        while total < size:
            chunk = block[: min(len(block), size - total)]
            writer.write(chunk)
            await writer.drain()
            total += len(chunk)
            rec.progress.append((time.monotonic(), total))


def bulk_block() -> bytes:
    return bytes(random.Random(7).randbytes(64 * 1024))


def bulk_bytes(size: int) -> bytes:
    block = bulk_block()
    return (block * (size // len(block) + 1))[:size]


# ==================================================================================================
# Clients


class H1Client:
    """HTTP/1.1 over a plain socket; keeps everything received, with arrival times."""

    def __init__(self, port: int, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection((LOCAL, port), timeout=5)
        self.buf = b""
        self.arrivals: list[tuple[float, int]] = []  # (time, len(buf) after the read)
        self.eof = False
        self.error: BaseException | None = None

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def get(self, path: str) -> None:
        self.send(f"GET {path} HTTP/1.1\r\nHost: origin.test\r\nAccept: text/event-stream\r\n\r\n".encode())

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not until():
            if self.eof or self.error is not None:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                self.error = e
                continue
            if not data:
                self.eof = True
                continue
            self.buf += data
            self.arrivals.append((time.monotonic(), len(self.buf)))
        return True

    @property
    def head(self) -> bytes:
        return self.buf.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in self.buf else b""

    @property
    def raw_body(self) -> bytes:
        return self.buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.buf else b""

    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode()
        return None

    def chunks(self) -> tuple[list[bytes], bool]:
        """Decoded chunks of a chunked body so far, and whether the terminating 0-chunk was seen."""
        data, out, pos = self.raw_body, [], 0
        while True:
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                return out, False
            size = int(data[pos:nl].split(b";")[0], 16)
            if size == 0:
                return out, data[nl + 2 : nl + 4] == b"\r\n"
            if len(data) < nl + 2 + size + 2:
                return out, False
            out.append(data[nl + 2 : nl + 2 + size])
            pos = nl + 2 + size + 2

    def body(self) -> bytes:
        return b"".join(self.chunks()[0])

    def close(self) -> None:
        self.sock.close()


def tls_context(alpn: list[str]) -> ssl.SSLContext:
    tctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tctx.check_hostname = False
    tctx.verify_mode = ssl.CERT_NONE
    tctx.set_alpn_protocols(alpn)
    return tctx


@dataclass
class RawData:
    """A DATA frame after GOAWAY. The h2 library's state machine closes on a received GOAWAY and
    rejects every later frame, while real clients (Chromium) go on with streams <= last_stream_id."""

    stream_id: int
    data: bytes
    end_stream: bool


DATA = (h2.events.DataReceived, RawData)


class H2Client:
    """The h2 library over TLS (ALPN h2), recording every h2 event with its arrival time."""

    def __init__(self, port: int, sni: str = "localhost") -> None:
        raw = socket.create_connection((LOCAL, port), timeout=5)
        self.sock = tls_context(["h2"]).wrap_socket(raw, server_hostname=sni)
        assert self.sock.selected_alpn_protocol() == "h2", "proxy did not negotiate h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.log: list[tuple[float, Any]] = []
        self.closed_at: float | None = None
        self.rbuf = b""
        self.after_goaway = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def get(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "https"), (":authority", "origin.test"), (":path", path)],
            end_stream=True,
        )
        self.flush()
        return sid

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed_at is not None:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed_at = time.monotonic()
                continue
            now = time.monotonic()
            self.rbuf += data
            # one frame at a time, so that frames after a GOAWAY can be taken apart by hand
            while len(self.rbuf) >= 9:
                end = 9 + int.from_bytes(self.rbuf[:3], "big")
                if len(self.rbuf) < end:
                    break
                frame, self.rbuf = self.rbuf[:end], self.rbuf[end:]
                self._frame(frame, now)
            if not self.after_goaway:
                self.flush()
        return True

    def _frame(self, frame: bytes, now: float) -> None:
        if self.after_goaway:
            f, _ = Frame.parse_frame_header(memoryview(frame[:9]))
            f.parse_body(memoryview(frame[9:]))
            if isinstance(f, DataFrame):
                self.log.append((now, RawData(f.stream_id, bytes(f.data), "END_STREAM" in f.flags)))
            return
        for ev in self.conn.receive_data(frame):
            self.log.append((now, ev))
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.after_goaway = True

    # --- views on the log ---
    def of(self, sid: int, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.log if isinstance(e, kind) and getattr(e, "stream_id", None) == sid]

    def data(self, sid: int) -> bytes:
        return b"".join(e.data for _, e in self.of(sid, DATA))

    def headers(self, sid: int) -> dict[str, str]:
        got = self.of(sid, h2.events.ResponseReceived)
        return dict(got[0][1].headers) if got else {}

    def reset(self, sid: int) -> tuple[float, Any] | None:
        got = self.of(sid, h2.events.StreamReset)
        return got[0] if got else None

    def ended(self, sid: int) -> bool:
        return bool(self.of(sid, h2.events.StreamEnded))

    def goaway(self) -> tuple[float, Any] | None:
        got = [(t, e) for t, e in self.log if isinstance(e, h2.events.ConnectionTerminated)]
        return got[0] if got else None

    def close(self) -> None:
        self.sock.close()


# ==================================================================================================
# The proxy: mitmdump with an addon script that drives faultproxy._mitm by query parameters

ADDON = r'''
"""Test addon: per-request scenarios chosen by the query string (fp=...), results to FP_RESULTS."""
import asyncio
import dataclasses
import json
import os
import time

from mitmproxy import ctx, http

from faultproxy import _mitm

RESULTS = os.environ["FP_RESULTS"]
TASKS = set()


def record(tag, **kw):
    kw["tag"] = tag
    kw["t"] = time.monotonic()
    with open(RESULTS, "a") as f:
        f.write(json.dumps(kw) + "\n")


def spawn(coro):
    t = asyncio.get_running_loop().create_task(coro)
    TASKS.add(t)
    t.add_done_callback(TASKS.discard)
    return t


def q(flow, name, default=None):
    return flow.request.query.get(name, default)


class Relay:
    """Upstream diverted into a queue; one pump task feeds it back through the handle, in order."""

    def __init__(self, flow, handle, tick=None):
        self.flow, self.h, self.tag = flow, handle, q(flow, "id")
        self.queue = asyncio.Queue()
        self.count = 0
        self.tick = tick
        handle.divert_upstream(self.queue.put_nowait)
        spawn(self.pump())

    async def on_data(self):
        pass

    async def pump(self):
        try:
            if self.tick:
                await self.pump_ticked()
                return
            while True:
                ev = await self.queue.get()
                if isinstance(ev, _mitm.UpstreamHeaders):
                    await self.h.send_headers()
                elif isinstance(ev, _mitm.UpstreamData):
                    if not await self.h.send_data(ev.data):
                        return
                    self.count += 1
                    if await self.on_data():
                        return
                elif isinstance(ev, _mitm.UpstreamEnd):
                    await self.h.send_end()
                    return
                elif isinstance(ev, _mitm.UpstreamError):
                    await self.h.send_error(ev.message)
                    return
        except Exception as e:
            record(self.tag, event="addon-error", msg=repr(e))
            raise

    async def pump_ticked(self):
        # send_data / send_end on our own clock: every `tick`, forward what arrived since the last tick.
        done, sent_headers, buf = False, False, []
        while True:
            await asyncio.sleep(self.tick)
            while not self.queue.empty():
                ev = self.queue.get_nowait()
                if isinstance(ev, _mitm.UpstreamHeaders):
                    continue
                if isinstance(ev, _mitm.UpstreamData):
                    buf.append(ev.data)
                elif isinstance(ev, (_mitm.UpstreamEnd, _mitm.UpstreamError)):
                    done = True
            if not sent_headers and self.h._st.held_headers is not None:
                sent_headers = await self.h.send_headers()
            if sent_headers:
                for chunk in buf:
                    await self.h.send_data(chunk)
                buf = []
                if done:
                    await self.h.send_end()
                    record(self.tag, event="ticked-end")
                    return


class ResetAfter(Relay):
    async def on_data(self):
        if self.count == int(q(self.flow, "after", "3")):
            ok = await self.h.reset_stream(int(q(self.flow, "code")))
            record(self.tag, event="reset", ok=ok, alive=self.h.alive)
            return ok  # refused (HTTP/1 client): keep relaying


class GoawayAfter(Relay):
    async def on_data(self):
        if self.count == int(q(self.flow, "after", "3")):
            last = q(self.flow, "last")
            spawn(self.goaway(None if last is None else int(last)))

    async def goaway(self, last):
        record(self.tag, event="goaway-start")
        ok = await self.h.goaway(
            int(q(self.flow, "code")), last, q(self.flow, "debug", "").encode(), float(q(self.flow, "grace", "0"))
        )
        record(self.tag, event="goaway", ok=ok, last=self.h.goaway_last_stream_id)


class CloseAfter(Relay):
    async def on_data(self):
        if self.count == int(q(self.flow, "after", "3")):
            await self.h.close_client(reset=q(self.flow, "reset") == "1")
            record(self.tag, event="closed", alive=self.h.alive)
            return True


class ErrorAfter(Relay):
    async def on_data(self):
        if self.count == int(q(self.flow, "after", "2")):
            ok = await self.h.send_error("faultproxy test: upstream broke")
            record(self.tag, event="send_error", ok=ok, alive=self.h.alive)
            return True


class RaceAtEnd(Relay):
    """At the upstream's end: end the stream and, in the same moment, inject more and reset/goaway."""

    async def pump(self):
        while True:
            ev = await self.queue.get()
            if isinstance(ev, _mitm.UpstreamHeaders):
                await self.h.send_headers()
            elif isinstance(ev, _mitm.UpstreamData):
                await self.h.send_data(ev.data)
            elif isinstance(ev, _mitm.UpstreamEnd):
                results = await asyncio.gather(
                    self.h.send_end(), self.h.send_data(b"late"), self.h.send_end(), self.h.send_headers()
                )
                later = [await self.h.send_data(b"later"), await self.h.reset_stream(2), self.h.alive]
                record(self.tag, event="race", results=list(results), later=later)
                return


class PauseAfter(Relay):
    async def on_data(self):
        if self.count == int(q(self.flow, "after", "2")):
            self.h.pause_upstream()
            record(self.tag, event="paused")
            spawn(self.resume_later())

    async def resume_later(self):
        await asyncio.sleep(float(q(self.flow, "pause_for", "0.6")))
        self.h.resume_upstream()
        record(self.tag, event="resumed")


class Addon:
    def __init__(self):
        self.trailers = {}

    def running(self):
        _mitm.install(ctx.options)
        spawn(self.write_ports())

    async def write_ports(self):
        ps = ctx.master.addons.get("proxyserver")
        for _ in range(500):
            addrs = {type(s.mode).__name__: s.listen_addrs for s in ps.servers}
            if addrs and all(addrs.values()):
                with open(os.environ["FP_PORTS"] + ".tmp", "w") as f:
                    json.dump({k: v[0][1] for k, v in addrs.items()}, f)
                os.replace(os.environ["FP_PORTS"] + ".tmp", os.environ["FP_PORTS"])
                return
            await asyncio.sleep(0.01)

    def tls_start_client(self, data):
        if data.context.client.sni == "h1only.test":
            record("alpn", event="set_client_alpn", ok=_mitm.set_client_alpn(data))

    def requestheaders(self, flow):
        fp = q(flow, "fp")
        if not fp:
            return
        h = _mitm.FlowHandle.find(flow)
        tag = q(flow, "id")
        record(tag, event="found", found=h is not None, h2=getattr(h, "client_is_http2", None),
               stream_id=getattr(h, "stream_id", None))
        if h is None:
            return
        if fp == "timer":
            Relay(flow, h, tick=float(q(flow, "tick", "0.03")))
        elif fp == "relay":
            Relay(flow, h)
        elif fp == "reset":
            ResetAfter(flow, h)
        elif fp == "goaway":
            GoawayAfter(flow, h)
        elif fp == "close":
            CloseAfter(flow, h)
        elif fp == "pause":
            PauseAfter(flow, h)
        elif fp == "error":
            ErrorAfter(flow, h)
        elif fp == "race":
            RaceAtEnd(flow, h)
        elif fp == "stall":
            h.divert_upstream(lambda ev: None)
            spawn(self.stall(h, tag))
        elif fp == "bulkpause":
            h.pause_upstream()  # before the upstream connection exists: applied when it answers
            spawn(self.resume_later(h, tag, float(q(flow, "pause_for", "0.8"))))
        elif fp == "synth":
            self.trailers[tag] = q(flow, "trailers") == "1"
            h.divert_upstream(lambda ev: None)
            spawn(self.synth(h, tag))
        elif fp == "upload":
            flow.request.stream = True
            queue = asyncio.Queue()
            h.divert_request(queue.put_nowait)
            spawn(self.upload(h, tag, queue))

    async def stall(self, h, tag):
        await h.send_headers(http.Response.make(200, b"", {"content-type": "text/event-stream"}), stream=True)
        record(tag, event="stalling")
        await h.wait_client_closed()
        record(tag, event="client-gave-up", alive=h.alive)
        await h.close_upstream()

    async def resume_later(self, h, tag, delay):
        await asyncio.sleep(delay)
        record(tag, event="resumed", paused=h.upstream_paused)
        h.resume_upstream()

    async def synth(self, h, tag):
        await asyncio.sleep(0.1)
        r = http.Response.make(504, b"", {"content-type": "text/plain"})
        del r.headers["content-length"]  # make() says 0; the body is streamed after the headers
        ok = [await h.send_headers(r, stream=True)]
        ok.append(await h.send_data(b"faultproxy: gateway timeout"))
        ok.append(await h.send_end(http.Headers(x_fp_trailer="yes") if self.trailers.get(tag) else None))
        record(tag, event="synth", ok=ok)

    async def upload(self, h, tag, queue):
        pieces = 0
        while True:
            ev = await queue.get()
            if isinstance(ev, _mitm.ClientData):
                for i in range(0, len(ev.data), 4096):
                    await h.send_request_data(ev.data[i : i + 4096])
                    pieces += 1
                    await asyncio.sleep(0.002)
            elif isinstance(ev, _mitm.ClientEnd):
                ok = await h.send_request_end()
                record(tag, event="upload", pieces=pieces, ok=ok)
                return

    async def request(self, flow):
        if q(flow, "fp") == "refuse":
            # From inside the request hook: end the exchange before it goes upstream.
            h = _mitm.FlowHandle.find(flow)
            done = await h.refuse(int(q(flow, "code", "7")), reset=q(flow, "reset") == "1")
            record(q(flow, "id"), event="refused", done=done, frame=h.last_frame)
            return
        if q(flow, "fp") != "inhook":
            return
        # awaited from inside this flow's own request hook: must not wait for the hook (deadlock)
        h = _mitm.FlowHandle.find(flow)
        h.divert_upstream(lambda ev: None)
        r = http.Response.make(200, b"", {"content-type": "text/plain"})
        del r.headers["content-length"]
        ok = [await h.send_headers(r, stream=True), await h.send_data(b"from the hook"), await h.send_end()]
        record(q(flow, "id"), event="inhook", ok=ok)

    def responseheaders(self, flow):
        flow.response.stream = True
        if _mitm.FlowHandle.injecting(flow):
            flow.response.headers["x-fp-injected"] = "1"

    def error(self, flow):
        record(q(flow, "id"), event="error", msg=flow.error.msg if flow.error else None)

    def response(self, flow):
        record(q(flow, "id"), event="response", status=flow.response.status_code)


addons = [Addon()]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


class Proxy:
    def __init__(self, workdir: Path, origin: Origin) -> None:
        self.dir = workdir
        self.results = workdir / "results.jsonl"
        self.results.touch()
        self.log = workdir / "mitmdump.log"
        script = workdir / "addon.py"
        script.write_text(ADDON)
        ports = workdir / "ports.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FP_RESULTS"] = str(self.results)
        env["FP_PORTS"] = str(ports)
        cmd = [
            str(MITMDUMP),
            "--mode", f"reverse:http://{LOCAL}:{origin.port}@{LOCAL}:{free_port()}",
            "--mode", f"regular@{LOCAL}:{free_port()}",
            "--set", f"confdir={workdir / 'conf'}",
            "--set", "flow_detail=0",
            "-s", str(script),
        ]  # fmt: skip
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._logf, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            wait_for(lambda: ports.exists() or self.proc.poll() is not None, 30, "mitmdump to listen")
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited:\n{self.log.read_text()}")
        except BaseException:
            self.stop()
            raise
        got = json.loads(ports.read_text())
        self.reverse = got["ReverseMode"]
        self.regular = got["RegularMode"]

    def entries(self, tag: str) -> list[dict]:
        out = []
        for line in self.results.read_text().splitlines():
            d = json.loads(line)
            if d["tag"] == tag:
                out.append(d)
        return out

    def entry(self, tag: str, event: str, timeout: float = 5.0) -> dict:
        def find() -> dict | None:
            return next((e for e in self.entries(tag) if e["event"] == event), None)

        return wait_for(find, timeout, f"addon event {event!r} for {tag}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()


@pytest.fixture(scope="module")
def origin():
    o = Origin()
    o.start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def proxy(origin, tmp_path_factory):
    p = Proxy(tmp_path_factory.mktemp("mitmdump"), origin)
    yield p
    p.stop()


def tag() -> str:
    return uuid.uuid4().hex[:12]


def assert_upstream_closed(origin: Origin, t: str, within: float = 3.0) -> float:
    rec = origin.rec(t)
    wait_for(lambda: rec.eof_at is not None, within, f"origin to see EOF on the upstream connection of {t}")
    assert not rec.finished, "the origin finished its response: the upstream was not cut"
    return rec.eof_at  # type: ignore[return-value]


# ==================================================================================================
# Functional tests


def test_find_reports_protocol_and_stream(proxy, origin):
    t1, t2 = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        sid = c.get(f"/sse?n=2&fp=relay&id={t1}")
        assert c.pump(lambda: c.ended(sid), 5), "relay over h2 did not end"
        found = proxy.entry(t1, "found")
        assert found == {**found, "found": True, "h2": True, "stream_id": sid}
    finally:
        c.close()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=2&fp=relay&id={t2}")
        assert h.pump(lambda: h.chunks()[1], 5)
        found = proxy.entry(t2, "found")
        assert found["found"] is True and found["h2"] is False
        assert h.body() == events_bytes(2)
    finally:
        h.close()


def test_timer_driven_send_data_h2(proxy, origin):
    t = tag()
    c = H2Client(proxy.reverse)
    try:
        sid = c.get(f"/sse?n=10&fp=timer&tick=0.03&id={t}")
        assert c.pump(lambda: c.ended(sid) or c.reset(sid), 6), "stream did not end"
        assert c.reset(sid) is None
        assert c.headers(sid).get(":status") == "200"
        assert c.headers(sid).get("x-fp-injected") == "1", "responseheaders did not see FlowHandle.injecting()"
        assert c.data(sid) == events_bytes(10)
        assert len(c.of(sid, DATA)) >= 4, "the body did not arrive in several timed pieces"
        proxy.entry(t, "ticked-end")
        proxy.entry(t, "response")
    finally:
        c.close()


def test_timer_driven_send_data_h1(proxy, origin):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=10&fp=timer&tick=0.03&id={t}")
        assert h.pump(lambda: h.chunks()[1], 6), "no terminating chunk"
        assert h.status() == 200 and h.header("x-fp-injected") == "1"
        assert h.body() == events_bytes(10)
    finally:
        h.close()


def test_timer_driven_send_data_through_connect_tunnel(proxy, origin):
    """Regular mode: HttpLayer > CONNECT stream > HttpLayer; injected events cross the outer layer."""
    t = tag()
    h = H1Client(proxy.regular)
    try:
        h.send(f"CONNECT {LOCAL}:{origin.port} HTTP/1.1\r\nHost: {LOCAL}:{origin.port}\r\n\r\n".encode())
        assert h.pump(lambda: b"\r\n\r\n" in h.buf, 5) and b" 200 " in h.buf.split(b"\r\n")[0]
        h.buf = b""
        h.get(f"/sse?n=6&fp=timer&tick=0.03&id={t}")
        assert h.pump(lambda: h.chunks()[1], 6), "no terminating chunk through the tunnel"
        assert h.header("x-fp-injected") == "1"
        assert h.body() == events_bytes(6)
    finally:
        h.close()


def test_synthesized_response_before_upstream_answers(proxy, origin):
    t = tag()
    c = H2Client(proxy.reverse)
    try:
        start = time.monotonic()
        sid = c.get(f"/slow?delay=4&fp=synth&id={t}")
        assert c.pump(lambda: c.ended(sid) or c.reset(sid), 3)
        assert time.monotonic() - start < 2, "the synthesized answer waited for the upstream"
        assert c.headers(sid).get(":status") == "504"
        assert c.headers(sid).get("x-fp-injected") == "1"
        assert c.data(sid) == b"faultproxy: gateway timeout"
        assert proxy.entry(t, "synth")["ok"] == [True, True, True]
        assert_upstream_closed(origin, t)  # send_end aborts the orphaned upstream exchange
    finally:
        c.close()


def test_send_end_with_trailers(proxy, origin):
    t1, t2 = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        sid = c.get(f"/slow?delay=4&fp=synth&trailers=1&id={t1}")
        assert c.pump(lambda: c.ended(sid), 3)
        trailers = c.of(sid, h2.events.TrailersReceived)
        assert trailers and dict(trailers[0][1].headers) == {"x-fp-trailer": "yes"}
        assert c.data(sid) == b"faultproxy: gateway timeout"
    finally:
        c.close()
    h = H1Client(proxy.reverse)  # HTTP/1: mitmproxy cannot send trailers; they are dropped, the body ends
    try:
        h.get(f"/slow?delay=4&fp=synth&trailers=1&id={t2}")
        assert h.pump(lambda: h.eof, 3)  # no length, not chunked: read until close
        assert h.status() == 504 and h.raw_body == b"faultproxy: gateway timeout"
        assert proxy.entry(t2, "synth")["ok"] == [True, True, True]
    finally:
        h.close()


@pytest.mark.parametrize("code", [2, 8, 7, 0, 13], ids=lambda c: h2.errors.ErrorCodes(c).name)
def test_reset_stream_code_on_one_stream_only(proxy, origin, code):
    ta, tb = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        a = c.get(f"/sse?n=20&fp=reset&code={code}&after=3&id={ta}")
        b = c.get(f"/sse?n=14&id={tb}")
        assert c.pump(lambda: c.reset(a) is not None, 5), "no RST_STREAM on the faulted stream"
        t_rst, rst = c.reset(a)
        assert rst.error_code == code, f"RST_STREAM code {rst.error_code}, wanted {code}"
        assert c.data(a) == events_bytes(3), "the faulted stream did not get exactly the data sent before the reset"
        last_data_at = c.of(a, DATA)[-1][0]
        assert t_rst - last_data_at >= 0.03, f"RST_STREAM only {t_rst - last_data_at:.3f}s after the last DATA"
        # the other stream on the same connection carries on to its end
        assert c.pump(lambda: c.ended(b), 5), "the other stream stopped"
        assert c.reset(b) is None and c.data(b) == events_bytes(14)
        assert any(t > t_rst for t, _ in c.of(b, DATA)), "no data on the other stream after the reset"
        assert c.goaway() is None and c.closed_at is None
        assert proxy.entry(ta, "reset")["ok"] is True
        err = proxy.entry(ta, "error")["msg"]
        assert err == f"stream reset by faultproxy ({h2.errors.ErrorCodes(code).name})"
        assert_upstream_closed(origin, ta)
        wait_for(lambda: origin.rec(tb).finished, 2, "the other stream's origin response to finish")
    finally:
        c.close()


def test_refuse_from_the_request_hook_h2(proxy, origin):
    """RST_STREAM(REFUSED_STREAM) with no HEADERS; the request never reaches the origin; other streams go on."""
    ta, tb = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        a = c.get(f"/sse?n=5&fp=refuse&id={ta}")
        b = c.get(f"/sse?n=4&id={tb}")
        assert c.pump(lambda: c.reset(a) is not None and c.ended(b), 5)
        assert c.reset(a)[1].error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        assert c.headers(a) == {} and c.data(a) == b"", "nothing before the RST_STREAM"
        assert c.data(b) == events_bytes(4) and c.goaway() is None
        got = proxy.entry(ta, "refused")
        assert got["done"] == "rst_stream"
        assert got["frame"] == {"frame": "RST_STREAM", "code": 7, "code_name": "REFUSED_STREAM", "stream_id": a}
        assert proxy.entry(ta, "error")["msg"] == "refused by faultproxy (RST_STREAM REFUSED_STREAM)"
        time.sleep(0.2)
        assert ta not in origin.records, "the request reached the origin"
    finally:
        c.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_refuse_from_the_request_hook_h1(proxy, origin, reset):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=5&fp=refuse&reset={int(reset)}&id={t}")
        assert h.pump(lambda: h.eof or h.error is not None, 5), "the connection stayed open"
        assert h.buf == b"", f"a response byte arrived: {h.buf[:100]!r}"
        if reset:
            assert isinstance(h.error, ConnectionResetError), f"wanted ECONNRESET, got error={h.error!r} eof={h.eof}"
        else:
            assert h.eof and h.error is None
        got = proxy.entry(t, "refused")
        assert got["done"] == ("reset" if reset else "close") and got["frame"] is None
        time.sleep(0.2)
        assert t not in origin.records, "the request reached the origin"
    finally:
        h.close()


def test_reset_stream_refused_for_http1_client(proxy, origin):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=8&fp=reset&code=2&after=2&id={t}")
        got = proxy.entry(t, "reset")
        assert got["ok"] is False and got["alive"] is True
        assert h.pump(lambda: h.chunks()[1], 5)  # nothing happened to the stream
        assert h.body() == events_bytes(8)
    finally:
        h.close()


def test_goaway_default_last_stream_then_close_after_grace(proxy, origin):
    ta, tb = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        a = c.get(f"/sse?n=60&fp=goaway&code=2&after=3&grace=0.6&debug=bye&id={ta}")
        b = c.get(f"/sse?n=60&id={tb}")
        assert c.pump(lambda: c.goaway() is not None, 5), "no GOAWAY"
        t_ga, ga = c.goaway()
        assert a < b and ga.error_code == 2 and ga.last_stream_id == b and ga.additional_data == b"bye"
        assert c.pump(lambda: c.closed_at is not None, 3), "the connection was not closed after the grace period"
        assert 0.5 <= c.closed_at - t_ga <= 2.0, f"closed {c.closed_at - t_ga:.2f}s after GOAWAY, grace was 0.6s"
        after = [t for t, _ in c.of(b, DATA) if t > t_ga]
        assert len(after) >= 4, "the stream below last_stream_id did not go on during the grace period"
        got = proxy.entry(ta, "goaway")
        assert got["ok"] is True and got["last"] == b
        assert_upstream_closed(origin, ta)
        assert_upstream_closed(origin, tb)
    finally:
        c.close()


def test_goaway_explicit_last_stream_id_ends_higher_streams(proxy, origin):
    ta, tb = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        a = c.get(f"/sse?n=60&fp=goaway&code=0&after=3&last=1&grace=0.4&id={ta}")
        b = c.get(f"/sse?n=60&id={tb}")
        assert a == 1
        assert c.pump(lambda: c.goaway() is not None, 5), "no GOAWAY"
        t_ga, ga = c.goaway()
        assert ga.error_code == 0 and ga.last_stream_id == 1 and ga.additional_data in (b"", None)
        # the stream above last_stream_id is ended on the proxy side: flow error, upstream aborted
        assert "last_stream_id=1" in proxy.entry(tb, "error")["msg"]
        assert c.pump(lambda: c.closed_at is not None, 3)
        assert not [t for t, _ in c.of(b, DATA) if t > t_ga], "the stream above last_stream_id still got data"
        eof_b = assert_upstream_closed(origin, tb, within=2)
        eof_a = assert_upstream_closed(origin, ta)
        assert eof_b < eof_a, "the stream above last_stream_id was not ended before the close"
        assert 0.3 <= c.closed_at - t_ga <= 2.0
    finally:
        c.close()


def test_close_client_reset_gives_econnreset_to_http1(proxy, origin):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=40&fp=close&reset=1&after=3&id={t}")
        assert h.pump(lambda: h.error is not None or h.eof, 5), "connection neither reset nor closed"
        assert isinstance(h.error, ConnectionResetError), f"wanted ECONNRESET, got error={h.error!r} eof={h.eof}"
        chunks, complete = h.chunks()
        assert not complete and b"".join(chunks) == events_bytes(3)[: len(b"".join(chunks))]
        assert_upstream_closed(origin, t)
    finally:
        h.close()


def test_close_client_fin_truncates_chunked_body(proxy, origin):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=40&fp=close&reset=0&after=3&id={t}")
        assert h.pump(lambda: h.eof, 5), "no FIN"
        assert h.error is None
        chunks, complete = h.chunks()
        assert not complete, "the body ended with a terminating chunk: not truncated"
        assert b"".join(chunks) == events_bytes(3)
        assert proxy.entry(t, "closed")["alive"] is False
        assert_upstream_closed(origin, t)
    finally:
        h.close()


def test_close_client_through_connect_tunnel(proxy, origin):
    t = tag()
    h = H1Client(proxy.regular)
    try:
        h.send(f"CONNECT {LOCAL}:{origin.port} HTTP/1.1\r\nHost: {LOCAL}:{origin.port}\r\n\r\n".encode())
        assert h.pump(lambda: b"\r\n\r\n" in h.buf, 5)
        h.buf = b""
        h.get(f"/sse?n=40&fp=close&reset=0&after=2&id={t}")
        assert h.pump(lambda: h.eof, 5)
        assert h.chunks() == ([event_bytes(0), event_bytes(1)], False)
        assert_upstream_closed(origin, t)
    finally:
        h.close()


def test_pause_and_resume_upstream(proxy, origin):
    t = tag()
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/sse?n=14&interval=0.05&fp=pause&after=2&pause_for=0.6&id={t}")
        assert h.pump(lambda: h.chunks()[1], 6)
        assert h.body() == events_bytes(14)
        paused = proxy.entry(t, "paused")["t"]
        resumed = proxy.entry(t, "resumed")["t"]
        assert 0.55 <= resumed - paused <= 1.5
        # the client saw a hole of about the pause while the origin kept writing on schedule
        arrivals = [a for a, _ in h.arrivals]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert max(gaps) >= 0.45, f"no pause visible to the client (largest gap {max(gaps):.3f}s)"
        start_of_gap = arrivals[gaps.index(max(gaps))]
        written_in_gap = [i for ts, i in origin.rec(t).sent if start_of_gap < ts < start_of_gap + max(gaps)]
        assert len(written_in_gap) >= 5, "the origin did not keep writing: the pause was not on the proxy's read side"
    finally:
        h.close()


def test_pause_upstream_gives_tcp_backpressure(proxy, origin):
    t = tag()
    size = 8 << 20
    h = H1Client(proxy.reverse)
    try:
        h.get(f"/bulk?size={size}&fp=bulkpause&pause_for=0.8&id={t}")
        rec = origin.rec(t)
        wait_for(lambda: rec.progress, 5, "the origin to start writing")
        t0 = rec.progress[0][0]
        resumed = proxy.entry(t, "resumed", timeout=5)
        assert resumed["paused"] is True
        wait_for(lambda: time.monotonic() > t0 + 0.5, 2, "half a second")
        written = max(n for ts, n in rec.progress if ts <= t0 + 0.5)
        assert written < 4 << 20, f"origin wrote {written} bytes while the proxy was not reading"
        assert h.pump(lambda: len(h.raw_body) >= size, 15), f"only {len(h.raw_body)} of {size} bytes arrived"
        assert h.raw_body == bulk_bytes(size)
    finally:
        h.close()


def test_divert_request_and_feed_it_on(proxy, origin):
    t = tag()
    body = random.Random(3).randbytes(150_000)
    h = H1Client(proxy.reverse)
    try:
        h.send(
            f"POST /upload?fp=upload&id={t} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert h.pump(lambda: len(h.raw_body) >= int(h.header("content-length") or 1 << 30), 10)
        got = json.loads(h.raw_body)
        assert got == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        up = proxy.entry(t, "upload")
        assert up["ok"] is True and up["pieces"] >= len(body) // 4096
    finally:
        h.close()


def test_a_dozen_sse_streams_over_one_h2_connection(proxy, origin):
    """mitmproxy's per-client-connection upstream semaphore (5) makes streams 6-12 wait for earlier ones
    to end (endless SSE: forever). Measured without raise_stream_limits: upstreams start in waves of 5."""
    tags = [tag() for _ in range(12)]
    c = H2Client(proxy.reverse)
    try:
        sids = [c.get(f"/sse?n=8&id={t}") for t in tags]
        assert c.pump(lambda: all(c.ended(s) for s in sids), 8), (
            f"streams without end: {[s for s in sids if not c.ended(s)]}"
        )
        for s in sids:
            assert c.data(s) == events_bytes(8)
        starts = sorted(origin.rec(t).connected_at for t in tags)
        assert starts[-1] - starts[0] < 0.3, "some streams only started after others had finished"
    finally:
        c.close()


def test_send_error_ends_stream_like_an_upstream_failure(proxy, origin):
    ta, tb = tag(), tag()
    c = H2Client(proxy.reverse)
    try:
        a = c.get(f"/sse?n=30&fp=error&after=2&id={ta}")
        b = c.get(f"/sse?n=8&id={tb}")
        assert c.pump(lambda: c.reset(a) is not None and c.ended(b), 5)
        assert c.reset(a)[1].error_code == h2.errors.ErrorCodes.INTERNAL_ERROR  # what mitmproxy sends itself
        assert c.data(a) == events_bytes(2) and c.data(b) == events_bytes(8)
        assert proxy.entry(ta, "send_error") == {**proxy.entry(ta, "send_error"), "ok": True, "alive": False}
        assert proxy.entry(ta, "error")["msg"] == "faultproxy test: upstream broke"
        assert_upstream_closed(origin, ta)
    finally:
        c.close()


def test_injecting_from_inside_the_flows_own_hook_does_not_deadlock(proxy, origin):
    t = tag()
    c = H2Client(proxy.reverse)
    try:
        sid = c.get(f"/sse?n=40&fp=inhook&id={t}")
        assert c.pump(lambda: c.ended(sid), 5)
        assert c.headers(sid).get("x-fp-injected") == "1"
        assert c.data(sid) == b"from the hook"
        assert proxy.entry(t, "inhook")["ok"] == [True, True, True]  # queued behind the hook
        assert_upstream_closed(origin, t)
    finally:
        c.close()


def test_race_with_a_finishing_stream_is_harmless(proxy, origin):
    """Injections racing the stream's end: one end wins, the rest answer False, nothing crashes."""
    t = tag()
    c = H2Client(proxy.reverse)
    try:
        sid = c.get(f"/sse?n=3&interval=0.01&fp=race&id={t}")
        assert c.pump(lambda: c.ended(sid), 5)
        assert c.data(sid) == events_bytes(3)
        got = proxy.entry(t, "race")
        assert got["results"] == [True, False, False, False], got
        assert got["later"] == [False, False, False], got
    finally:
        c.close()


@pytest.mark.parametrize("how", ["h2-rst-stream", "h1-close"])
def test_wait_client_closed(proxy, origin, how):
    t = tag()
    if how == "h2-rst-stream":
        c = H2Client(proxy.reverse)
        sid = c.get(f"/sse?n=100&fp=stall&id={t}")
        assert c.pump(lambda: bool(c.headers(sid)), 5)
        proxy.entry(t, "stalling")
        c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        try:
            got = proxy.entry(t, "client-gave-up", timeout=3)
            assert got["alive"] is False
        finally:
            c.close()
    else:
        h = H1Client(proxy.reverse)
        h.get(f"/sse?n=100&fp=stall&id={t}")
        assert h.pump(lambda: h.status() == 200 if h.head else False, 5)
        proxy.entry(t, "stalling")
        h.close()
        proxy.entry(t, "client-gave-up", timeout=3)
    assert_upstream_closed(origin, t)


def test_upstreams_closed_when_an_h2_client_disconnects(proxy, origin):
    """mitmproxy 12.3.1 leaves these sockets open (see _mitm.install_upstream_close_fix)."""
    tags = [tag() for _ in range(3)]
    c = H2Client(proxy.reverse)
    sids = [c.get(f"/sse?n=100&id={t}") for t in tags]
    assert c.pump(lambda: all(len(c.data(s)) >= len(events_bytes(2)) for s in sids), 5)
    c.close()
    for t in tags:
        assert_upstream_closed(origin, t)


def test_set_client_alpn_forces_http1(proxy, origin):
    tctx = tls_context(["h2", "http/1.1"])
    with tctx.wrap_socket(socket.create_connection((LOCAL, proxy.reverse), timeout=5), server_hostname="h1only.test") as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        h = H1Client(0, sock=s)
        t = tag()
        h.get(f"/sse?n=3&id={t}")
        assert h.pump(lambda: h.chunks()[1], 5) and h.body() == events_bytes(3)
    assert proxy.entry("alpn", "set_client_alpn")["ok"] is True
    with tctx.wrap_socket(socket.create_connection((LOCAL, proxy.reverse), timeout=5), server_hostname="other.test") as s:
        assert s.selected_alpn_protocol() == "h2", "set_client_alpn leaked to another connection"


def test_proxy_log_has_no_crash(proxy):
    text = proxy.log.read_text(errors="replace")
    for bad in ("mitmproxy has crashed", "Traceback", "faultproxy: "):
        assert bad not in text, f"mitmdump log contains {bad!r}:\n{text[-4000:]}"
    errors = [e for e in map(json.loads, proxy.results.read_text().splitlines()) if e["event"] == "addon-error"]
    assert not errors, errors


def test_fast_message_typecheck_accepts_and_rejects_what_mitmproxy_does():
    """install_fast_message_typecheck: same outcome and the same TypeError as MessageData's own check."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    _mitm.install_fast_message_typecheck()
    fast = http.MessageData.__dict__["__post_init__"]
    original = getattr(fast, "__wrapped__", None)
    if original is None:
        pytest.skip("Python runs with -O: mitmproxy does no type check at all")
    flow = tflow.tflow(resp=True)
    wrong = {
        "http_version": ["HTTP/1.1", None, 1],
        "headers": [{}, None, [(b"a", b"b")]],
        "content": ["text", 3, bytearray(b"x")],
        "trailers": [{}, b""],
        "timestamp_start": [None, "1", b"1"],
        "timestamp_end": ["1"],
        "host": [b"example.com", None],
        "port": ["80", 80.0, None],
        "method": ["GET", None],
        "status_code": ["200", 200.0, None],
        "reason": ["OK", None],
    }
    right = {"timestamp_start": [1, True, 1.5], "timestamp_end": [None, 2, 2.5], "content": [None, b""], "trailers": [None, http.Headers()]}
    checked = 0
    for data in (flow.request.data, flow.response.data):
        fields = {f.name for f in dataclasses.fields(data)}
        for name in fields:
            keep = getattr(data, name)
            for value in wrong.get(name, []) + right.get(name, []):
                setattr(data, name, value)
                outcomes = []
                for check in (original, fast):
                    try:
                        check(data)
                        outcomes.append(None)
                    except TypeError as e:
                        outcomes.append(str(e))
                setattr(data, name, keep)
                assert outcomes[0] == outcomes[1], (type(data).__name__, name, value, outcomes)
                checked += 1
        fast(data)  # the unchanged object passes
    assert checked > 30
