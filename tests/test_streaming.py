"""Streaming faults end to end: the real SSE origin, a real `mitmdump` running faultproxy, real clients on
loopback (raw HTTP/1.1 sockets, the h2 library over TLS with ALPN h2, httpx, curl).

One proxy serves the whole module: its profile has one rule per scenario, selected by the request header
`x-fault: <rule>` (request headers match on HTTP/1.1 and HTTP/2 alike), so each test pays no proxy start.
Every request carries a unique `tag` query parameter (the origin ignores it) to find its origin record and
journal entry. Times are `time.monotonic()` in this process, which is also the origin's clock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from faultproxy.testing.clients import GzipStream, H1Client, H2Client, SseParser, run_in_threads
from faultproxy.testing.origin import OriginServer, RequestRecord, expected_bytes, sse_event_bytes
from faultproxy.testing.proxy import ProxyProcess
from faultproxy.testing.tls import TlsRelay, self_signed_cert

LOCAL = "127.0.0.1"
INTERNAL_ERROR = 2


def rule(name: str, *faults: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "match": {"headers": {"x-fault": name}}, "faults": list(faults)}


PROFILE = {
    "version": 1,
    "name": "streaming",
    "rules": [
        rule("buffer-all", {"type": "buffer", "size": "all"}),
        rule("buffer-4k", {"type": "buffer", "size": "4k"}),
        rule("buffer-events", {"type": "buffer", "events": 1}),
        rule("buffer-flush", {"type": "buffer", "size": "all", "flush_interval": "250ms"}),
        rule("compress", {"type": "compress"}),
        rule("throttle", {"type": "throttle", "rate": "20000/s", "burst": 2000}),
        rule("throttle-up", {"type": "throttle", "rate": "100KiB/s", "burst": "8k", "direction": "request"}),
        rule("slice", {"type": "slice", "size": 5, "delay": "20ms"}),
        rule("stall", {"type": "stall", "after_events": 2, "for": "500ms"}),
        rule("stall-forever", {"type": "stall", "after_events": 1}),
        rule("idle", {"type": "timeout", "scope": "idle", "after": "400ms"}),
        rule("idle-rst", {"type": "timeout", "scope": "idle", "after": "400ms", "action": "rst_stream",
                          "code": "INTERNAL_ERROR", "http1": "close"}),
        rule("first-byte", {"type": "timeout", "scope": "first_byte", "after": "300ms", "body": "upstream timed out"}),
        rule("total", {"type": "timeout", "scope": "total", "after": "700ms"}),
        rule("cut-end", {"type": "cut", "after_events": 3, "action": "end"}),
        rule("cut-close", {"type": "cut", "after_events": 3, "action": "close"}),
        rule("cut-rst", {"type": "cut", "after_events": 3, "action": "rst_stream", "code": "CANCEL", "http1": "close"}),
        rule("cut-sliced", {"type": "slice", "size": 7}, {"type": "cut", "after_events": 3, "action": "end"}),
        rule("cut-coalesced", {"type": "buffer", "size": "all"}, {"type": "cut", "after_events": 3, "action": "end"}),
        rule("cut-then-buffer", {"type": "cut", "after_events": 3, "action": "end"}, {"type": "buffer", "size": "all"}),
        rule("close-then-buffer", {"type": "cut", "after_events": 3, "action": "close"}, {"type": "buffer", "size": "all"}),
        rule("compress-cut", {"type": "compress"}, {"type": "cut", "after_events": 3, "action": "end"}),
        rule("cut-bytes", {"type": "cut", "after_bytes": 50, "action": "end"}),
        rule("cut-time", {"type": "cut", "after": "250ms", "action": "end"}),
        rule("cut-status", {"type": "cut", "after_events": 1, "action": "status"}),
        rule("cut-reset", {"type": "cut", "after_events": 1, "action": "reset"}),
        rule("cut-at-once-end", {"type": "cut", "after_bytes": 0, "action": "end"}),
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer(LOCAL, 0) as o:
        yield o


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(PROFILE, upstream=origin.url, confdir=fault_confdir, workdir=tmp_path_factory.mktemp("streaming"))
    p.start()
    try:
        yield p
    finally:
        p.stop()


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def events_path(tag: str, **params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"/events?tag={tag}&{query}" if query else f"/events?tag={tag}"


def expected_events(count: int, first: int = 1, last: int | None = None) -> bytes:
    return b"".join(sse_event_bytes(i, count) for i in range(first, (last or count) + 1))


def record_of(origin: OriginServer, tag: str, timeout: float = 5.0) -> RequestRecord:
    return origin.wait_for_request(lambda r: r.query.get("tag") == tag, timeout=timeout)


def finished_record(origin: OriginServer, tag: str, timeout: float = 5.0) -> RequestRecord:
    return origin.wait_for_request(lambda r: r.query.get("tag") == tag and r.finished, timeout=timeout)


def journal_of(proxy: ProxyProcess, tag: str, fault: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    return proxy.wait_for_journal(
        lambda e: tag in str(e.get("path", "")) and (fault is None or e.get("fault") == fault), timeout=timeout
    )


def h1_get(proxy: ProxyProcess, path: str, fault: str | None, headers: dict[str, str] | None = None) -> H1Client:
    c = H1Client(LOCAL, proxy.port)
    hdrs = {"accept": "text/event-stream", **({"x-fault": fault} if fault else {}), **(headers or {})}
    c.get(path, hdrs)
    return c


def sse_of(arrivals: list[tuple[float, bytes]]) -> SseParser:
    p = SseParser()
    for at, piece in arrivals:
        p.feed(piece, at)
    return p


def health_latencies(proxy: ProxyProcess, n: int = 5) -> list[float]:
    out = []
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            started = time.monotonic()
            assert client.get(f"{proxy.url}/health").json() == {"ok": True}
            out.append(time.monotonic() - started)
    return out


# ==================================================================================================
# buffer


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_buffer_all_holds_the_whole_stream_until_it_ends(proxy, origin, proto):
    tag = new_tag()
    path = events_path(tag, count=5, interval=0.08)
    if proto == "h1":
        with h1_get(proxy, path, "buffer-all") as c:
            assert c.pump(timeout=5) and c.complete
            arrivals, headers_at = c.arrivals, c.headers_at
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, {"x-fault": "buffer-all"})
            assert c.pump(lambda: c.stream(sid).done, 5) and c.stream(sid).ended_at
            arrivals, headers_at = c.stream(sid).arrivals, c.stream(sid).headers_at
    assert b"".join(p for _, p in arrivals) == expected_events(5)
    rec = finished_record(origin, tag)
    assert rec.outcome == "complete"
    assert headers_at is not None and arrivals[0][0] >= headers_at + 0.25, "body bytes arrived before the end"
    assert arrivals[-1][0] - arrivals[0][0] < 0.05, "the held body was not released at once"
    assert "upstream ended" in journal_of(proxy, tag)["outcome"]


def test_buffer_size_coalesces_to_at_least_that_many_bytes(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=12, interval=0.01, size=1000), "buffer-4k") as c:
        assert c.pump(timeout=5) and c.complete
        assert c.body == b"".join(sse_event_bytes(i, 12, size=1000) for i in range(1, 13))
        # One HTTP chunk per released piece: each at least 4 KiB except the rest at the end.
        assert all(size >= 4096 for size in c.chunk_sizes[:-1]), c.chunk_sizes
        assert len(c.chunk_sizes) <= 4


def test_buffer_events_holds_each_event_until_the_next_one_arrives(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=4, interval=0.15), "buffer-events") as c:
        assert c.pump(timeout=5) and c.complete
        events = sse_of(c.arrivals).events
    rec = record_of(origin, tag)
    assert [e.data for e in events] == [f'{{"seq":{i}}}' for i in range(1, 5)]
    for i, ev in enumerate(events[:-1]):
        next_sent = rec.received_at + (i + 1) * 0.15
        assert ev.at >= next_sent - 0.03, f"event {i + 1} arrived before event {i + 2} was sent"
        assert ev.at <= next_sent + 0.15, f"event {i + 1} held too long"


def test_buffer_flush_interval_releases_on_a_clock(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=16, interval=0.05), "buffer-flush") as c:
        assert c.pump(timeout=5) and c.complete
        assert c.body == expected_events(16)
        times = [t for t, _ in c.arrivals]
    # 0.8 s of events, released every 0.25 s (and the rest at the end): a handful of bursts, not 16 pieces.
    assert 3 <= len(times) <= 5, [round(t - times[0], 3) for t in times]
    gaps = [b - a for a, b in zip(times, times[1:-1])]
    assert all(0.18 <= g <= 0.35 for g in gaps), gaps


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_upstream_failure_after_held_bytes_shows_as_without_faults(proxy, origin, proto):
    """The origin closes mid-body (no terminating chunk): what the buffer held goes out, then the break
    shows as mitmproxy shows it without faults (HTTP/1.1: connection closed; HTTP/2: RST_STREAM)."""
    path = events_path(new_tag(), count=4, interval=0.03, end="close")
    if proto == "h1":
        with h1_get(proxy, path, "buffer-all") as c:
            assert c.pump(timeout=5) and c.eof_at is not None and not c.complete
            assert c.body == expected_events(4)
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, {"x-fault": "buffer-all"})
            assert c.pump(lambda: c.stream(sid).done, 5)
            assert c.stream(sid).reset_code == INTERNAL_ERROR and c.stream(sid).data == expected_events(4)


def test_buffer_skipped_when_upstream_sends_x_accel_buffering_no(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=4, interval=0.1, accel="no"), "buffer-all") as c:
        assert c.pump(timeout=5) and c.complete
        events = sse_of(c.arrivals).events
    rec = record_of(origin, tag)
    assert len(events) == 4
    for i, ev in enumerate(events):
        assert ev.at - (rec.received_at + i * 0.1) < 0.12, f"event {i + 1} was held"


@pytest.mark.parametrize("kind", ["buffer-all", "stall-forever"])
def test_other_flows_keep_full_speed_while_one_stream_is_held(proxy, origin, kind):
    baseline = health_latencies(proxy, 3)
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=1000, interval=0.01), kind) as held:
        assert held.pump(lambda: held.status is not None, 5)
        time.sleep(0.2)  # let the held stream build up a backlog; the measurement below is what counts
        during = health_latencies(proxy, 8)
        # ... and a concurrent stream on the same proxy flows on schedule.
        tag2 = new_tag()
        with h1_get(proxy, events_path(tag2, count=6, interval=0.05), None) as other:
            assert other.pump(timeout=5) and other.complete
            events = sse_of(other.arrivals).events
        rec2 = record_of(origin, tag2)
        lateness = [ev.at - (rec2.received_at + i * 0.05) for i, ev in enumerate(events)]
    assert len(events) == 6
    assert max(during) < 0.5 and statistics.median(during) < max(0.1, 3 * statistics.median(baseline)), (baseline, during)
    assert max(lateness) < 0.15, lateness


def test_h2_other_stream_on_the_same_connection_flows_while_one_is_stalled(proxy, origin):
    ta, tb = new_tag(), new_tag()
    with H2Client(LOCAL, proxy.port) as c:
        a = c.get(events_path(ta, count=1000, interval=0.01), {"x-fault": "stall-forever"})
        b = c.get(events_path(tb, count=6, interval=0.05))
        assert c.pump(lambda: c.stream(b).done, 5) and c.stream(b).ended_at
        events = sse_of(c.stream(b).arrivals).events
        assert sse_of(c.stream(a).arrivals).data() == ['{"seq":1}']
        rec_b = record_of(origin, tb)
        lateness = [ev.at - (rec_b.received_at + i * 0.05) for i, ev in enumerate(events)]
        assert len(events) == 6 and max(lateness) < 0.15, lateness
        assert not c.stream(a).done


# ==================================================================================================
# compress


def test_compress_holds_the_stream_and_decompresses_byte_identical(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=5, interval=0.1), "compress", {"accept-encoding": "gzip"}) as c:
        assert c.pump(timeout=5) and c.complete
        assert c.headers["content-encoding"] == "gzip" and "content-length" not in c.headers
        assert "accept-encoding" in c.headers.get("vary", "").lower()
        gz = GzipStream()
        for at, piece in c.arrivals:
            gz.feed(piece, at)
        assert gz.finished and gz.data == expected_events(5)
        # Like nginx with gzip + buffering: not even the gzip header before the end.
        assert c.arrivals[0][0] >= c.headers_at + 0.35, "compressed bytes went out before the stream ended"
    assert "held by the compressor" in journal_of(proxy, tag)["outcome"]


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_compress_with_x_accel_buffering_no_delivers_each_event_at_once(proxy, origin, proto):
    tag = new_tag()
    path = events_path(tag, count=5, interval=0.1, accel="no")
    headers = {"accept-encoding": "gzip", "x-fault": "compress"}
    if proto == "h1":
        with H1Client(LOCAL, proxy.port) as c:
            c.get(path, headers)
            assert c.pump(timeout=5) and c.complete
            arrivals, resp_headers = c.arrivals, c.headers
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, headers)
            assert c.pump(lambda: c.stream(sid).done, 5) and c.stream(sid).ended_at
            arrivals, resp_headers = c.stream(sid).arrivals, c.stream(sid).headers
    assert resp_headers["content-encoding"] == "gzip" and "content-length" not in resp_headers
    gz = GzipStream()
    for at, piece in arrivals:
        gz.feed(piece, at)
    assert gz.finished and gz.data == expected_events(5)
    events = sse_of(gz.pieces).events
    rec = record_of(origin, tag)
    assert len(events) == 5
    for i, ev in enumerate(events):
        assert ev.at - (rec.received_at + i * 0.1) < 0.12, f"event {i + 1} was not flushed at once"


def test_compress_leaves_clients_without_gzip_alone(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=2, interval=0), "compress", {"accept-encoding": "identity"}) as c:
        assert c.pump(timeout=5) and c.complete
        assert "content-encoding" not in c.headers and c.body == expected_events(2)


# ==================================================================================================
# throttle, slice


def test_throttle_paces_the_response(proxy, origin):
    size = 20000
    started = time.monotonic()
    with h1_get(proxy, f"/bytes?size={size}&seed=5&tag={new_tag()}", "throttle") as c:
        assert c.pump(timeout=10) and c.complete
        took = c.arrivals[-1][0] - started
        assert c.body == expected_bytes(size, 5)
        assert max(len(p) for _, p in c.arrivals) <= 2000 * 2  # pieces of at most `burst` (reads may join two)
    # 2000 bytes of burst at once, then 18000 at 20000 B/s: 0.9 s.
    assert 0.8 <= took <= 1.6, took


@pytest.mark.parametrize("proto", ["h1", "h2", "h2-no-length"])
def test_throttle_request_direction_slows_an_upload(proxy, origin, proto):
    body = expected_bytes(100_000, 9)

    def upload(fault: str | None) -> dict[str, Any]:
        headers = {"content-type": "application/octet-stream", **({"x-fault": fault} if fault else {})}
        if proto == "h1":
            with H1Client(LOCAL, proxy.port) as c:
                c.request("POST", f"/upload?tag={new_tag()}", headers, body)
                assert c.pump(timeout=10) and c.complete and c.status == 200
                return json.loads(c.body)
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.request("POST", f"/upload?tag={new_tag()}", headers, body, content_length=proto == "h2")
            assert c.pump(lambda: c.stream(sid).done, 10) and c.stream(sid).status == 200
            return json.loads(c.stream(sid).data)

    slow = upload("throttle-up")
    assert slow["size"] == len(body) and slow["sha256"] == hashlib.sha256(body).hexdigest()
    # 8 KiB of burst, then 92,000 bytes at 100 KiB/s: about 0.9 s between the origin's first and last read.
    assert 0.7 <= slow["seconds"] <= 1.6, slow
    if proto != "h2-no-length":
        # (Without a fault, mitmproxy itself loses an HTTP/2 body of unknown length on its way to an
        # HTTP/1.1 upstream: the origin gets no body. Only the streamed, faulted case is framed by us.)
        plain = upload(None)
        assert plain["size"] == len(body) and plain["seconds"] < 0.3, plain


def test_slice_dribbles_small_pieces_with_pauses(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=1, interval=0), "slice") as c:
        assert c.pump(timeout=5) and c.complete
        assert c.body == expected_events(1)
        assert all(size <= 5 for size in c.chunk_sizes) and len(c.chunk_sizes) == -(-len(expected_events(1)) // 5)
        times = [t for t, _ in c.arrivals]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.015 and statistics.median(gaps) < 0.06, gaps
    assert "sliced into" in journal_of(proxy, tag)["outcome"]


# ==================================================================================================
# stall


def test_stall_goes_silent_then_delivers_what_it_held(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=6, interval=0.05), "stall") as c:
        assert c.pump(timeout=5) and c.complete
        events = sse_of(c.arrivals).events
    assert c.body == expected_events(6)
    rec = record_of(origin, tag)
    assert events[1].at - (rec.received_at + 0.05) < 0.12, "the first two events were held"
    assert events[2].at - events[1].at >= 0.45, "no silence after the trigger"
    assert events[2].at - events[1].at <= 0.8
    assert events[-1].at - events[2].at < 0.05, "the held events did not come out at once"
    assert "stalled" in journal_of(proxy, tag)["outcome"]


def test_stall_until_the_client_gives_up_then_upstream_is_closed(proxy, origin):
    tag = new_tag()
    c = h1_get(proxy, events_path(tag, count=1000, interval=0.02), "stall-forever")
    try:
        assert c.pump(lambda: len(sse_of(c.arrivals).events) >= 1, 5)
        assert not c.pump(lambda: len(c.body) > len(expected_events(1)), 0.4), "data after the stall began"
    finally:
        c.close()
    rec = finished_record(origin, tag)
    assert rec.outcome == "client_disconnected" and rec.client_disconnected
    assert "until the client gives up" in journal_of(proxy, tag)["outcome"]


# ==================================================================================================
# timeout


def test_idle_timeout_cuts_a_silent_stream_h1(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=2, interval=0.05, end="hang"), "idle") as c:
        assert c.pump(timeout=5)
        assert c.eof_at is not None and not c.complete, "not a truncated chunked body"
        assert c.body == expected_events(2)
        silent_for = c.eof_at - c.arrivals[-1][0]
    assert 0.35 <= silent_for <= 0.65, silent_for
    rec = finished_record(origin, tag)
    assert rec.client_disconnected, "the upstream connection stayed open"
    entry = journal_of(proxy, tag)
    assert "no upstream byte for 0.400s" in entry["outcome"] and "connection closed" in entry["outcome"]


def test_idle_timeout_rst_stream_h2(proxy, origin):
    tag = new_tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_path(tag, count=2, interval=0.05, end="hang"), {"x-fault": "idle-rst"})
        other = c.get(events_path(new_tag(), count=12, interval=0.05))
        assert c.pump(lambda: c.stream(sid).done and c.stream(other).done, 5)
        st = c.stream(sid)
        assert st.reset_code == INTERNAL_ERROR and st.data == expected_events(2)
        assert 0.35 <= st.reset_at - st.arrivals[-1][0] <= 0.65
        assert c.stream(other).ended_at and c.stream(other).data == expected_events(12), "the reset hit another stream"
    assert finished_record(origin, tag).client_disconnected


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_heartbeats_more_often_than_the_idle_timeout_keep_the_stream_alive(proxy, origin, proto):
    tag = new_tag()
    path = events_path(tag, count=3, interval=0.6, heartbeat=0.1)
    if proto == "h1":
        with h1_get(proxy, path, "idle") as c:
            assert c.pump(timeout=5) and c.complete, "the stream was cut"
            parsed = sse_of(c.arrivals)
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, {"x-fault": "idle-rst"})
            assert c.pump(lambda: c.stream(sid).done, 5)
            assert c.stream(sid).ended_at and c.stream(sid).reset_code is None, "the stream was reset"
            parsed = sse_of(c.stream(sid).arrivals)
    assert len(parsed.events) == 3 and len(parsed.comments) >= 8
    assert finished_record(origin, tag).outcome == "complete"


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_first_byte_timeout_answers_504_before_headers(proxy, origin, proto):
    tag = new_tag()
    path = events_path(tag, count=1, first_byte_delay=1.5)
    started = time.monotonic()
    if proto == "h1":
        with h1_get(proxy, path, "first-byte") as c:
            assert c.pump(timeout=5) and c.complete
            status, body, at = c.status, c.body, c.headers_at
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, {"x-fault": "first-byte"})
            assert c.pump(lambda: c.stream(sid).done, 5) and c.stream(sid).ended_at
            status, body, at = c.stream(sid).status, c.stream(sid).data, c.stream(sid).headers_at
    assert status == 504 and body == b"upstream timed out"
    assert at is not None and 0.25 <= at - started <= 0.6, at - started
    rec = finished_record(origin, tag)
    assert rec.client_disconnected and rec.status is None, "the upstream was not abandoned before its headers"
    assert journal_of(proxy, tag)["outcome"].startswith("status 504")


def test_total_timeout_cuts_even_with_heartbeats(proxy, origin):
    tag = new_tag()
    started = time.monotonic()
    with h1_get(proxy, events_path(tag, count=50, interval=0.1, heartbeat=0.03), "total") as c:
        assert c.pump(timeout=5)
        assert c.eof_at is not None and not c.complete
        took = c.eof_at - started
        assert 5 <= len(sse_of(c.arrivals).events) <= 8
    assert 0.65 <= took <= 1.0, took
    assert "exchange not done for 0.700s" in journal_of(proxy, tag)["outcome"]


# ==================================================================================================
# cut: exact boundaries, actions


@pytest.mark.parametrize("fault", ["cut-end", "cut-sliced", "cut-coalesced"])
def test_after_events_leaves_exactly_n_events_h1(proxy, origin, fault):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02 if fault != "cut-coalesced" else 0), fault) as c:
        assert c.pump(timeout=5) and c.complete, "action end: a clean end of the body"
        assert c.body == expected_events(3)
        assert len(sse_of(c.arrivals).events) == 3
    if fault != "cut-coalesced":  # (buffered until the origin ended: nothing left to close)
        assert finished_record(origin, tag).client_disconnected, "the upstream was not closed"


@pytest.mark.parametrize("fault", ["cut-end", "cut-sliced", "cut-coalesced", "cut-rst", "cut-close"])
def test_after_events_leaves_exactly_n_events_h2(proxy, origin, fault):
    tag = new_tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_path(tag, count=40, interval=0.02 if fault != "cut-coalesced" else 0), {"x-fault": fault})
        assert c.pump(lambda: c.stream(sid).done or c.closed_at is not None, 5)
        st = c.stream(sid)
        assert st.data == expected_events(3) and len(sse_of(st.arrivals).events) == 3
        if fault == "cut-rst":
            assert st.reset_code == 8 and c.closed_at is None  # CANCEL, this stream only
        elif fault == "cut-close":
            assert c.closed_at is not None and not st.done  # FIN: the whole connection goes
        else:
            assert st.ended_at is not None and st.reset_code is None
    if fault != "cut-coalesced":
        assert finished_record(origin, tag).client_disconnected


def test_holding_stages_after_a_cut(proxy, origin):
    # A clean end before a buffer: the buffer sees an end and releases exactly the three events.
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02), "cut-then-buffer") as c:
        assert c.pump(timeout=5) and c.complete
        assert c.body == expected_events(3)
    # A close before a buffer: the buffering hop's upstream broke, what it held is lost (headers only).
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02), "close-then-buffer") as c:
        assert c.pump(timeout=5) and c.eof_at is not None and not c.complete
        assert c.status == 200 and c.body == b""
    # compress written before the cut still runs last (it changes the bytes): the cut counts the
    # upstream's events, and the client decodes exactly three from a complete gzip body.
    tag = new_tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_path(tag, count=40, interval=0.02), {"x-fault": "compress-cut", "accept-encoding": "gzip"})
        assert c.pump(lambda: c.stream(sid).done, 5) and c.stream(sid).ended_at
        gz = GzipStream()
        for at, piece in c.stream(sid).arrivals:
            gz.feed(piece, at)
        assert c.stream(sid).headers["content-encoding"] == "gzip"
        assert gz.finished and gz.data == expected_events(3)


def test_cut_close_truncates_h1_and_closes_upstream(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02), "cut-close") as c:
        assert c.pump(timeout=5)
        assert c.eof_at is not None and not c.complete and c.error is None
        assert c.body == expected_events(3)
    rec = finished_record(origin, tag)
    assert rec.outcome == "client_disconnected" and rec.events_sent < 40


def test_cut_rst_stream_falls_back_to_close_for_h1(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02), "cut-rst") as c:
        assert c.pump(timeout=5) and c.eof_at is not None and not c.complete
        assert c.body == expected_events(3)
    assert "rst_stream needs HTTP/2" in journal_of(proxy, tag)["outcome"]


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_cut_at_once_with_end_is_a_clean_empty_body(proxy, origin, proto):
    """A trigger that has fired before the pipeline starts still finds the headers sent: mitmproxy 12 on
    Python 3.12 runs new tasks eagerly, which once made `end` fall back to a closed connection."""
    tag = new_tag()
    path = events_path(tag, count=20, interval=0.02)
    if proto == "h1":
        with h1_get(proxy, path, "cut-at-once-end") as c:
            assert c.pump(timeout=5)
            assert c.complete and c.error is None and c.body == b""
    else:
        with H2Client(LOCAL, proxy.port) as c:
            sid = c.get(path, {"accept": "text/event-stream", "x-fault": "cut-at-once-end"})
            assert c.pump(lambda: c.stream(sid).done, timeout=5)
            st = c.stream(sid)
            assert st.status == 200 and st.ended_at is not None and st.reset_code is None and st.data == b""
    assert "clean end of body" in journal_of(proxy, tag)["outcome"]


def test_cut_after_bytes_and_after_time(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.01), "cut-bytes") as c:
        assert c.pump(timeout=5) and c.complete and c.body == expected_events(40)[:50]
    tag = new_tag()
    started = time.monotonic()
    with h1_get(proxy, events_path(tag, count=40, interval=0.05), "cut-time") as c:
        assert c.pump(timeout=5) and c.complete
        took = c.arrivals[-1][0] - started if c.arrivals else 0
        assert expected_events(40).startswith(c.body) and 3 <= len(sse_of(c.arrivals).events) <= 7
    assert 0.2 <= took <= 0.5


def test_status_action_after_headers_falls_back_to_close_and_says_so(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.02), "cut-status") as c:
        assert c.pump(timeout=5)
        assert c.status == 200 and c.eof_at is not None and not c.complete
        assert c.body == expected_events(1)
    entry = journal_of(proxy, tag)
    assert "status impossible after response headers" in entry["outcome"]
    assert "connection closed" in entry["outcome"]


def test_reset_action_sends_tcp_rst(proxy, origin):
    tag = new_tag()
    with h1_get(proxy, events_path(tag, count=40, interval=0.05), "cut-reset") as c:
        assert c.pump(timeout=5)
        assert c.reset, f"no ECONNRESET: error={c.error!r} eof={c.eof_at}"
        assert expected_events(1).startswith(c.body)
    assert finished_record(origin, tag).client_disconnected


def test_curl_sees_the_truncation(proxy, origin):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    tag = new_tag()
    result = subprocess.run(
        [curl, "-sS", "-N", "--max-time", "5", "-H", "x-fault: cut-close", f"{proxy.url}{events_path(tag, count=40, interval=0.02)}"],
        capture_output=True,
        timeout=10,
    )
    assert result.returncode == 18, result.stderr  # CURLE_PARTIAL_FILE
    assert result.stdout == expected_events(3)


# ==================================================================================================
# regular proxy mode


class RegularProxy(ProxyProcess):
    """The same fault proxy as a regular (forward) proxy: absolute-form requests and CONNECT."""

    def build_command(self) -> list[str]:
        command = super().build_command()
        i = command.index("--mode")
        command[i + 1] = "regular"
        # CONNECT + TLS: the upstream is a throwaway certificate; connect lazily so an HTTP/2 client can
        # be offered h2 before the upstream (HTTP/1.1 only) is known.
        return command + ["--set", "ssl_insecure=true", "--set", "connection_strategy=lazy"]


@pytest.fixture(scope="module")
def regular(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = RegularProxy(PROFILE, upstream="http://unused.invalid", confdir=fault_confdir, workdir=tmp_path_factory.mktemp("regular"))
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def tls_origin(origin: OriginServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRelay]:
    cert, key = self_signed_cert(tmp_path_factory.mktemp("cert"))
    with TlsRelay(cert, key, (LOCAL, origin.port)) as relay:
        yield relay


def test_regular_mode_absolute_form(regular, origin):
    tag = new_tag()
    with H1Client(LOCAL, regular.port) as c:
        c.get(f"{origin.url}{events_path(tag, count=40, interval=0.02)}", {"x-fault": "cut-end"}, host=f"{LOCAL}:{origin.port}")
        assert c.pump(timeout=5) and c.complete and c.body == expected_events(3)
    assert finished_record(origin, tag).client_disconnected
    tag = new_tag()
    with H1Client(LOCAL, regular.port) as c:
        c.get(f"{origin.url}{events_path(tag, count=2, interval=0.05, end='hang')}", {"x-fault": "idle"})
        assert c.pump(timeout=5) and c.eof_at is not None and not c.complete and c.body == expected_events(2)


def test_regular_mode_connect_tls_h1(regular, origin, tls_origin):
    tag = new_tag()
    with H1Client(LOCAL, regular.port, connect=f"{LOCAL}:{tls_origin.port}", tls=True) as c:
        c.get(events_path(tag, count=5, interval=0.08), {"x-fault": "buffer-all"})
        assert c.pump(timeout=5) and c.complete and c.body == expected_events(5)
        assert c.arrivals[0][0] >= c.headers_at + 0.25
    tag = new_tag()
    with H1Client(LOCAL, regular.port, connect=f"{LOCAL}:{tls_origin.port}", tls=True) as c:
        c.get(events_path(tag, count=40, interval=0.02), {"x-fault": "cut-close"})
        assert c.pump(timeout=5) and c.eof_at is not None and not c.complete and c.body == expected_events(3)
    assert finished_record(origin, tag).client_disconnected


def test_regular_mode_connect_tls_h2(regular, origin, tls_origin):
    tag = new_tag()
    with H2Client(LOCAL, regular.port, connect=f"{LOCAL}:{tls_origin.port}") as c:
        sid = c.get(events_path(tag, count=40, interval=0.02), {"x-fault": "cut-rst"})
        other = c.get(events_path(new_tag(), count=4, interval=0.05), {"x-fault": "stall"})
        assert c.pump(lambda: c.stream(sid).done and c.stream(other).done, 5)
        assert c.stream(sid).reset_code == 8 and c.stream(sid).data == expected_events(3)
        assert c.stream(other).ended_at and c.stream(other).data == expected_events(4)
    assert finished_record(origin, tag).client_disconnected


def test_proxy_logged_no_errors(proxy, regular):
    for p in (proxy, regular):
        out = p.output()
        for bad in ("Traceback", "mitmproxy has crashed", "failed on"):
            assert bad not in out, out[-4000:]


def test_run_in_threads_helper_reports_errors():
    assert run_in_threads(lambda: 1, lambda: 2) == [1, 2]
    with pytest.raises(ZeroDivisionError):
        run_in_threads(lambda: 1 / 0)
