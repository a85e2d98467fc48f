"""The shipped profile library (issue 8), each profile end to end through the real proxy.

For every profile in profiles/: the symptom (a naive client or origin shows the failure the catalogue
describes) and the fix (the fixed client or origin does not), with `mitmdump -s addons/faultproxy.py` in
reverse mode in front of the real SSE origin, and a real, compliant EventSource client
(faultproxy.testing.sse_client) over HTTP/1.1 or HTTP/2 (TLS, h2). Durations are shrunk with the time
scale (a 60 s timeout at 0.005 takes 0.3 s), so the origin's parameters below are in scaled seconds;
every wait is bounded. Plus: the catalogue and the profiles agree, the new `blackhole` action, `extends:`
on shipped profiles, and stacking several profiles.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from faultproxy.cli import main as cli_main
from faultproxy.profile import load_profile, shipped_profiles
from faultproxy.testing.origin import OriginServer
from faultproxy.testing.proxy import ProxyProcess
from faultproxy.testing.sse_client import CLOSED, EventSource, fetch, fetch_events

CHECKOUT = Path(__file__).resolve().parent.parent
ADDON = CHECKOUT / "addons" / "faultproxy.py"
CATALOGUE = CHECKOUT / "docs" / "catalogue.md"

LIBRARY = [
    "nginx-gzip-buffered",
    "nginx-read-timeout",
    "nginx-upstream-closed",
    "cloudflare",
    "aws-alb",
    "aws-nlb",
    "cloudfront",
    "gcp-lb",
    "heroku",
    "go-write-timeout",
    "corporate-proxy",
    "h2-goaway-drain",
    "flaky-mobile",
]


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def start(fault_proxy: Callable[..., ProxyProcess]) -> Callable[..., ProxyProcess]:
    """A proxy with these profiles, through the checkout's addon script (as `mitmdump -s addons/faultproxy.py`)."""

    def make(profiles: Any, scale: float = 1.0, **kw: Any) -> ProxyProcess:
        return fault_proxy(profiles, script=ADDON, time_scale=scale, **kw)

    return make


def h1(proxy: ProxyProcess, query: str, **kw: Any) -> EventSource:
    """An EventSource over plain HTTP/1.1 (the naive default: no reconnection, as in the incident's onerror)."""
    kw.setdefault("reconnect", False)
    return EventSource(f"{proxy.url}/events?{query}", **kw)


def h2(proxy: ProxyProcess, query: str, **kw: Any) -> EventSource:
    """An EventSource over HTTP/2 (TLS, ALPN h2), as a browser talks to an HTTPS site."""
    kw.setdefault("reconnect", False)
    return EventSource(f"{proxy.https_url}/events?{query}", http2=True, cafile=str(proxy.ca_cert), **kw)


def tls_h1(proxy: ProxyProcess, query: str, **kw: Any) -> EventSource:
    """HTTPS but HTTP/1.1 only (ALPN http/1.1): the "fall back to HTTP/1.1" client."""
    kw.setdefault("reconnect", False)
    return EventSource(f"{proxy.https_url}/events?{query}", http2=False, cafile=str(proxy.ca_cert), **kw)


def finished(es: EventSource) -> bool:
    """The last connection ended cleanly (the origin sent everything, then the terminating chunk)."""
    return bool(es.attempts) and es.attempts[-1].outcome == "clean"


def drive(es: EventSource, timeout: float, until: Callable[[EventSource], bool] | None = None) -> EventSource:
    """Run the source (bounded), then close it."""
    es.run(timeout, until=until)
    es.close()
    return es


def concurrently(*scenarios: Callable[[], Any]) -> list[Any]:
    """Run independent scenarios at the same time (each is a bounded client run) and return their results
    in order: a profile's symptom and fix cases need not wait for each other."""
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = [pool.submit(f) for f in scenarios]
        return [f.result() for f in futures]


def seqs(es: EventSource) -> list[int]:
    return [json.loads(e.data)["seq"] for e in es.events]


def only(es: EventSource):
    assert len(es.attempts) == 1, [(a.outcome, a.net_error, a.detail) for a in es.attempts]
    return es.attempts[0]


def records(proxy: ProxyProcess, rule: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The journal's records of `rule`, waiting until there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in proxy.journal() if e.get("rule") == rule]
        if len(found) >= count or time.monotonic() >= deadline:
            assert len(found) >= count, f"{len(found)} journal records of {rule}, wanted {count}: {proxy.journal()}"
            return found
        time.sleep(0.02)


def assert_permanent_failure(es: EventSource, status: int) -> None:
    """What a browser's EventSource does with a non-200 answer: fail the connection, never reconnect."""
    a = only(es)
    assert a.status == status and a.outcome == "failed", (a.status, a.outcome, a.detail)
    assert es.ready_state == CLOSED and not es.events


def assert_resumed_without_loss(es: EventSource, count: int, min_attempts: int = 2) -> None:
    """Every event exactly once and in order, across several connections, each resuming after the last id."""
    assert seqs(es) == list(range(1, count + 1)), seqs(es)
    assert len(es.attempts) >= min_attempts, [(a.outcome, a.net_error) for a in es.attempts]
    seen = 0
    for a in es.attempts:
        assert a.last_event_id_sent == (str(seen) if seen else None), (a.index, a.last_event_id_sent, seen)
        seen += a.events
    assert es.attempts[-1].outcome == "clean"


def origin_events(origin: OriginServer) -> list[Any]:
    return [r for r in origin.requests if r.path == "/events"]


# --- the library and the catalogue ----------------------------------------------------------------


def test_library_profiles_are_shipped_valid_and_sourced(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = shipped_profiles()
    assert set(LIBRARY) <= set(shipped), sorted(set(LIBRARY) - set(shipped))
    for name in LIBRARY:
        profile = load_profile(name)
        assert profile.name == name
        assert len(profile.description) > 80, f"{name}: description too short"
        assert profile.references and all(r.startswith("https://") for r in profile.references), name
        text = shipped[name].read_text(encoding="utf-8")
        # Every rule carries a YAML comment saying where its numbers come from.
        blocks = re.split(r"\n  - name: ", "\n" + text.split("\nrules:\n", 1)[1])[1:]
        assert len(blocks) == len(yaml.safe_load(text)["rules"]), name
        for block in blocks:
            assert re.search(r"^\s+# ", block, re.M), f"{name}: rule {block.splitlines()[0]} has no sourcing comment"
    assert cli_main(["validate", *(str(shipped[n]) for n in LIBRARY)]) == 0
    capsys.readouterr()
    assert cli_main(["profiles"]) == 0
    listing = capsys.readouterr().out
    for name in LIBRARY:
        line = next((ln for ln in listing.splitlines() if ln.startswith(name + " ")), None)
        assert line is not None and "INVALID" not in line and len(line.split(None, 1)[1]) > 20, listing


def test_catalogue_has_an_entry_for_every_shipped_profile() -> None:
    text = CATALOGUE.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `?([a-z0-9-]+)`?\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    module = sys.modules[__name__]
    for name in shipped_profiles():
        assert name in sections, f"docs/catalogue.md has no section for {name}"
        body = sections[name]
        for part in ("**What the user sees**", "**Why**", "**Fix**"):
            assert part in body, f"catalogue entry {name} lacks {part}"
        if name in LIBRARY:
            tests = re.findall(r"`(test_[a-z0-9_]+)`", body)
            assert tests, f"catalogue entry {name} names no test"
            for t in tests:
                assert hasattr(module, t), f"catalogue entry {name} names {t}, which does not exist"
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    assert "docs/catalogue.md" in readme, "README does not link the catalogue"


def test_sse_client_parses_event_streams_as_the_spec_says() -> None:
    """The test client's parser: WHATWG event stream interpretation, fed in awkward pieces."""
    from faultproxy.testing.sse_client import Attempt

    es = EventSource("http://127.0.0.1:9/events")
    es._attempt = Attempt(index=0, started_at=time.monotonic(), last_event_id_sent=None)
    es._transport = object()  # type: ignore[assignment]  # parsing only: "a connection is open"
    stream = (
        "\ufeff: hello\r\n"  # BOM, then a comment
        "data: one\r\ndata:two\r\rid: 7\n\n"  # CRLF and CR line ends; then an id with no data: not an event
        "event: progress\ndata\n\n"  # `data` alone adds an empty line: dispatched with data ""
        "id: 8\n\n"  # no data: not dispatched, but the last event ID is 8
        "retry: 1500\nretry: 2.5\nid: bad\0id\ndata:  three\n\n"  # only digits set retry; NUL ids ignored
        "data: unfinished"  # never completed: discarded
    ).encode()
    for i in range(0, len(stream), 3):  # every 3 bytes, splitting CRLFs and the UTF-8 BOM
        es._feed(stream[i : i + 3], time.monotonic())
    got = [(e.type, e.data, e.last_event_id) for e in es.events]
    assert got == [("message", "one\ntwo", ""), ("progress", "", "7"), ("message", " three", "8")], got
    assert es.last_event_id == "8" and es.reconnection_time == 1.5 and es._attempt.comments == 1


# --- nginx ----------------------------------------------------------------------------------------


def test_nginx_gzip_buffered_holds_the_stream_and_x_accel_buffering_no_fixes_it(start, sse_origin) -> None:
    proxy = start("nginx-gzip-buffered")
    held_h1, held_h2, fixed = concurrently(
        lambda: drive(h1(proxy, "count=5&interval=0.1"), 5, finished),
        lambda: drive(h2(proxy, "count=5&interval=0.1"), 5, finished),
        lambda: drive(h1(proxy, "count=5&interval=0.1&accel=no"), 5, finished),
    )
    # Symptom: a browser-like client (Accept-Encoding: gzip) gets nothing until the stream ends, then all.
    for es in (held_h1, held_h2):
        a = only(es)
        assert a.headers.get("content-encoding") == "gzip" and a.outcome == "clean"
        assert seqs(es) == [1, 2, 3, 4, 5]
        first, spread = es.events[0].at - a.started_at, es.events[-1].at - es.events[0].at
        assert first >= 0.35 and spread < 0.05, (a.protocol, first, spread)
    # Fix: X-Accel-Buffering: no from the upstream - each event arrives as it is sent (sync-flushed gzip).
    a = only(fixed)
    assert a.headers.get("content-encoding") == "gzip" and seqs(fixed) == [1, 2, 3, 4, 5]
    first, spread = fixed.events[0].at - a.started_at, fixed.events[-1].at - fixed.events[0].at
    assert first < 0.3 and spread >= 0.3, (first, spread)
    outcomes = [r["outcome"] for r in records(proxy, "gzip-holds-event-stream", 3)]
    assert sum("held by the compressor" in o for o in outcomes) == 2
    assert sum("sync-flushed" in o for o in outcomes) == 1


def test_nginx_read_timeout_breaks_idle_streams_and_heartbeats_fix_it(start, sse_origin) -> None:
    proxy = start("nginx-read-timeout", 0.005)  # proxy_read_timeout 60 s -> 0.3 s
    cut_h1, cut_h2, failed, beating, resumed = concurrently(
        lambda: drive(h1(proxy, "count=3&interval=0.45"), 3),
        lambda: drive(h2(proxy, "count=3&interval=0.45"), 3),
        lambda: drive(h1(proxy, "count=3&first_byte_delay=0.45", reconnect=True, reconnection_time=0.05), 1.5),
        lambda: drive(h2(proxy, "count=2&start_delay=0.45&interval=0.45&heartbeat=0.1"), 3, finished),
        lambda: drive(h2(proxy, "count=3&interval=0.45&retry=50", reconnect=True), 5, finished),
    )
    # HTTP/1.1: the connection closes without the terminating chunk, 0.3 s after the last upstream byte.
    a = only(cut_h1)
    assert seqs(cut_h1) == [1] and a.net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"
    assert 0.15 <= a.ended_at - cut_h1.events[0].at <= 1.0
    # HTTP/2: RST_STREAM(INTERNAL_ERROR), which Chromium reports as ERR_HTTP2_PROTOCOL_ERROR.
    a = only(cut_h2)
    assert seqs(cut_h2) == [1] and a.net_error == "ERR_HTTP2_PROTOCOL_ERROR" and a.detail == "RST_STREAM INTERNAL_ERROR"
    # Before the headers: 504, and EventSource gives up for good.
    assert_permanent_failure(failed, 504)
    # Fix: headers at once and a heartbeat comment more often than the timeout: nothing breaks, even
    # with 0.45 s before the first event and between events.
    a = only(beating)
    assert seqs(beating) == [1, 2] and a.outcome == "clean" and a.comments >= 4
    # Fix: id: on every event + Last-Event-ID on the reconnection: resets cost no event.
    assert_resumed_without_loss(resumed, 3, min_attempts=3)
    assert {a.net_error for a in resumed.attempts[:-1]} == {"ERR_HTTP2_PROTOCOL_ERROR"}
    outcomes = [r["outcome"] for r in records(proxy, "proxy-read-timeout", 5)]
    assert any(o.startswith("status 504") for o in outcomes)
    assert any("RST_STREAM INTERNAL_ERROR" in o for o in outcomes)
    assert any("connection closed (truncated body)" in o for o in outcomes)


def test_nginx_upstream_closed_mid_stream_and_last_event_id_fixes_it(start, sse_origin) -> None:
    proxy = start("nginx-upstream-closed", 0.01)  # the upstream dies 30 s -> 0.3 s into each response
    cut_h1, cut_h2, restarted, resumed = concurrently(
        lambda: drive(h1(proxy, "count=8&interval=0.1&tag=cut-h1"), 3),
        lambda: drive(h2(proxy, "count=8&interval=0.1"), 3),
        lambda: drive(h1(proxy, "count=8&interval=0.1&retry=20", reconnect=True, resume=False), 1.5, finished),
        lambda: drive(h1(proxy, "count=8&interval=0.1&retry=20", reconnect=True), 5, finished),
    )
    a = only(cut_h1)
    assert 1 <= len(cut_h1.events) <= 5 and a.net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"
    # The upstream really went away: the origin saw its connection closed mid-stream.
    rec = sse_origin.wait_for_request(lambda r: r.query.get("tag") == "cut-h1" and r.finished, timeout=3)
    assert rec.outcome == "client_disconnected" and rec.events_sent < 8
    assert only(cut_h2).net_error == "ERR_HTTP2_PROTOCOL_ERROR" and 1 <= len(cut_h2.events) <= 5
    # Reconnecting is not enough: without Last-Event-ID the stream starts over and never gets past the cut.
    assert len(restarted.attempts) >= 2 and max(seqs(restarted)) <= 5 and seqs(restarted).count(1) >= 2
    assert not finished(restarted)
    # Fix: resume after the last id: every event exactly once.
    assert_resumed_without_loss(resumed, 8)


# --- CDNs and load balancers ----------------------------------------------------------------------


def test_cloudflare_524_stops_eventsource_and_the_first_byte_at_once_fixes_it(start, sse_origin) -> None:
    assert load_profile("cloudflare").rules[0].faults[0].after == 100.0  # the documented value, not 125 s
    proxy = start("cloudflare", 0.005)  # 100 s -> 0.5 s
    failed, reset, fixed = concurrently(
        lambda: drive(h1(proxy, "count=2&first_byte_delay=0.7", reconnect=True, reconnection_time=0.05), 2),
        lambda: drive(h2(proxy, "count=2&interval=0.7"), 3),
        lambda: drive(h2(proxy, "count=2&start_delay=0.7&interval=0.7&heartbeat=0.15"), 4, finished),
    )
    assert_permanent_failure(failed, 524)
    a = only(reset)
    assert seqs(reset) == [1] and a.net_error == "ERR_HTTP2_PROTOCOL_ERROR" and a.detail == "RST_STREAM INTERNAL_ERROR"
    assert 0.3 <= a.ended_at - reset.events[0].at <= 1.2
    # Fix: send the headers (the first byte) at once, then heartbeats more often than 100 s.
    assert seqs(fixed) == [1, 2] and only(fixed).outcome == "clean"
    outcomes = [r["outcome"] for r in records(proxy, "proxy-read-timeout", 2)]
    assert any(o.startswith("status 524") for o in outcomes)


def test_aws_alb_idle_timeout_resets_h2_streams_and_heartbeats_fix_it(start, sse_origin) -> None:
    proxy = start("aws-alb", 0.01)  # idle 60 s -> 0.6 s
    reset, failed, fixed = concurrently(
        lambda: drive(h2(proxy, "count=2&interval=0.8"), 3),
        lambda: drive(h1(proxy, "count=2&first_byte_delay=0.8", reconnect=True, reconnection_time=0.05), 2),
        lambda: drive(h2(proxy, "count=2&interval=0.8&heartbeat=0.2"), 4, finished),
    )
    a = only(reset)
    # Chrome's console: "net::ERR_HTTP2_PROTOCOL_ERROR 200"
    assert (a.status, seqs(reset), a.net_error) == (200, [1], "ERR_HTTP2_PROTOCOL_ERROR")
    assert 0.35 <= a.ended_at - reset.events[0].at <= 1.3
    assert_permanent_failure(failed, 504)
    assert seqs(fixed) == [1, 2] and only(fixed).outcome == "clean"


def test_aws_alb_keepalive_goaway_closes_h2_streams_resume_or_http1_fixes_it(start, sse_origin) -> None:
    # A profile that extends the shipped aws-alb and switches its idle timeout off, so that the
    # keep-alive age (3600 s -> 0.72 s) can be reached at a scale where 60 s would be 12 ms.
    only_keepalive = {
        "version": 1,
        "name": "alb-keepalive-only",
        "extends": ["aws-alb"],
        "rules": [{"name": "idle-timeout", "enabled": False, "faults": [{"type": "timeout", "after": "60s"}]}],
    }
    proxy = start(only_keepalive, 0.0002)
    closed, http1, resumed = concurrently(
        lambda: drive(h2(proxy, "count=12&interval=0.1"), 3),
        lambda: drive(tls_h1(proxy, "count=12&interval=0.1"), 3, finished),
        lambda: drive(h2(proxy, "count=12&interval=0.1&retry=20", reconnect=True), 4, finished),
    )
    a = only(closed)
    assert a.goaway is not None and a.goaway["code"] == "NO_ERROR" and a.goaway["last_stream_id"] == 1
    assert 0.7 <= a.goaway["at"] - a.started_at <= 1.6
    assert a.net_error == "ERR_CONNECTION_CLOSED" and 4 <= len(closed.events) < 12
    # Fix: fall back to HTTP/1.1 (keep-alive age only means Connection: close after the response there).
    assert only(http1).protocol == "HTTP/1.1" and seqs(http1) == list(range(1, 13))
    # Fix: resume on a new connection with Last-Event-ID.
    assert_resumed_without_loss(resumed, 12)
    assert "GOAWAY NO_ERROR last_stream_id=1" in records(proxy, "client-keepalive-goaway")[0]["outcome"]


def test_aws_nlb_black_hole_and_heartbeat_or_watchdog_fixes_it(start, sse_origin) -> None:
    proxy = start("aws-nlb", 0.001)  # 350 s -> 0.35 s

    def hanging() -> EventSource:
        es = h1(proxy, "count=3&interval=0.6&tag=hole")
        es.run(1.5)
        return es  # still open: closed below, after looking at it

    hole, beating, watched = concurrently(
        hanging,
        lambda: drive(h1(proxy, "count=3&interval=0.6&heartbeat=0.15"), 4, finished),
        # A watchdog of twice the longest gap the stream promises (events every 0.5 s -> 1 s).
        lambda: drive(h1(proxy, "count=3&interval=0.5&retry=20", reconnect=True, watchdog=1.0), 6, finished),
    )
    # Symptom: after 0.35 s of silence nothing more arrives - no FIN, no RST; the client waits forever.
    a = only(hole)
    assert seqs(hole) == [1] and a.open and a.outcome is None, (a.outcome, a.net_error, a.detail)
    assert a.last_byte_at - hole.events[0].at < 0.05, "bytes arrived after the black hole"
    hole.close()
    rec = sse_origin.wait_for_request(lambda r: r.query.get("tag") == "hole" and r.finished, timeout=3)
    assert rec.outcome == "client_disconnected" and 0.3 <= rec.client_closed_at - rec.received_at <= 1.2
    assert "black hole" in records(proxy, "tcp-idle-timeout")[0]["outcome"]
    # Fix 1: a heartbeat more often than the idle timeout; the flow is never idle.
    assert seqs(beating) == [1, 2, 3] and only(beating).outcome == "clean"
    # Fix 2 (the only one once the hole exists): the watchdog notices the silence, reconnects and
    # resumes without loss.
    assert_resumed_without_loss(watched, 3, min_attempts=3)
    assert [a.outcome for a in watched.attempts[:-1]] == ["watchdog", "watchdog"]


def test_cloudfront_origin_read_timeout_and_the_first_byte_at_once_fixes_it(start, sse_origin) -> None:
    proxy = start("cloudfront", 0.01)  # 30 s -> 0.3 s
    failed, cut, fixed = concurrently(
        lambda: drive(h1(proxy, "count=2&first_byte_delay=0.45", reconnect=True, reconnection_time=0.05), 1.5),
        lambda: drive(h1(proxy, "count=2&interval=0.45"), 2),
        lambda: drive(h1(proxy, "count=2&start_delay=0.45&interval=0.45&heartbeat=0.1"), 3, finished),
    )
    assert_permanent_failure(failed, 504)
    assert seqs(cut) == [1] and only(cut).net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"
    assert seqs(fixed) == [1, 2] and only(fixed).outcome == "clean"


def test_gcp_lb_total_timeout_cuts_despite_heartbeats_and_resuming_fixes_it(start, sse_origin) -> None:
    proxy = start("gcp-lb", 0.02)  # 30 s -> 0.6 s for the whole response
    cut, failed, resumed = concurrently(
        lambda: drive(h2(proxy, "count=6&interval=0.25&heartbeat=0.05"), 3),
        lambda: drive(h1(proxy, "count=2&first_byte_delay=0.8", reconnect=True, reconnection_time=0.05), 2),
        lambda: drive(h2(proxy, "count=6&interval=0.25&heartbeat=0.05&retry=20", reconnect=True), 6, finished),
    )
    a = only(cut)
    assert a.net_error == "ERR_HTTP2_PROTOCOL_ERROR" and 2 <= len(cut.events) <= 3
    assert a.comments >= 4, "heartbeats flowed and did not help"
    assert 0.55 <= a.ended_at - a.started_at <= 1.4
    assert_permanent_failure(failed, 504)
    assert_resumed_without_loss(resumed, 6)


def test_heroku_h12_and_h15_and_first_byte_plus_heartbeats_fix_them(start, sse_origin) -> None:
    proxy = start("heroku", 0.01)  # H12 30 s -> 0.3 s, H15 55 s -> 0.55 s
    failed, cut, fixed = concurrently(
        lambda: drive(h1(proxy, "count=2&first_byte_delay=0.45", reconnect=True, reconnection_time=0.05), 1.5),
        lambda: drive(h1(proxy, "count=2&interval=0.8"), 2),
        lambda: drive(h1(proxy, "count=2&start_delay=0.45&interval=0.8&heartbeat=0.2"), 3, finished),
    )
    assert_permanent_failure(failed, 503)
    a = only(cut)
    assert seqs(cut) == [1] and a.net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"
    assert 0.3 <= a.ended_at - cut.events[0].at <= 1.2
    # Fix: the headers at once (no H12 however long the first event takes) and heartbeats under 55 s.
    assert seqs(fixed) == [1, 2] and only(fixed).outcome == "clean"
    assert records(proxy, "h12-first-byte")[0]["outcome"].startswith("status 503")
    assert "connection closed" in records(proxy, "h15-idle")[0]["outcome"]


# --- origins, middleboxes, networks ---------------------------------------------------------------


def test_go_write_timeout_resets_h2_streams_and_resuming_fixes_it(start, sse_origin) -> None:
    proxy = start("go-write-timeout", 0.05)  # WriteTimeout 10 s -> 0.5 s from the request
    reset, http1, resumed = concurrently(
        lambda: drive(h2(proxy, "count=8&interval=0.15&heartbeat=0.05"), 3),
        lambda: drive(tls_h1(proxy, "count=8&interval=0.15&heartbeat=0.05"), 3),
        lambda: drive(h2(proxy, "count=8&interval=0.15&retry=20", reconnect=True), 5, finished),
    )
    # The incident: net::ERR_HTTP2_PROTOCOL_ERROR 200 (OK), heartbeats and all.
    a = only(reset)
    assert (a.status, a.net_error, a.detail) == (200, "ERR_HTTP2_PROTOCOL_ERROR", "RST_STREAM INTERNAL_ERROR")
    assert 0.45 <= a.ended_at - a.started_at <= 1.3 and 2 <= len(reset.events) <= 4
    # Falling back to HTTP/1.1 (the incident's suggestion) only changes the error.
    a = only(http1)
    assert a.protocol == "HTTP/1.1" and a.net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING" and len(http1.events) <= 4
    # Fix: id: + Last-Event-ID - each stream still dies at 0.5 s, no event is lost.
    assert_resumed_without_loss(resumed, 8)


def test_corporate_proxy_holds_the_stream_and_polling_fallback_fixes_it(start, sse_origin) -> None:
    proxy = start("corporate-proxy")

    def watchdog_then_polling() -> tuple[EventSource, list[int]]:
        # A watchdog notices that nothing arrives (twice, to be sure), and the client falls back to
        # polling: short responses that end, which the proxy passes on as soon as they are complete.
        es = drive(
            h1(proxy, "count=3&interval=0.1&end=hang", reconnect=True, reconnection_time=0.05, watchdog=0.4),
            2,
            lambda s: len(s.attempts) >= 2 and s.attempts[1].ended_at is not None,
        )
        polled, last = [], ""
        for available in (2, 3):  # the server had two events, then a third (bounded)
            started = time.monotonic()
            a, events = fetch_events(f"{proxy.url}/events?count={available}&interval=0", last_event_id=last)
            assert a.outcome == "clean" and time.monotonic() - started < 2.0
            polled += [json.loads(e.data)["seq"] for e in events]
            last = events[-1].last_event_id if events else last
        return es, polled

    held, (watched, polled) = concurrently(
        lambda: drive(h1(proxy, "count=3&interval=0.1&end=hang&accel=no"), 1.0), watchdog_then_polling
    )
    # Symptom: the headers arrive, then nothing, ever (the stream never ends); X-Accel-Buffering does not help.
    a = only(held)
    assert a.status == 200 and a.outcome == "stopped" and a.body_bytes == 0 and not held.events
    assert [a.outcome for a in watched.attempts] == ["watchdog", "watchdog"] and not watched.events
    assert polled == [1, 2, 3]


def test_corporate_proxy_lag_variant_holds_the_last_event_and_polling_fixes_it(start, sse_origin, tmp_path) -> None:
    # The variant, enabled by a profile that extends the shipped one.
    lagging = tmp_path / "kaspersky.yaml"
    lagging.write_text(
        "version: 1\nname: kaspersky\nextends: [corporate-proxy]\nrules:\n"
        "  - name: hold-whole-stream\n    enabled: false\n    faults: [{type: buffer, size: all}]\n"
        "  - name: lag-one-event\n    match: {response_headers: {content-type: 'text/event-stream*'}}\n"
        "    faults: [{type: buffer, events: 1, honor_x_accel_buffering: false}]\n",
        encoding="utf-8",
    )
    proxy = start(lagging)
    # A task's progress: each event shows up only when the next is sent, and "done" never does.
    es = drive(h1(proxy, "task=t1&count=3&interval=0.2&end=hang"), 1.2)
    assert seqs(es) == [1, 2] and all(e.type == "message" for e in es.events)
    a = es.attempts[0]
    assert es.events[0].at - a.started_at >= 0.17, "event 1 was not held until event 2"
    a, events = fetch_events(f"{proxy.url}/events?task=t1&count=3&interval=0")
    assert [e.type for e in events] == ["message", "message", "done"] and a.outcome == "clean"


def test_h2_goaway_drain_closes_the_stream_after_grace_and_resuming_fixes_it(start, sse_origin) -> None:
    proxy = start("h2-goaway-drain", 0.01)  # GOAWAY 60 s -> 0.6 s in, close 30 s -> 0.3 s later
    closed, resumed = concurrently(
        lambda: drive(h2(proxy, "count=15&interval=0.1"), 3),
        lambda: drive(h2(proxy, "count=15&interval=0.1&retry=20", reconnect=True), 5, finished),
    )
    a = only(closed)
    assert a.goaway is not None and (a.goaway["code"], a.goaway["last_stream_id"]) == ("NO_ERROR", 1)
    goaway_at = a.goaway["at"]
    assert 0.6 <= goaway_at - a.started_at <= 1.5
    after = [e for e in closed.events if e.at > goaway_at]
    assert len(after) >= 2, "the stream did not go on during the grace period"
    assert a.net_error == "ERR_CONNECTION_CLOSED" and 0.2 <= a.ended_at - goaway_at <= 1.0
    assert len(closed.events) < 15
    assert_resumed_without_loss(resumed, 15)
    assert "stream went on" in records(proxy, "graceful-shutdown")[0]["outcome"]


def test_flaky_mobile_latency_bandwidth_stalls_and_a_patient_watchdog_fixes_it(start, sse_origin) -> None:
    proxy = start("flaky-mobile", 0.1, seed=7)  # latency 56 ms + jitter, stall 0.4 s at 0.2 s; 180 kB/s is not scaled
    beating = "count=10&interval=0.1&heartbeat=0.5&retry=20"
    plain, big, naive, patient = concurrently(
        lambda: drive(h1(proxy, "count=10&interval=0.1"), 3, finished),
        lambda: fetch(f"{proxy.url}/bytes?size=90000"),
        # A naive client: watchdog shorter than a stall, and a new EventSource on each timeout (no
        # Last-Event-ID).
        lambda: drive(h1(proxy, beating, reconnect=True, resume=False, watchdog=0.3), 1.5, finished),
        # The fix: heartbeats every H (0.5 s, longer than a stall) and a watchdog of 2H.
        lambda: drive(h1(proxy, beating, reconnect=True, watchdog=1.0), 4, finished),
    )
    # Symptom: latency, a stall (nothing for 0.4 s, then a burst), bandwidth.
    a = only(plain)
    assert seqs(plain) == list(range(1, 11)) and a.headers_at - a.started_at >= 0.05
    gaps = [b.at - e.at for e, b in zip(plain.events, plain.events[1:])]
    assert max(gaps) >= 0.35 and sum(g < 0.01 for g in gaps) >= 2, gaps  # silence, then several at once
    assert big.status == 200 and big.body_bytes == 90000 and big.ended_at - big.started_at >= 0.4
    # The naive client replays the first events again and again and never gets through.
    assert len(naive.attempts) >= 2 and naive.attempts[0].outcome == "watchdog" and seqs(naive).count(1) >= 2
    assert not finished(naive)
    # The patient one rides the stall out: every event once, on one connection.
    assert seqs(patient) == list(range(1, 11)) and only(patient).outcome == "clean"


# --- the blackhole action -------------------------------------------------------------------------


def test_blackhole_action_sends_nothing_and_never_closes(start, sse_origin) -> None:
    profile = {
        "version": 1,
        "name": "hole",
        "rules": [
            {
                "name": "hole",
                "match": {"path": "/events"},
                "faults": [{"type": "cut", "after_events": 1, "action": "blackhole"}],
            }
        ],
    }
    proxy = start(profile)
    for client, where in ((h1, "connection"), (h2, "stream")):
        sse_origin.clear_requests()
        es = client(proxy, "count=5&interval=0.1")
        es.run(0.8)
        a = only(es)
        assert seqs(es) == [1] and a.open and a.goaway is None, (a.outcome, a.net_error, a.detail)
        # The upstream side was closed silently: the origin saw its client go.
        rec = sse_origin.wait_for_request(lambda r: r.path == "/events" and r.finished, timeout=3)
        assert rec.outcome == "client_disconnected" and rec.events_sent < 5
        es.close()  # the client gives up; the proxy must survive it (checked at teardown)
        out = records(proxy, "hole", 2 if where == "stream" else 1)[-1]["outcome"]
        assert out.startswith(f"black hole: upstream closed, nothing more sent, client {where} left open")
    assert httpx.get(f"{proxy.url}/health", timeout=5).json() == {"ok": True}


# --- composition ----------------------------------------------------------------------------------


def test_user_profile_extends_aws_alb_and_adds_a_rule(start, sse_origin, tmp_path) -> None:
    mine = tmp_path / "my-alb.yaml"
    mine.write_text(
        "version: 1\nname: my-alb\nextends: [aws-alb]\nrules:\n"
        "  - name: slow-health\n    match: {path: /health}\n    faults: [{type: delay, time: 30s}]\n",
        encoding="utf-8",
    )
    loaded = load_profile(str(mine))
    assert [r.name for r in loaded.rules] == ["idle-timeout", "client-keepalive-goaway", "slow-health"]
    proxy = start(str(mine), 0.01)  # delay 30 s -> 0.3 s, idle 60 s -> 0.6 s
    started = time.monotonic()
    assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.28  # the added rule
    es = drive(h1(proxy, "count=2&interval=0.8"), 2)
    assert only(es).net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"  # the inherited rule
    assert records(proxy, "slow-health") and records(proxy, "idle-timeout")


def test_stacked_profiles_both_apply(start, sse_origin) -> None:
    proxy = start(["aws-alb", "nginx-gzip-buffered"], 0.01)
    assert "loaded aws-alb (2 rules), nginx-gzip-buffered (1 rules)" in proxy.output()
    # gzip holds everything until the end (second profile) ...
    es = drive(h1(proxy, "count=3&interval=0.3"), 3, finished)
    a = only(es)
    assert seqs(es) == [1, 2, 3] and a.headers.get("content-encoding") == "gzip"
    assert es.events[-1].at - es.events[0].at < 0.05
    # ... and when the upstream idles past 60 s (first profile) the stream is cut with nothing delivered.
    es = drive(h1(proxy, "count=3&interval=0.9"), 3)
    a = only(es)
    assert not es.events and a.net_error == "ERR_INCOMPLETE_CHUNKED_ENCODING"
    assert records(proxy, "idle-timeout") and records(proxy, "gzip-holds-event-stream", 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_run_stacks_profiles_in_order(sse_origin, tmp_path) -> None:
    """`faultproxy run aws-alb nginx-gzip-buffered`: both profiles' rules, in the order given (dry run)."""
    port, log = _free_port(), tmp_path / "journal.jsonl"
    cmd = [sys.executable, "-m", "faultproxy.cli", "run", "aws-alb", "nginx-gzip-buffered"]
    cmd += ["--upstream", sse_origin.url, "--port", str(port), "--dry-run", "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "faultproxy run did not start"
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/events?count=2&interval=0"
        r = httpx.get(url, headers={"accept-encoding": "gzip"}, timeout=5)
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            recs = [json.loads(line) for line in lines if '"rule"' in line]
            if len(recs) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [(r["profile"], r["rule"]) for r in recs] == [
            ("aws-alb", "idle-timeout"),
            ("nginx-gzip-buffered", "gzip-holds-event-stream"),
        ]
        assert all(r.get("dry_run") for r in recs)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
