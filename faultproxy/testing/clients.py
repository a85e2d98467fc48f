"""Small, exact clients for tests: what a browser's EventSource would make of a stream, and the wire under it.

Every client here records *what arrived when* (``time.monotonic()``, the clock the origin's request log
uses too), so a test can compare arrival times between proxies, and keeps the raw bytes, so it can assert
on framing (a terminating chunk, END_STREAM, RST_STREAM codes) and not only on content.

* :class:`SseParser` — the WHATWG event-stream interpretation (UTF-8, BOM, LF/CRLF/CR, comments, ``data``
  without a colon, ``id``/``event``/``retry``), fed in arbitrary pieces, dispatching events with times;
* :class:`H1Client` — HTTP/1.1 on a raw socket (optionally TLS, optionally through a regular proxy with an
  absolute-form request or CONNECT); decodes chunked / Content-Length / close-delimited bodies, records
  arrival times, whether the body was complete, and how the connection ended (FIN, RST);
* :class:`H2Client` — the ``h2`` library over TLS with ALPN h2 (no certificate verification), recording every
  frame event with its arrival time; frames after a GOAWAY are still taken apart by hand, as a browser would
  go on with the streams the GOAWAY keeps;
* :class:`GzipStream` — incremental gzip decoding of arrived pieces, keeping the arrival time of each
  decoded byte range, so SSE events of a compressed stream get the time at which they became readable.

Everything is synchronous and bounded by deadlines (``pump(until, timeout)``); run clients in threads to
read several streams at once.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GzipStream",
    "H1Client",
    "H2Client",
    "RawData",
    "SseEvent",
    "SseParser",
    "insecure_tls_context",
    "run_in_threads",
]


# ----------------------------------------------------------------------------------------------------
# Server-Sent Events, as html.spec.whatwg.org/multipage/server-sent-events.html interprets them
# ----------------------------------------------------------------------------------------------------


_BOM = b"\xef\xbb\xbf"


@dataclass
class SseEvent:
    """One dispatched event: what EventSource's ``onmessage`` (or a named listener) would receive."""

    type: str
    data: str
    last_event_id: str
    at: float  # arrival time of the byte that completed the event (the blank line)
    end_offset: int  # offset in the body just past that blank line


class SseParser:
    """Feed body bytes in any pieces; complete events come out in order, with the time of their completion.

    Follows the spec's parsing rules: a leading UTF-8 BOM is skipped; lines end with CRLF, LF or CR (a CR at
    the end of one piece and an LF at the start of the next are one line ending); a line starting with ``:``
    is a comment; ``field:value`` with one optional space after the colon; a line without a colon is a field
    with an empty value; a blank line dispatches, unless the data buffer is empty (then it only resets the
    buffers). ``retry`` takes ASCII digits only; an ``id`` containing NUL is ignored. Bytes are decoded as
    UTF-8 with replacement, per line (a multi-byte character split across pieces stays intact).
    """

    def __init__(self) -> None:
        self.events: list[SseEvent] = []
        self.comments: list[tuple[float, str]] = []
        self.retry: int | None = None
        self.last_event_id = ""
        self.offset = 0  # body bytes fed so far
        self._line = bytearray()
        self._after_cr = False
        self._bom_checked = False
        self._head = b""
        self._data: list[str] = []
        self._has_data = False
        self._type = ""

    def feed(self, data: bytes, at: float | None = None) -> list[SseEvent]:
        """Parse a piece; returns the events it completed (also appended to :attr:`events`)."""
        at = time.monotonic() if at is None else at
        out: list[SseEvent] = []
        base = self.offset  # body offset of data[0]
        self.offset += len(data)
        i = 0
        if not self._bom_checked:
            # A leading BOM is skipped; it may itself be split across pieces, so hold up to 3 bytes.
            head = self._head + data
            if len(head) < 3 and _BOM.startswith(head):
                self._head = head
                return out
            base -= len(self._head)
            self._head = b""
            self._bom_checked = True
            data = head
            if head.startswith(_BOM):
                i = 3
        n = len(data)
        while i < n:
            if self._after_cr:
                self._after_cr = False
                if data[i] == 0x0A:  # the LF of a CRLF split across pieces
                    i += 1
                    continue
            cr = data.find(b"\r", i)
            lf = data.find(b"\n", i)
            ends = [p for p in (cr, lf) if p >= 0]
            if not ends:
                self._line += data[i:]
                break
            end = min(ends)
            self._line += data[i:end]
            if data[end] == 0x0D:
                if end + 1 < n:
                    i = end + 2 if data[end + 1] == 0x0A else end + 1
                else:
                    self._after_cr = True
                    i = end + 1
            else:
                i = end + 1
            line = bytes(self._line).decode("utf-8", "replace")
            self._line.clear()
            ev = self._process_line(line, at, base + i)
            if ev is not None:
                out.append(ev)
        self.events.extend(out)
        return out

    def _process_line(self, line: str, at: float, end_offset: int) -> SseEvent | None:
        if line == "":
            if not self._has_data:
                self._type = ""
                return None
            data = "\n".join(self._data)
            ev = SseEvent(self._type or "message", data, self.last_event_id, at, end_offset)
            self._data, self._has_data, self._type = [], False, ""
            return ev
        if line.startswith(":"):
            self.comments.append((at, line[1:]))
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def data(self) -> list[str]:
        return [e.data for e in self.events]


# ----------------------------------------------------------------------------------------------------
# gzip, incrementally, with times
# ----------------------------------------------------------------------------------------------------


class GzipStream:
    """Decode gzip pieces as they arrive; :attr:`pieces` holds (arrival time, decoded bytes)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pieces: list[tuple[float, bytes]] = []
        self.compressed = 0

    def feed(self, data: bytes, at: float) -> bytes:
        self.compressed += len(data)
        out = self._z.decompress(data)
        if out:
            self.pieces.append((at, out))
        return out

    @property
    def finished(self) -> bool:
        """The gzip trailer (CRC32 and length) was read and checked."""
        return self._z.eof

    @property
    def data(self) -> bytes:
        return b"".join(p for _, p in self.pieces)


# ----------------------------------------------------------------------------------------------------
# HTTP/1.1 on a raw socket
# ----------------------------------------------------------------------------------------------------


def insecure_tls_context(alpn: Iterable[str]) -> ssl.SSLContext:
    """TLS without verification (the proxies' certificates are throwaway), offering `alpn` in this order."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class H1Client:
    """One HTTP/1.1 exchange on a raw socket, read with arrival times.

    ``H1Client(host, port)`` connects plainly; ``tls=True`` wraps the socket (ALPN http/1.1);
    ``connect="host:port"`` first sends CONNECT to a regular proxy at (host, port) and, with ``tls``, starts TLS
    inside the tunnel. :meth:`request` sends the request; :meth:`pump` reads until a condition holds or the
    deadline passes. The response is parsed as it arrives: :attr:`status`, :attr:`headers`, and the body as
    (time, bytes) :attr:`arrivals` after de-chunking.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        connect: str | None = None,
        sni: str = "localhost",
        timeout: float = 5.0,
    ) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tunnel_response: bytes | None = None
        if connect is not None:
            self.sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            head = b""
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in head:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                got = self.sock.recv(4096)
                if not got:
                    raise ConnectionError(f"proxy closed the connection during CONNECT: {head!r}")
                head += got
            self.tunnel_response, _, rest = head.partition(b"\r\n\r\n")
            if b" 200" not in self.tunnel_response.split(b"\r\n", 1)[0]:
                raise ConnectionError(f"CONNECT refused: {self.tunnel_response!r}")
            assert not rest, "data after the CONNECT response"
        if tls:
            self.sock = insecure_tls_context(["http/1.1"]).wrap_socket(self.sock, server_hostname=sni)
        self.raw = bytearray()  # everything received
        self.started_at: float | None = None
        self.status: int | None = None
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.header_list: list[tuple[str, str]] = []
        self.headers_at: float | None = None
        self.arrivals: list[tuple[float, bytes]] = []  # decoded body pieces
        self.chunk_sizes: list[int] = []  # sizes of the HTTP chunks received (chunked bodies)
        self.complete = False  # the body ended as its framing says (terminating chunk / length reached)
        self.eof_at: float | None = None
        self.error: BaseException | None = None  # e.g. ConnectionResetError
        self._pos = 0  # parse position in raw
        self._framing: str | None = None  # chunked | length | close | none
        self._remaining = 0
        self._chunk_left: int | None = None
        self._head_request = False

    # --- sending ---
    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        host: str = "origin.test",
    ) -> None:
        items = list(headers.items()) if isinstance(headers, dict) else list(headers)
        names = {k.lower() for k, _ in items}
        lines = [f"{method} {target} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: {host}")
        lines += [f"{k}: {v}" for k, v in items]
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        self._head_request = method.upper() == "HEAD"
        self.started_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    def get(self, target: str, headers: dict[str, str] | Iterable[tuple[str, str]] = (), **kw: Any) -> H1Client:
        self.request("GET", target, headers, **kw)
        return self

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # --- receiving ---
    @property
    def done(self) -> bool:
        """The response is over: complete, or the connection ended."""
        return self.complete or self.eof_at is not None or self.error is not None

    def pump(self, until: Callable[[], bool] | None = None, timeout: float = 5.0) -> bool:
        """Read until `until()` holds (default: :attr:`done`) or `timeout` seconds pass; returns `until()`."""
        until = until or (lambda: self.done)
        deadline = time.monotonic() + timeout
        while not until():
            if self.eof_at is not None or self.error is not None:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.25))
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                continue
            except ssl.SSLError as e:
                self.error = e
                continue
            except OSError as e:
                self.error = e
                continue
            now = time.monotonic()
            if not data:
                self.eof_at = now
                if self._framing == "close":
                    self.complete = True  # a close-delimited body ends with the close
                continue
            self.raw += data
            self._parse(now)
        return True

    def _parse(self, now: float) -> None:
        if self.status is None:
            end = self.raw.find(b"\r\n\r\n", self._pos)
            if end < 0:
                return
            head = bytes(self.raw[self._pos : end]).decode("latin-1")
            self._pos = end + 4
            status_line, *lines = head.split("\r\n")
            parts = status_line.split(" ", 2)
            self.status = int(parts[1])
            self.reason = parts[2] if len(parts) > 2 else ""
            for line in lines:
                k, _, v = line.partition(":")
                self.header_list.append((k.strip(), v.strip()))
                self.headers[k.strip().lower()] = v.strip()
            self.headers_at = now
            if 100 <= self.status < 200:
                self.status = None  # an interim response: the real one follows
                self.headers, self.header_list = {}, []
                return self._parse(now)
            te = self.headers.get("transfer-encoding", "").lower()
            if self._head_request or self.status in (204, 304):
                self._framing = "none"
                self.complete = True
            elif "chunked" in te:
                self._framing = "chunked"
            elif "content-length" in self.headers:
                self._framing = "length"
                self._remaining = int(self.headers["content-length"])
                self.complete = self._remaining == 0
            else:
                self._framing = "close"
        if self._framing == "length":
            piece = bytes(self.raw[self._pos : self._pos + self._remaining])
            if piece:
                self._pos += len(piece)
                self._remaining -= len(piece)
                self.arrivals.append((now, piece))
            self.complete = self._remaining == 0
        elif self._framing == "close":
            piece = bytes(self.raw[self._pos :])
            if piece:
                self._pos += len(piece)
                self.arrivals.append((now, piece))
        elif self._framing == "chunked":
            self._parse_chunks(now)

    def _parse_chunks(self, now: float) -> None:
        got = bytearray()
        while not self.complete:
            if self._chunk_left is None:
                nl = self.raw.find(b"\r\n", self._pos)
                if nl < 0:
                    break
                size = int(bytes(self.raw[self._pos : nl]).split(b";")[0].strip(), 16)
                if size == 0:
                    # The last chunk: optional trailer lines, then an empty line.
                    rest = bytes(self.raw[nl + 2 :])
                    if rest.startswith(b"\r\n") or b"\r\n\r\n" in rest:
                        self.complete = True
                        self._pos = len(self.raw)
                    break
                self.chunk_sizes.append(size)
                self._pos = nl + 2
                self._chunk_left = size
            take = min(self._chunk_left, len(self.raw) - self._pos)
            if take > 0:
                got += self.raw[self._pos : self._pos + take]
                self._pos += take
                self._chunk_left -= take
            if self._chunk_left > 0:
                break
            if len(self.raw) < self._pos + 2:
                # Wait for the CRLF after the chunk data (keep _chunk_left at 0 until it is here).
                break
            self._pos += 2
            self._chunk_left = None
        if got:
            self.arrivals.append((now, bytes(got)))

    @property
    def body(self) -> bytes:
        return b"".join(p for _, p in self.arrivals)

    @property
    def reset(self) -> bool:
        """The connection ended with a TCP RST."""
        return isinstance(self.error, ConnectionResetError)

    def first_body_at(self) -> float | None:
        return self.arrivals[0][0] if self.arrivals else None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> H1Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# HTTP/2 over TLS with the h2 library
# ----------------------------------------------------------------------------------------------------


@dataclass
class RawData:
    """A DATA frame received after a GOAWAY (the h2 state machine rejects those; browsers do not)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass
class H2Stream:
    sid: int
    headers: dict[str, str] = field(default_factory=dict)
    headers_at: float | None = None
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)
    ended_at: float | None = None
    reset_at: float | None = None
    reset_code: int | None = None

    @property
    def data(self) -> bytes:
        return b"".join(p for _, p in self.arrivals)

    @property
    def status(self) -> int | None:
        s = self.headers.get(":status")
        return int(s) if s else None

    @property
    def done(self) -> bool:
        return self.ended_at is not None or self.reset_at is not None


class H2Client:
    """HTTP/2 over TLS (ALPN h2 only, no verification) with the h2 library; every event is logged with its
    arrival time in :attr:`log`, and per stream in :attr:`streams`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sni: str = "localhost",
        connect: str | None = None,
        timeout: float = 5.0,
        authority: str = "origin.test",
    ) -> None:
        import h2.config
        import h2.connection

        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if connect is not None:
            raw.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            head = b""
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in head:
                raw.settimeout(max(0.01, deadline - time.monotonic()))
                got = raw.recv(4096)
                if not got:
                    raise ConnectionError(f"proxy closed the connection during CONNECT: {head!r}")
                head += got
            if b" 200" not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(f"CONNECT refused: {head!r}")
        self.sock = insecure_tls_context(["h2"]).wrap_socket(raw, server_hostname=sni)
        self.alpn = self.sock.selected_alpn_protocol()
        if self.alpn != "h2":
            raise ConnectionError(f"the server did not negotiate h2 (ALPN {self.alpn!r})")
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        # A large connection window, so flow control never paces what a test measures.
        self.conn.increment_flow_control_window(1 << 30)
        self._flush()
        self.log: list[tuple[float, Any]] = []
        self.streams: dict[int, H2Stream] = {}
        self.closed_at: float | None = None
        self.goaway_at: float | None = None
        self.goaway_code: int | None = None
        self.goaway_last_stream_id: int | None = None
        self._rbuf = b""
        self._after_goaway = False
        self._uploads: dict[int, memoryview] = {}

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        content_length: bool = True,
    ) -> int:
        """Open a stream; a `body` is sent as flow control allows, with content-length unless told not to
        (a browser's streamed upload has none)."""
        items = list(headers.items()) if isinstance(headers, dict) else list(headers)
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "https"), (":authority", self.authority), (":path", path)]
        hdrs += [(k.lower(), v) for k, v in items]
        if body is not None and content_length and not any(k.lower() == "content-length" for k, _ in items):
            hdrs.append(("content-length", str(len(body))))
        self.conn.send_headers(sid, hdrs, end_stream=body is None)
        self.streams[sid] = H2Stream(sid)
        if body is not None:
            self._uploads[sid] = memoryview(body)
            self._send_uploads()
        self._flush()
        return sid

    def _send_uploads(self) -> None:
        """Send request bodies as far as the peer's flow-control windows allow (the rest after WINDOW_UPDATEs)."""
        for sid, rest in list(self._uploads.items()):
            while True:
                room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(rest))
                if room <= 0 and rest:
                    break
                self.conn.send_data(sid, bytes(rest[:room]), end_stream=room == len(rest))
                rest = rest[room:]
                if not rest:
                    del self._uploads[sid]
                    break
            if sid in self._uploads:
                self._uploads[sid] = rest

    def get(self, path: str, headers: dict[str, str] | Iterable[tuple[str, str]] = ()) -> int:
        return self.request("GET", path, headers)

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Read until `until()` holds or `timeout` seconds pass (or the connection closes); returns `until()`."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed_at is not None:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.25))
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                data = b""
            now = time.monotonic()
            if not data:
                self.closed_at = now
                continue
            self._rbuf += data
            while len(self._rbuf) >= 9:
                end = 9 + int.from_bytes(self._rbuf[:3], "big")
                if len(self._rbuf) < end:
                    break
                frame, self._rbuf = self._rbuf[:end], self._rbuf[end:]
                self._frame(frame, now)
            if not self._after_goaway:
                if self._uploads:
                    self._send_uploads()
                self._flush()
        return True

    def _frame(self, frame: bytes, now: float) -> None:
        import h2.events
        from hyperframe.frame import DataFrame, Frame, RstStreamFrame

        if self._after_goaway:
            f, _ = Frame.parse_frame_header(memoryview(frame[:9]))
            f.parse_body(memoryview(frame[9:]))
            st = self.streams.get(f.stream_id)
            if isinstance(f, DataFrame):
                self.log.append((now, RawData(f.stream_id, bytes(f.data), "END_STREAM" in f.flags)))
                if st is not None:
                    if f.data:
                        st.arrivals.append((now, bytes(f.data)))
                    if "END_STREAM" in f.flags:
                        st.ended_at = now
            elif isinstance(f, RstStreamFrame) and st is not None:
                st.reset_at, st.reset_code = now, f.error_code
            return
        for ev in self.conn.receive_data(frame):
            self.log.append((now, ev))
            st = self.streams.get(getattr(ev, "stream_id", None) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                st.headers = dict(ev.headers)
                st.headers_at = now
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if st is not None and ev.data:
                    st.arrivals.append((now, ev.data))
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                st.ended_at = now
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                st.reset_at, st.reset_code = now, int(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._after_goaway = True
                self.goaway_at = now
                self.goaway_code = int(ev.error_code)
                self.goaway_last_stream_id = ev.last_stream_id

    def stream(self, sid: int) -> H2Stream:
        return self.streams[sid]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------


def run_in_threads(*jobs: Callable[[], Any], timeout: float = 30.0) -> list[Any]:
    """Run callables at the same time; their results in order. An exception in one is re-raised here."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def run(i: int, job: Callable[[], Any]) -> None:
        try:
            results[i] = job()
        except BaseException as e:  # re-raised in the caller's thread
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i, j), daemon=True) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"jobs still running after {timeout} s")
    for e in errors:
        if e is not None:
            raise e
    return results
