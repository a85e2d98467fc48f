"""A small, compliant EventSource client for tests, over HTTP/1.1 (plain or TLS) or HTTP/2 (TLS, h2).

It follows the WHATWG HTML "Server-sent events" processing model
(html.spec.whatwg.org/multipage/server-sent-events.html), which is what a browser's EventSource does:

* a request with ``Accept: text/event-stream``, ``Cache-Control: no-cache`` and, when the last event ID
  string is not empty, ``Last-Event-ID``;
* a response whose status is not 200, or whose Content-Type is not ``text/event-stream``, *fails the
  connection*: readyState CLOSED, no reconnection, ever (so a 504, 524 or 503 stops it for good);
* a network error, or a body that ends (cleanly or not), *reestablishes the connection*: readyState
  CONNECTING, wait the reconnection time (``retry:`` in the stream, in ms; 3 s by default as in
  Chromium), then a new request on a new connection;
* the stream is parsed line by line (CRLF, LF or CR), ``data``/``event``/``id``/``retry`` fields and
  ``:`` comments; an event is dispatched on a blank line if its data buffer is not empty; an event
  left unfinished when the body ends is discarded.

Not in the spec, but common in resilient clients and options here:

* ``watchdog``: reconnect when no byte at all arrived for that long (a heartbeat every H seconds and a
  watchdog of 2H detect a stream that went silent: the only way to notice a black hole);
* ``reconnect=False``: stop at the first error, like the incident's ``onerror`` that closes the source;
* ``resume=False``: reconnect without ``Last-Event-ID``, like code that throws the EventSource away and
  makes a new one (``es.close(); new EventSource(url)``), losing its last event ID.

Every connection is recorded as an :class:`Attempt` with what ended it, in Chromium's words where there
is one (``net_error``: ERR_HTTP2_PROTOCOL_ERROR for a RST_STREAM, ERR_INCOMPLETE_CHUNKED_ENCODING for an
HTTP/1.1 body closed before its terminating chunk, ...; see the infra facts' Chromium table).

The client is synchronous (sockets with timeouts); :meth:`EventSource.run` is bounded by a timeout.
Loopback tests only need the standard library, ``h2`` and ``hyperframe``.
"""

from __future__ import annotations

import codecs
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CLOSED", "CONNECTING", "OPEN", "Attempt", "Event", "EventSource", "fetch", "fetch_events"]

CONNECTING, OPEN, CLOSED = 0, 1, 2

# RFC 9113 error codes by number, for messages.
_H2_CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


def h2_code_name(code: int) -> str:
    return _H2_CODES.get(code, f"0x{code:x}")


def _rst_net_error(code: int, headers_seen: bool) -> str | None:
    """Chromium's error for a RST_STREAM (net/spdy): None means a clean end."""
    if code == 0x0:
        return None if headers_seen else "ERR_HTTP2_PROTOCOL_ERROR"
    if code == 0x7:
        return "ERR_HTTP2_SERVER_REFUSED_STREAM"
    if code == 0xD:
        return "ERR_HTTP_1_1_REQUIRED"
    return "ERR_HTTP2_PROTOCOL_ERROR"


@dataclass
class Event:
    """A dispatched event: `type` ("message" unless `event:` said otherwise), `data`, the last event ID
    string at dispatch, the index of the attempt (connection) it came on, and its arrival time."""

    type: str
    data: str
    last_event_id: str
    attempt: int
    at: float


@dataclass
class Attempt:
    """One connection of an EventSource (or one fetch)."""

    index: int
    started_at: float
    last_event_id_sent: str | None
    protocol: str = ""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    headers_at: float | None = None
    first_byte_at: float | None = None  # first (decoded) body byte
    last_byte_at: float | None = None  # last byte of any kind on the wire
    body_bytes: int = 0  # decoded
    comments: int = 0
    events: int = 0
    ended_at: float | None = None
    # clean | network_error | failed (status/content type: no reconnection) | watchdog | stopped
    outcome: str | None = None
    net_error: str | None = None
    detail: str = ""
    goaway: dict[str, Any] | None = None
    body: bytearray = field(default_factory=bytearray, repr=False)  # decoded body, kept for fetches

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def open(self) -> bool:
        return self.ended_at is None


# ------------------------------------------------------------------------------------------------
# Transports: poll() returns items ("headers", status, [(name, value)]), ("data", bytes), ("end",),
# ("error", net_error, detail), ("goaway", code, last_stream_id, debug); [] when nothing arrived.


class _Decoder:
    """Content-Encoding: gzip or deflate, decoded incrementally as browsers do."""

    def __init__(self, encoding: str):
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self._z = None
        elif enc in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._z = zlib.decompressobj()
        else:
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        return self._z.decompress(data) if self._z is not None else data

    def flush(self) -> bytes:
        return self._z.flush() if self._z is not None else b""


class _Transport:
    protocol = ""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.done = False  # a terminal item was returned
        self.last_recv_at: float | None = None

    def _recv(self, timeout: float) -> bytes | None | Exception:
        """bytes, b"" on EOF, None on timeout, or the exception (reset)."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        except ssl.SSLZeroReturnError:
            return b""
        except ssl.SSLError as e:
            if "EOF" in str(e) or "UNEXPECTED_EOF" in str(e):
                return b""
            return e
        except OSError as e:
            return e
        self.last_recv_at = time.monotonic()
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _H1(_Transport):
    protocol = "HTTP/1.1"

    def __init__(self, sock: socket.socket, authority: str):
        super().__init__(sock)
        self.authority = authority
        self.buf = bytearray()
        self.state = "head"  # head, size, chunk, crlf, trailers, length, close
        self.remaining = 0
        self.decoder: _Decoder | None = None
        self.got_any = False

    def request(self, path: str, headers: Sequence[tuple[str, str]]) -> None:
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.authority}", *(f"{k}: {v}" for k, v in headers)]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        if self.done:
            return []
        out: list[tuple[Any, ...]] = []
        self._parse(out)
        if out:
            return out
        got = self._recv(timeout)
        if got is None:
            return []
        if isinstance(got, Exception):
            self.done = True
            return [("error", "ERR_CONNECTION_RESET", f"{type(got).__name__}: {got}")]
        if not got:
            self.done = True
            return [self._eof()]
        self.got_any = True
        self.buf += got
        self._parse(out)
        return out

    def _eof(self) -> tuple[Any, ...]:
        if self.state == "head":
            return ("error", "ERR_EMPTY_RESPONSE", "connection closed before the response head")
        if self.state == "close":
            tail = self.decoder.flush() if self.decoder else b""
            return ("end",) if not tail else ("end", tail)
        if self.state == "length":
            return ("error", "ERR_CONTENT_LENGTH_MISMATCH", f"connection closed {self.remaining} bytes short")
        return ("error", "ERR_INCOMPLETE_CHUNKED_ENCODING", "connection closed before the terminating chunk")

    def _data(self, out: list[tuple[Any, ...]], raw: bytes) -> None:
        assert self.decoder is not None
        decoded = self.decoder.feed(raw)
        if decoded:
            out.append(("data", decoded))

    def _parse(self, out: list[tuple[Any, ...]]) -> None:
        while not self.done:
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).decode("latin-1")
                del self.buf[: end + 4]
                lines = head.split("\r\n")
                parts = lines[0].split(" ", 2)
                status = int(parts[1])
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.append((name.strip().lower(), value.strip()))
                hd = dict(headers)
                if 100 <= status < 200:
                    continue  # interim response
                self.decoder = _Decoder(hd.get("content-encoding", ""))
                out.append(("headers", status, headers))
                if status in (204, 304):
                    self.state = "done"
                    out.append(("end",))
                    self.done = True
                elif "chunked" in hd.get("transfer-encoding", "").lower():
                    self.state = "size"
                elif "content-length" in hd:
                    self.state = "length"
                    self.remaining = int(hd["content-length"])
                    if self.remaining == 0:
                        out.append(("end",))
                        self.done = True
                else:
                    self.state = "close"
            elif self.state == "size":
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(self.buf[:nl]).split(b";")[0].strip() or b"0", 16)
                del self.buf[: nl + 2]
                if size == 0:
                    self.state = "trailers"
                else:
                    self.state, self.remaining = "chunk", size
            elif self.state == "chunk":
                if not self.buf:
                    return
                take = bytes(self.buf[: self.remaining])
                del self.buf[: len(take)]
                self.remaining -= len(take)
                self._data(out, take)
                if self.remaining == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    return
                del self.buf[:2]
                self.state = "size"
            elif self.state == "trailers":
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 2]
                if not line:
                    assert self.decoder is not None
                    tail = self.decoder.flush()
                    if tail:
                        out.append(("data", tail))
                    out.append(("end",))
                    self.done = True
            elif self.state == "length":
                if not self.buf:
                    return
                take = bytes(self.buf[: self.remaining])
                del self.buf[: len(take)]
                self.remaining -= len(take)
                self._data(out, take)
                if self.remaining == 0:
                    out.append(("end",))
                    self.done = True
            elif self.state == "close":
                if not self.buf:
                    return
                take = bytes(self.buf)
                self.buf.clear()
                self._data(out, take)
            else:
                return


class _H2(_Transport):
    """One request on its own HTTP/2 connection, with the `h2` library.

    After a GOAWAY the h2 state machine is closed and rejects every later frame, while real clients
    (Chromium) go on with streams at or below last_stream_id; frames after a GOAWAY are therefore
    taken apart by hand (hyperframe), and flow control is kept up with raw WINDOW_UPDATE frames."""

    protocol = "HTTP/2"

    def __init__(self, sock: socket.socket, authority: str):
        super().__init__(sock)
        import h2.config
        import h2.connection

        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()
        self.sid = 0
        self.rbuf = b""
        self.after_goaway = False
        self.headers_seen = False
        self.decoder: _Decoder | None = None

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def request(self, path: str, headers: Sequence[tuple[str, str]]) -> None:
        self.sid = self.conn.get_next_available_stream_id()
        pseudo = [(":method", "GET"), (":scheme", "https"), (":authority", self.authority), (":path", path)]
        self.conn.send_headers(self.sid, [*pseudo, *((k.lower(), v) for k, v in headers)], end_stream=True)
        self._flush()

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        if self.done:
            return []
        got = self._recv(timeout)
        if got is None:
            return []
        if isinstance(got, Exception):
            self.done = True
            return [("error", "ERR_CONNECTION_RESET", f"{type(got).__name__}: {got}")]
        if not got:
            self.done = True
            return [("error", "ERR_CONNECTION_CLOSED", "connection closed with the stream open")]
        out: list[tuple[Any, ...]] = []
        self.rbuf += got
        while len(self.rbuf) >= 9 and not self.done:
            end = 9 + int.from_bytes(self.rbuf[:3], "big")
            if len(self.rbuf) < end:
                break
            frame, self.rbuf = self.rbuf[:end], self.rbuf[end:]
            if self.after_goaway:
                self._raw_frame(frame, out)
            else:
                self._h2_frame(frame, out)
        if not self.after_goaway:
            self._flush()
        return out

    def _emit_data(self, out: list[tuple[Any, ...]], data: bytes) -> None:
        if self.decoder is not None and data:
            decoded = self.decoder.feed(data)
            if decoded:
                out.append(("data", decoded))

    def _finish(self, out: list[tuple[Any, ...]], item: tuple[Any, ...]) -> None:
        if item[0] == "end" and self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                out.append(("data", tail))
        out.append(item)
        self.done = True

    def _h2_frame(self, frame: bytes, out: list[tuple[Any, ...]]) -> None:
        import h2.events

        for ev in self.conn.receive_data(frame):
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.ResponseReceived) and sid == self.sid:
                headers = [(str(k).lower(), str(v)) for k, v in ev.headers]
                status = int(dict(headers)[":status"])
                plain = [(k, v) for k, v in headers if not k.startswith(":")]
                self.decoder = _Decoder(dict(plain).get("content-encoding", ""))
                self.headers_seen = True
                out.append(("headers", status, plain))
            elif isinstance(ev, h2.events.DataReceived) and sid == self.sid:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self._emit_data(out, ev.data)
            elif isinstance(ev, h2.events.StreamEnded) and sid == self.sid:
                self._finish(out, ("end",))
            elif isinstance(ev, h2.events.StreamReset) and sid == self.sid:
                self._reset(out, int(ev.error_code))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._goaway(out, int(ev.error_code), int(ev.last_stream_id or 0), ev.additional_data or b"")

    def _reset(self, out: list[tuple[Any, ...]], code: int) -> None:
        err = _rst_net_error(code, self.headers_seen)
        if err is None:
            self._finish(out, ("end",))
        else:
            self._finish(out, ("error", err, f"RST_STREAM {h2_code_name(code)}"))

    def _goaway(self, out: list[tuple[Any, ...]], code: int, last: int, debug: bytes) -> None:
        out.append(("goaway", code, last, debug))
        if last < self.sid:
            err = "ERR_HTTP2_SERVER_REFUSED_STREAM" if code == 0 else "ERR_HTTP2_PROTOCOL_ERROR"
            self._finish(out, ("error", err, f"GOAWAY {h2_code_name(code)} last_stream_id={last}"))
        else:
            self._flush()
            self.after_goaway = True

    def _raw_frame(self, raw: bytes, out: list[tuple[Any, ...]]) -> None:
        from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame

        frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9:]))
        if isinstance(frame, DataFrame):
            if length:
                updates = WindowUpdateFrame(0, window_increment=length).serialize()
                if frame.stream_id == self.sid and "END_STREAM" not in frame.flags:
                    updates += WindowUpdateFrame(self.sid, window_increment=length).serialize()
                try:
                    self.sock.sendall(updates)
                except OSError:
                    pass
            if frame.stream_id == self.sid:
                self._emit_data(out, bytes(frame.data))
                if "END_STREAM" in frame.flags:
                    self._finish(out, ("end",))
        elif isinstance(frame, HeadersFrame) and frame.stream_id == self.sid and "END_STREAM" in frame.flags:
            self._finish(out, ("end",))  # trailers
        elif isinstance(frame, RstStreamFrame) and frame.stream_id == self.sid:
            self._reset(out, int(frame.error_code))
        elif isinstance(frame, GoAwayFrame):
            out.append(("goaway", int(frame.error_code), int(frame.last_stream_id), bytes(frame.additional_data)))
            if frame.last_stream_id < self.sid:
                code = int(frame.error_code)
                err = "ERR_HTTP2_SERVER_REFUSED_STREAM" if code == 0 else "ERR_HTTP2_PROTOCOL_ERROR"
                self._finish(out, ("error", err, f"GOAWAY {h2_code_name(code)} last_stream_id={frame.last_stream_id}"))


def _connect(url: str, *, http2: bool, cafile: str | None, timeout: float) -> tuple[_Transport, str]:
    """(transport, path) for one new connection to `url`."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"{host}:{port}"
    if http2 and not tls:
        raise ValueError("HTTP/2 needs an https:// URL (browsers do not speak h2c)")
    sock = socket.create_connection((host, port), timeout=timeout)
    if not tls:
        return _H1(sock, authority), path
    if cafile:
        ctx = ssl.create_default_context(cafile=str(cafile))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    try:
        tsock = ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    if tsock.selected_alpn_protocol() == "h2":
        return _H2(tsock, authority), path
    return _H1(tsock, authority), path  # the server chose HTTP/1.1: browsers fall back the same way


# ------------------------------------------------------------------------------------------------


class EventSource:
    """An EventSource. ``run(timeout, until)`` drives it; ``events``, ``attempts`` and ``ready_state``
    say what happened. See the module docstring for the semantics and the non-standard options."""

    def __init__(
        self,
        url: str,
        *,
        http2: bool = False,
        cafile: str | None = None,
        reconnection_time: float = 3.0,
        watchdog: float | None = None,
        reconnect: bool = True,
        resume: bool = True,
        accept_encoding: str | None = "gzip, deflate",
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout: float = 5.0,
        max_attempts: int = 50,
    ):
        self.url = url
        self.http2 = http2
        self.cafile = cafile
        self.reconnection_time = reconnection_time
        self.watchdog = watchdog
        self.reconnect = reconnect
        self.resume = resume
        self.accept_encoding = accept_encoding
        self.extra_headers = list(headers)
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self.ready_state = CONNECTING
        self.last_event_id = ""
        self.events: list[Event] = []
        self.attempts: list[Attempt] = []
        self.opened = 0  # times the `open` event fired
        self._transport: _Transport | None = None
        self._attempt: Attempt | None = None
        self._next_at = time.monotonic()
        self._reset_parser()

    # --- public -----------------------------------------------------------------------------

    def run(self, timeout: float, until: Callable[[EventSource], bool] | None = None) -> bool:
        """Drive the source for at most `timeout` seconds. True as soon as `until(self)` holds; False
        when the time is up or the source is CLOSED (failed, or reconnect=False after an error)."""
        deadline = time.monotonic() + timeout
        while True:
            if until is not None and until(self):
                return True
            if self.ready_state == CLOSED:
                return False
            now = time.monotonic()
            if now >= deadline:
                return False
            if self._transport is None:
                if now < self._next_at:
                    time.sleep(min(self._next_at, deadline) - now)
                    continue
                if len(self.attempts) >= self.max_attempts:
                    self.ready_state = CLOSED
                    return False
                self._open()
                continue
            wait = deadline - now
            if self.watchdog is not None and self._attempt is not None:
                silent_since = self._attempt.last_byte_at or self._attempt.started_at
                left = silent_since + self.watchdog - now
                if left <= 0:
                    self._end_attempt("watchdog", None, f"no byte for {self.watchdog:.3f}s")
                    continue
                wait = min(wait, left)
            for item in self._transport.poll(min(wait, 0.25)):
                self._handle(item)
                if self._transport is None:
                    break

    def close(self) -> None:
        """es.close(): readyState CLOSED, the connection goes."""
        if self._transport is not None:
            self._end_attempt("stopped", None, "closed by the client")
        self.ready_state = CLOSED

    def __enter__(self) -> EventSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def data(self) -> list[str]:
        return [e.data for e in self.events]

    @property
    def current(self) -> Attempt | None:
        return self._attempt

    # --- connection -------------------------------------------------------------------------

    def _open(self) -> None:
        sent = self.last_event_id if self.last_event_id else None
        attempt = Attempt(index=len(self.attempts), started_at=time.monotonic(), last_event_id_sent=sent)
        self.attempts.append(attempt)
        self._attempt = attempt
        self._reset_parser()
        headers = [("Accept", "text/event-stream"), ("Cache-Control", "no-cache")]
        if self.accept_encoding:
            headers.append(("Accept-Encoding", self.accept_encoding))
        if sent is not None:
            headers.append(("Last-Event-ID", sent))
        headers += self.extra_headers
        try:
            transport, path = _connect(self.url, http2=self.http2, cafile=self.cafile, timeout=self.connect_timeout)
            attempt.protocol = transport.protocol
            self._transport = transport
            transport.request(path, headers)
        except OSError as e:
            self._transport = None
            self._end_attempt("network_error", "ERR_CONNECTION_REFUSED", f"{type(e).__name__}: {e}")

    def _end_attempt(self, outcome: str, net_error: str | None, detail: str) -> None:
        attempt = self._attempt
        if attempt is not None and attempt.ended_at is None:
            attempt.ended_at = time.monotonic()
            attempt.outcome = outcome
            attempt.net_error = net_error
            attempt.detail = detail
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if outcome == "failed" or outcome == "stopped":
            self.ready_state = CLOSED
            return
        # "Reestablish the connection" (or, for the naive client, give up).
        if not self.reconnect:
            self.ready_state = CLOSED
            return
        self.ready_state = CONNECTING
        self._next_at = time.monotonic() + self.reconnection_time
        if not self.resume:
            self.last_event_id = ""  # a brand-new EventSource has no last event ID

    def _handle(self, item: tuple[Any, ...]) -> None:
        attempt = self._attempt
        assert attempt is not None
        now = time.monotonic()
        attempt.last_byte_at = now
        kind = item[0]
        if kind == "headers":
            _, status, headers = item
            attempt.status = status
            attempt.headers = {k: v for k, v in headers}
            attempt.headers_at = now
            essence = attempt.content_type.split(";")[0].strip().lower()
            if status != 200:
                self._end_attempt("failed", None, f"status {status}")
            elif essence != "text/event-stream":
                self._end_attempt("failed", None, f"content type {attempt.content_type!r}")
            else:
                self.ready_state = OPEN
                self.opened += 1
        elif kind == "data":
            data: bytes = item[1]
            if attempt.first_byte_at is None:
                attempt.first_byte_at = now
            attempt.body_bytes += len(data)
            attempt.body += data
            self._feed(data, now)
        elif kind == "end":
            if len(item) > 1 and item[1]:
                self._handle(("data", item[1]))
            self._end_attempt("clean", None, "the body ended")
        elif kind == "error":
            self._end_attempt("network_error", item[1], item[2])
        elif kind == "goaway":
            _, code, last, debug = item
            attempt.goaway = {"code": h2_code_name(code), "last_stream_id": last, "debug": debug, "at": now}

    # --- the event stream parser ------------------------------------------------------------

    def _reset_parser(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""
        self._after_cr = False
        self._first = True
        self._data_buf = ""
        self._type_buf = ""
        # Chromium starts each stream's last event ID buffer at the source's current last event ID.
        self._id_buf = self.last_event_id

    def _feed(self, data: bytes, now: float) -> None:
        text = self._text.decode(data)
        if self._first and text:
            self._first = False
            text = text.removeprefix("\ufeff")
        i = 0
        while i < len(text):
            ch = text[i]
            if self._after_cr:
                self._after_cr = False
                if ch == "\n":
                    i += 1
                    continue
            if ch == "\r" or ch == "\n":
                self._after_cr = ch == "\r"
                line, self._line = self._line, ""
                self._process_line(line, now)
                if self._transport is None:
                    return  # the source was closed from a handler
            else:
                j = i
                while j < len(text) and text[j] not in "\r\n":
                    j += 1
                self._line += text[i:j]
                i = j
                continue
            i += 1

    def _process_line(self, line: str, now: float) -> None:
        if line == "":
            self._dispatch(now)
            return
        if line.startswith(":"):
            assert self._attempt is not None
            self._attempt.comments += 1
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type_buf = value
        elif name == "data":
            self._data_buf += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._id_buf = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self.reconnection_time = int(value) / 1000.0

    def _dispatch(self, now: float) -> None:
        self.last_event_id = self._id_buf
        if self._data_buf == "":
            self._type_buf = ""
            return
        data = self._data_buf[:-1] if self._data_buf.endswith("\n") else self._data_buf
        assert self._attempt is not None
        self._attempt.events += 1
        self.events.append(Event(self._type_buf or "message", data, self.last_event_id, self._attempt.index, now))
        self._data_buf = ""
        self._type_buf = ""


def fetch(
    url: str,
    *,
    http2: bool = False,
    cafile: str | None = None,
    timeout: float = 5.0,
    headers: Sequence[tuple[str, str]] = (),
    accept_encoding: str | None = "gzip, deflate",
) -> Attempt:
    """One GET of any resource, read to its end (or `timeout`): the Attempt, with the decoded body in
    `attempt.body`. Status and content type are recorded, not judged."""
    started = time.monotonic()
    attempt = Attempt(index=0, started_at=started, last_event_id_sent=None)
    hdrs = [("Accept", "*/*"), *((("Accept-Encoding", accept_encoding),) if accept_encoding else ()), *headers]
    try:
        transport, path = _connect(url, http2=http2, cafile=cafile, timeout=timeout)
    except OSError as e:
        attempt.ended_at, attempt.outcome = time.monotonic(), "network_error"
        attempt.net_error = "ERR_CONNECTION_REFUSED"
        attempt.detail = f"{type(e).__name__}: {e}"
        return attempt
    attempt.protocol = transport.protocol
    deadline = started + timeout
    try:
        transport.request(path, hdrs)
        while attempt.ended_at is None:
            now = time.monotonic()
            if now >= deadline:
                attempt.ended_at, attempt.outcome, attempt.detail = now, "stopped", f"not done within {timeout}s"
                break
            for item in transport.poll(min(deadline - now, 0.25)):
                now = time.monotonic()
                attempt.last_byte_at = now
                if item[0] == "headers":
                    attempt.status, attempt.headers, attempt.headers_at = item[1], dict(item[2]), now
                elif item[0] == "data":
                    attempt.first_byte_at = attempt.first_byte_at or now
                    attempt.body_bytes += len(item[1])
                    attempt.body += item[1]
                elif item[0] == "end":
                    if len(item) > 1 and item[1]:
                        attempt.body_bytes += len(item[1])
                        attempt.body += item[1]
                    attempt.ended_at, attempt.outcome, attempt.detail = now, "clean", "the body ended"
                elif item[0] == "error":
                    attempt.ended_at, attempt.outcome = now, "network_error"
                    attempt.net_error, attempt.detail = item[1], item[2]
                elif item[0] == "goaway":
                    code, last, debug = item[1:]
                    attempt.goaway = {"code": h2_code_name(code), "last_stream_id": last, "debug": debug, "at": now}
    finally:
        transport.close()
    return attempt


def fetch_events(
    url: str, *, http2: bool = False, cafile: str | None = None, timeout: float = 5.0, last_event_id: str = ""
) -> tuple[Attempt, list[Event]]:
    """One EventSource-style request read to its end (a poll, in a polling fallback): the attempt and the
    events in it. A status other than 200 or a wrong content type fails it, as for EventSource."""
    es = EventSource(url, http2=http2, cafile=cafile, reconnect=False)
    es.last_event_id = last_event_id
    es._reset_parser()
    es.run(timeout)
    es.close()
    return es.attempts[0], es.events
