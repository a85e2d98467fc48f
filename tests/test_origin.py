"""Real-socket tests of the test origin (faultproxy.testing.origin).

Raw sockets where the bytes on the wire are the point (chunk boundaries, terminating chunk, late flush);
httpx where a real client's view is the point. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from faultproxy.testing.origin import OriginServer, RequestRecord, expected_bytes, expected_sha256, sse_event_bytes

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


class RawClient:
    """A blocking HTTP/1.1 client on a plain socket that reads exactly what the server wrote."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False
        self.first_recv_at: float | None = None
        self.last_recv_at: float | None = None
        self.sent_at = 0.0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sent_at = time.monotonic()
        self.sock.sendall(data)

    def get(self, target: str, headers: dict[str, str] | None = None) -> None:
        lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def _recv(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"deadline passed; buffered {self.buf[:200]!r}")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        now = time.monotonic()
        if not data:
            self.eof = True
            return False
        if self.first_recv_at is None:
            self.first_recv_at = now
        self.last_recv_at = now
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self._recv():
                raise EOFError(f"EOF before {sep!r}; buffered {self.buf!r}")
        index = self.buf.index(sep) + len(sep)
        data, self.buf = self.buf[:index], self.buf[index:]
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._recv():
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> tuple[int, dict[str, str]]:
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_chunk(self) -> bytes | None:
        """One HTTP chunk's payload; None for the terminating chunk (trailers consumed)."""
        size = int(self.read_until(b"\r\n")[:-2], 16)
        if size == 0:
            self.read_until(b"\r\n")
            return None
        data = self.read_exact(size)
        assert self.read_exact(2) == b"\r\n"
        return data

    def read_to_eof(self) -> bytes:
        while self._recv():
            pass
        data, self.buf = self.buf, b""
        return data


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Minimal SSE parser: one dict per block; comments collected under 'comments'."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event: dict[str, Any] = {"comments": []}
        for line in block.split("\n"):
            if line.startswith(":"):
                event["comments"].append(line[1:].strip())
            else:
                name, _, value = line.partition(": ")
                event[name] = value
        events.append(event)
    return events


def data_events(text: str) -> list[dict[str, Any]]:
    return [e for e in parse_sse(text) if "data" in e]


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


# ----------------------------------------------------------------------------------------------------
# /events
# ----------------------------------------------------------------------------------------------------


def test_events_wire_format_one_chunk_per_event_and_clean_end(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=3&interval=0.01")
        status, headers = client.read_head()
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        assert headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers
        assert "x-accel-buffering" not in headers
        chunks = []
        while (chunk := client.read_chunk()) is not None:
            chunks.append(chunk)
        assert chunks == [sse_event_bytes(n, 3) for n in (1, 2, 3)]
        assert chunks[0] == b'id: 1\ndata: {"seq":1}\n\n'
        assert client.read_to_eof() == b""  # /events never reuses the connection


def test_events_with_httpx_ids_and_timing(origin: OriginServer) -> None:
    started = time.monotonic()
    arrivals = []
    params = {"count": 5, "interval": 0.1}
    with httpx.Client(timeout=5) as client, client.stream("GET", f"{origin.url}/events", params=params) as response:
        assert response.headers["content-type"] == "text/event-stream"
        text = ""
        for piece in response.iter_text():
            arrivals.append(time.monotonic())
            text += piece
    events = data_events(text)
    assert [e["id"] for e in events] == ["1", "2", "3", "4", "5"]
    assert [json.loads(e["data"])["seq"] for e in events] == [1, 2, 3, 4, 5]
    elapsed = arrivals[-1] - started
    assert 0.35 <= elapsed < 2.0, elapsed
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert record.events_sent == 5
    assert record.outcome == "complete"
    assert record.query == {"count": "5", "interval": "0.1"}


@pytest.mark.parametrize("how", ["header", "query"])
def test_last_event_id_resumes_and_keeps_total(origin: OriginServer, how: str) -> None:
    headers = {"Last-Event-ID": "3"} if how == "header" else {}
    query = "" if how == "header" else "&lastEventId=3"
    response = httpx.get(f"{origin.url}/events?count=5&interval=0{query}", headers=headers, timeout=5)
    events = data_events(response.text)
    assert [int(e["id"]) for e in events] == [4, 5]
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert record.last_event_id == 3
    assert record.events_sent == 2


def test_last_event_id_past_the_end_sends_no_event(origin: OriginServer) -> None:
    response = httpx.get(f"{origin.url}/events?count=2", headers={"Last-Event-ID": "9"}, timeout=5)
    assert response.status_code == 200
    assert data_events(response.text) == []


def test_heartbeat_pings_while_idle(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1&start_delay=0.55&heartbeat=0.1")
        client.read_head()
        head_at = client.last_recv_at
        assert head_at is not None
        pings: list[float] = []
        while (chunk := client.read_chunk()) is not None:
            assert client.last_recv_at is not None
            if chunk == b": ping\n\n":
                pings.append(client.last_recv_at)
            else:
                event_at = client.last_recv_at
                assert chunk == sse_event_bytes(1, 1)
    assert 3 <= len(pings) <= 6, pings
    gaps = [b - a for a, b in zip([head_at, *pings], pings, strict=False)]
    assert all(0.05 <= gap <= 0.3 for gap in gaps), gaps
    assert event_at - head_at >= 0.5
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert record.pings_sent == len(pings)


@pytest.mark.parametrize("accel", ["yes", "no"])
def test_accel_header(origin: OriginServer, accel: str) -> None:
    response = httpx.get(f"{origin.url}/events?count=1&accel={accel}", timeout=5)
    assert response.headers["x-accel-buffering"] == accel


def test_late_flush_sends_headers_with_first_event(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1&flush_headers=0&start_delay=0.3")
        status, _ = client.read_head()
        assert status == 200
        assert client.first_recv_at is not None
        assert client.first_recv_at - client.sent_at >= 0.25
        # Headers and the first event left in one write: the event is already buffered with the head.
        assert client.buf.startswith(b"%x\r\n" % len(sse_event_bytes(1, 1)))


def test_prompt_flush_sends_headers_at_once(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1&start_delay=0.5")
        client.read_head()
        assert client.first_recv_at is not None
        assert client.first_recv_at - client.sent_at < 0.3
        assert client.buf == b""


def test_first_byte_delay(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1&first_byte_delay=0.3")
        client.read_head()
        assert client.first_recv_at is not None
        assert client.first_recv_at - client.sent_at >= 0.25


def test_end_close_has_no_terminating_chunk(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=2&interval=0&end=close")
        client.read_head()
        assert client.read_chunk() == sse_event_bytes(1, 2)
        assert client.read_chunk() == sse_event_bytes(2, 2)
        assert client.read_to_eof() == b""  # closed right after the last event: no "0\r\n\r\n"
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{origin.url}/events?count=2&interval=0&end=close", timeout=5)
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert record.outcome == "closed"


def test_close_after_cuts_mid_stream(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=5&interval=0&close_after=2")
        client.read_head()
        assert client.read_chunk() == sse_event_bytes(1, 5)
        assert client.read_chunk() == sse_event_bytes(2, 5)
        with pytest.raises(EOFError):
            client.read_chunk()
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert (record.events_sent, record.outcome) == (2, "closed")


def test_end_hang_keeps_connection_open_until_max_life(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1&end=hang&max_life=0.5")
        client.read_head()
        assert client.read_chunk() == sse_event_bytes(1, 1)
        event_at = client.last_recv_at
        assert event_at is not None
        assert client.read_to_eof() == b""  # nothing more, then the close at max_life
        closed_at = time.monotonic()
    assert closed_at - client.sent_at >= 0.45
    record = origin.wait_for_request(lambda r: r.finished, timeout=5)
    assert record.outcome == "max_life"


def test_framing_close_delimits_body_by_close(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=3&interval=0&framing=close")
        status, headers = client.read_head()
        assert status == 200
        assert "transfer-encoding" not in headers and "content-length" not in headers
        assert client.read_to_eof() == b"".join(sse_event_bytes(n, 3) for n in (1, 2, 3))
    response = httpx.get(f"{origin.url}/events?count=3&interval=0&framing=close", timeout=5)
    assert [e["id"] for e in data_events(response.text)] == ["1", "2", "3"]


def test_retry_field_comes_first(origin: OriginServer) -> None:
    response = httpx.get(f"{origin.url}/events?count=1&retry=1500", timeout=5)
    assert response.text.startswith("retry: 1500\n\n")


def test_task_progress_and_done_event(origin: OriginServer) -> None:
    response = httpx.get(f"{origin.url}/events?count=4&interval=0&task=up-1", timeout=5)
    events = data_events(response.text)
    payloads = [json.loads(e["data"]) for e in events]
    assert [p["progress"] for p in payloads] == [25, 50, 75, 100]
    assert all(p["task"] == "up-1" for p in payloads)
    assert [p["seq"] for p in payloads] == [1, 2, 3, 4]
    assert [e.get("event") for e in events] == [None, None, None, "done"]


def test_size_pads_event_data(origin: OriginServer) -> None:
    response = httpx.get(f"{origin.url}/events?count=2&interval=0&size=500", timeout=5)
    for event in data_events(response.text):
        assert 490 <= len(event["data"]) <= 510
        assert json.loads(event["data"])["seq"] in (1, 2)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("count=abc", "count"),
        ("count=-1", "count"),
        ("interval=x", "interval"),
        ("interval=nan", "interval"),
        ("heartbeat=0", "heartbeat"),
        ("accel=maybe", "accel"),
        ("flush_headers=2", "flush_headers"),
        ("end=explode", "end"),
        ("framing=gzip", "framing"),
        ("close_after=1.5", "close_after"),
        ("lastEventId=x", "lastEventId"),
    ],
)
def test_bad_event_parameters_are_400(origin: OriginServer, query: str, named: str) -> None:
    response = httpx.get(f"{origin.url}/events?{query}", timeout=5)
    assert response.status_code == 400
    assert named in response.text


def test_client_disconnect_is_logged_and_stops_the_handler(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/events?count=1000&interval=0.05")
        client.read_head()
        client.read_chunk()
        closed_at = time.monotonic()
    record = origin.wait_for_request(lambda r: r.outcome is not None, timeout=5)
    assert record.outcome == "client_disconnected"
    assert record.client_closed_at is not None
    assert record.client_closed_at >= closed_at
    assert record.client_closed_at - closed_at < 1.0
    assert record.events_sent < 100
    assert record.connection_opened_at <= record.received_at <= record.client_closed_at


def test_client_disconnect_noticed_while_idle(origin: OriginServer) -> None:
    """No write is pending (end=hang): the EOF itself must be seen, not a failed write."""
    with RawClient(origin.port) as client:
        client.get("/events?count=1&end=hang")
        client.read_head()
        client.read_chunk()
        closed_at = time.monotonic()
    record = origin.wait_for_request(lambda r: r.outcome is not None, timeout=5)
    assert record.outcome == "client_disconnected"
    assert record.client_closed_at is not None and record.client_closed_at - closed_at < 1.0


# ----------------------------------------------------------------------------------------------------
# /bytes, /upload, small endpoints, keep-alive
# ----------------------------------------------------------------------------------------------------


def test_bytes_deterministic_with_sha_header(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.get("/bytes?size=100000&seed=7&chunk=30000")
        status, headers = client.read_head()
        assert status == 200
        assert headers["content-length"] == "100000"
        body = client.read_exact(100000)
    assert body == expected_bytes(100000, 7)
    assert headers["x-content-sha256"] == hashlib.sha256(body).hexdigest() == expected_sha256(100000, 7)
    assert expected_bytes(1000, 7) == body[:1000]  # a prefix of the same stream
    assert expected_bytes(1000, 8) != body[:1000]


def test_bytes_rate_paces_the_body(origin: OriginServer) -> None:
    started = time.monotonic()
    response = httpx.get(f"{origin.url}/bytes?size=20000&chunk=2000&rate=50000", timeout=5)
    elapsed = time.monotonic() - started
    assert response.content == expected_bytes(20000, 0)
    assert 0.3 <= elapsed < 2.0, elapsed  # 18000 bytes wait for their slot at 50000 B/s = 0.36 s


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_reports_size_and_hash(origin: OriginServer, chunked: bool) -> None:
    payload = expected_bytes(300_000, 3)

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(payload), 65536):
            yield payload[offset : offset + 65536]

    content: Any = pieces() if chunked else payload
    response = httpx.post(f"{origin.url}/upload", content=content, timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["size"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    assert body["seconds"] >= 0
    record = origin.wait_for_request(lambda r: r.path == "/upload", timeout=5)
    assert record.header("transfer-encoding") == ("chunked" if chunked else None)


def test_upload_expect_continue_and_timing(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert client.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100")
        client.send(b"5\r\nhello\r\n")
        time.sleep(0.2)  # the measured quantity: a gap between two body chunks
        client.send(b"6\r\n world\r\n0\r\n\r\n")
        status, headers = client.read_head()
        result = json.loads(client.read_exact(int(headers["content-length"])))
    assert status == 200
    assert result["size"] == 11
    assert result["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert 0.15 <= result["seconds"] < 2.0


def test_keep_alive_and_pipelining(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        # Two requests in one write: the second must wait in the buffer, not be lost to the EOF watcher.
        client.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /status/418 HTTP/1.1\r\nHost: x\r\n\r\n")
        for expected in (200, 418):
            status, headers = client.read_head()
            assert status == expected
            client.read_exact(int(headers["content-length"]))
        client.get("/bytes?size=10", headers={"Connection": "close"})
        status, headers = client.read_head()
        assert headers["connection"] == "close"
        assert client.read_to_eof() == expected_bytes(10, 0)
    records = origin.requests
    assert [r.path for r in records] == ["/health", "/status/418", "/bytes"]
    assert len({r.connection_id for r in records}) == 1


def test_status_delay_health_log_and_404(origin: OriginServer) -> None:
    with httpx.Client(base_url=origin.url, timeout=5) as client:
        assert client.get("/status/503").status_code == 503
        assert client.get("/status/204").content == b""
        assert client.get("/status/99").status_code == 400
        started = time.monotonic()
        assert client.get("/delay/0.3").json() == {"delayed": 0.3}
        assert time.monotonic() - started >= 0.28
        assert client.get("/health").json() == {"ok": True}
        assert client.get("/nope").status_code == 404
        assert client.post("/events").status_code == 405
        log = client.get("/_log").json()
    assert [entry["path"] for entry in log] == [
        "/status/503",
        "/status/204",
        "/status/99",
        "/delay/0.3",
        "/health",
        "/nope",
        "/events",
    ]
    assert log[0]["status"] == 503


def test_malformed_request_line_is_400(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.send(b"NONSENSE\r\n\r\n")
        status, _ = client.read_head()
        assert status == 400


# ----------------------------------------------------------------------------------------------------
# Ways to run it
# ----------------------------------------------------------------------------------------------------


def test_async_start_stop_on_callers_loop() -> None:
    async def scenario() -> tuple[list[int], RequestRecord]:
        async with OriginServer() as server:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"{server.url}/events?count=2&interval=0")
            record = await server.wait_for_request_async(lambda r: r.finished, timeout=5)
            return [int(e["id"]) for e in data_events(response.text)], record

    ids, record = asyncio.run(scenario())
    assert ids == [1, 2]
    assert record.events_sent == 2


def test_stop_cuts_hanging_streams_promptly() -> None:
    server = OriginServer().start_in_thread()
    client = RawClient(server.port)
    try:
        client.get("/events?count=1&end=hang")
        client.read_head()
        client.read_chunk()
        started = time.monotonic()
        server.stop_in_thread()
        assert time.monotonic() - started < 3.0
        assert client.read_to_eof() == b""
    finally:
        client.sock.close()
        server.stop_in_thread()
    assert server.requests[0].outcome == "server_stopped"


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "faultproxy.testing.origin", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)  # deadline for the banner line
        assert ready, "no banner within 10 s"
        line = proc.stdout.readline()
        assert line.startswith("origin listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert httpx.get(f"{url}/health", timeout=5).json() == {"ok": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
