"""RST_STREAM, GOAWAY, refuse and downgrade on the wire (issue 4), read by independent clients.

Through `mitmdump -s addons/faultproxy.py` in reverse mode, TLS terminated by mitmproxy on the same port
(ALPN h2 on the client side), in front of the real SSE origin:

* frame level: a raw h2-library client (faultproxy.testing.clients.H2Client) sees exactly RST_STREAM(code)
  on the faulted stream after exactly N events, for all 14 RFC 9113 codes; GOAWAY(code, last_stream_id,
  debug data) with the default and an explicit last_stream_id, and a grace period; a second stream on the
  same connection unaffected by a reset; refuse on HTTP/2 and HTTP/1.1; ALPN downgrade by SNI;
* tool level: curl --http2 -k reports the stream error with the configured code (exit 92).

One proxy and one origin serve the whole module: each rule is selected by the request header
`x-fault: <rule>`, and every request carries a unique `tag` query parameter (the origin ignores it) to
find its origin record and journal entry. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.events
import pytest

from faultproxy.actions import H2ErrorCode
from faultproxy.errors import ProfileError
from faultproxy.profile import load_profile
from faultproxy.testing.clients import H1Client, H2Client, SseParser, insecure_tls_context
from faultproxy.testing.origin import OriginServer, sse_event_bytes
from faultproxy.testing.proxy import ProxyProcess

REPO = Path(__file__).resolve().parents[1]
ADDON_SCRIPT = REPO / "addons" / "faultproxy.py"  # what users (and the checker) run: mitmdump -s
LOCAL = "127.0.0.1"
CODES = list(H2ErrorCode)
N = 3  # events before the reset
COUNT = 100  # events the origin would send: it is still feeding the stream when the reset comes
INTERVAL = 0.05


def rule(name: str, *faults: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "match": {"headers": {"x-fault": name}}, "faults": list(faults)}


PROFILE = {
    "version": 1,
    "name": "wire",
    "rules": [
        *[
            rule(f"rst-{c.name}", {"type": "cut", "after_events": N, "action": "rst_stream", "code": c.name})
            for c in CODES
        ],
        rule("rst-number", {"type": "cut", "after_events": N, "action": "rst_stream", "code": 11}),
        rule("goaway-default", {"type": "cut", "after_events": 2, "action": "goaway", "code": "PROTOCOL_ERROR"}),
        rule(
            "goaway-low",
            {"type": "cut", "after_events": 2, "action": "goaway", "code": "ENHANCE_YOUR_CALM",
             "last_stream_id": 1, "debug_data": "calm down", "grace": "500ms"},
        ),
        rule("goaway-grace", {"type": "cut", "after_events": 2, "action": "goaway", "code": "NO_ERROR", "grace": "600ms"}),
        rule("refuse", {"type": "refuse"}),
        rule("timeout-total", {"type": "timeout", "scope": "total", "after": "350ms", "action": "rst_stream", "code": "CANCEL"}),
        rule(
            "timeout-first-byte",
            {"type": "timeout", "scope": "first_byte", "after": "300ms", "before_headers": "rst_stream",
             "code": "INTERNAL_ERROR"},
        ),
        rule("cut-after-time", {"type": "cut", "after": "300ms", "action": "rst_stream", "code": "STREAM_CLOSED"}),
        rule("cut-at-headers", {"type": "cut", "action": "rst_stream", "code": "NO_ERROR"}),
        {"name": "h1only", "match": {"host": "h1only.test"}, "faults": [{"type": "downgrade"}]},
    ],
}


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer(LOCAL, 0) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(
        [PROFILE],
        upstream=origin.url,
        script=ADDON_SCRIPT,
        confdir=fault_confdir,
        workdir=tmp_path_factory.mktemp("wire-proxy"),
    )
    with p:
        yield p
    text = p.output()
    for bad in ("mitmproxy has crashed", "Traceback", "KeyError"):
        assert bad not in text, f"mitmdump output contains {bad!r}:\n{text[-4000:]}"


def tag() -> str:
    return uuid.uuid4().hex[:12]


def events_url(t: str, count: int = COUNT, interval: float = INTERVAL, **extra: Any) -> str:
    q = "".join(f"&{k}={v}" for k, v in extra.items())
    return f"/events?count={count}&interval={interval}&tag={t}{q}"


def expected(n: int, count: int = COUNT) -> bytes:
    return b"".join(sse_event_bytes(i, count) for i in range(1, n + 1))


def journal_for(proxy: ProxyProcess, t: str, timeout: float = 5.0) -> dict[str, Any]:
    return proxy.wait_for_journal(lambda e: t in str(e.get("path", "")) and "frame" in e, timeout)


def origin_record(origin: OriginServer, t: str, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    return origin.wait_for_request(lambda r: r.query.get("tag") == t and r.finished, timeout)


def frames_for(c: H2Client, sid: int) -> list[tuple[float, Any]]:
    return [(at, ev) for at, ev in c.log if getattr(ev, "stream_id", None) == sid]


# --------------------------------------------------------------------------------------------------
# RST_STREAM


@pytest.mark.parametrize("code", CODES, ids=[c.name for c in CODES])
def test_rst_stream_code_after_exactly_n_events(proxy: ProxyProcess, origin: OriginServer, code: H2ErrorCode) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t), {"x-fault": f"rst-{code.name}"})
        assert c.pump(lambda: c.streams[sid].done, 5), f"stream not reset: {c.log}"
        st = c.streams[sid]
        assert st.status == 200
        assert st.ended_at is None, "the stream ended cleanly instead of being reset"
        assert st.reset_code == int(code), f"RST_STREAM code {st.reset_code}, expected {int(code)} ({code.name})"
        assert st.data == expected(N), "the client must hold exactly the first N events"
        assert len(SseParser().feed(st.data)) == N
        # Exactly one RST_STREAM and nothing after it on that stream.
        evs = [ev for _, ev in frames_for(c, sid)]
        resets = [ev for ev in evs if isinstance(ev, h2.events.StreamReset)]
        assert len(resets) == 1 and evs[-1] is resets[0]
        assert not any(isinstance(ev, h2.events.ConnectionTerminated) for _, ev in c.log), "no GOAWAY for a reset"
        # A few tens of ms after the last event (Chromium drops a DATA frame the RST follows too closely).
        gap = st.reset_at - st.arrivals[-1][0]
        assert 0.0 <= gap < 1.0, gap
    rec = origin_record(origin, t)
    assert rec.outcome == "client_disconnected" and N <= rec.events_sent < COUNT, "the upstream was still feeding"
    entry = journal_for(proxy, t)
    assert entry["frame"] == "RST_STREAM" and entry["code"] == int(code) and entry["code_name"] == code.name
    assert entry["stream_id"] == sid
    assert f"RST_STREAM {code.name} on stream {sid}" in entry["outcome"]


def test_rst_stream_code_by_number(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t), {"x-fault": "rst-number"})
        assert c.pump(lambda: c.streams[sid].done, 5)
        assert c.streams[sid].reset_code == 11 and c.streams[sid].data == expected(N)
    assert journal_for(proxy, t)["code_name"] == "ENHANCE_YOUR_CALM"


def test_reset_leaves_a_second_stream_on_the_same_connection_alone(proxy: ProxyProcess, origin: OriginServer) -> None:
    t1, t2 = tag(), tag()
    with H2Client(LOCAL, proxy.port) as c:
        faulted = c.get(events_url(t1), {"x-fault": "rst-INTERNAL_ERROR"})
        other = c.get(events_url(t2, count=12))
        assert c.pump(lambda: c.streams[faulted].done and c.streams[other].done, 8)
        a, b = c.streams[faulted], c.streams[other]
        assert a.reset_code == int(H2ErrorCode.INTERNAL_ERROR) and a.data == expected(N)
        assert b.reset_code is None and b.ended_at is not None, "the second stream must end cleanly"
        assert b.data == expected(12, 12), "the second stream must get every event"
        assert any(at > a.reset_at for at, _ in b.arrivals), "the second stream went on after the reset"
        assert c.goaway_at is None and c.closed_at is None, "the connection must stay up"
        # Still usable: a new stream on the same connection.
        third = c.get(events_url(tag(), count=2, interval=0.01))
        assert c.pump(lambda: c.streams[third].done, 5) and c.streams[third].data == expected(2, 2)
    assert origin_record(origin, t2).outcome == "complete"


def tls_http1(port: int, request: bytes, sni: str = "localhost", timeout: float = 5.0) -> tuple[bytes, str]:
    """One HTTP/1.1 exchange over TLS, read until the connection ends: (bytes received, "fin" | "rst" |
    "timeout"). TLS runs over memory BIOs on a plain socket, because Python's SSLSocket reports a TCP RST
    as an EOF (OpenSSL 3's "unexpected EOF", hidden by suppress_ragged_eofs) and a test must tell them apart."""
    deadline = time.monotonic() + timeout
    raw = socket.create_connection((LOCAL, port), timeout=timeout)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = insecure_tls_context(["http/1.1"]).wrap_bio(incoming, outgoing, server_hostname=sni)

    def flush() -> None:
        if data := outgoing.read():
            raw.sendall(data)

    got, end = bytearray(), "timeout"
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                incoming.write(raw.recv(65536))
        flush()
        tls.write(request)
        flush()
        while time.monotonic() < deadline:
            raw.settimeout(max(0.01, min(0.25, deadline - time.monotonic())))
            try:
                data = raw.recv(65536)
            except ConnectionResetError:
                end = "rst"
                break
            except TimeoutError:
                continue
            if not data:
                end = "fin"
                break
            incoming.write(data)
            while True:
                try:
                    piece = tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if not piece:
                    break
                got += piece
    finally:
        raw.close()
    return bytes(got), end


def http1_request(t: str, fault: str, **kw: Any) -> bytes:
    return f"GET {events_url(t, **kw)} HTTP/1.1\r\nHost: origin.test\r\nx-fault: {fault}\r\n\r\n".encode()


def test_rst_stream_on_http1_falls_back_to_tcp_reset(proxy: ProxyProcess) -> None:
    t = tag()
    got, end = tls_http1(proxy.port, http1_request(t, "rst-INTERNAL_ERROR"))
    assert got.startswith(b"HTTP/1.1 200 ")
    assert [i for i in range(1, COUNT + 1) if sse_event_bytes(i, COUNT) in got] == list(range(1, N + 1))
    assert not got.endswith(b"0\r\n\r\n"), "no terminating chunk"
    assert end == "rst", f"expected a TCP RST, got {end}"
    entry = proxy.wait_for_journal(lambda e: t in str(e.get("path", "")), 5)
    assert entry["protocol"] == "HTTP/1.1" and "frame" not in entry
    assert "rst_stream needs HTTP/2, client speaks HTTP/1.1; TCP RST" in entry["outcome"]


def test_timeout_total_resets_with_code(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        start = time.monotonic()
        sid = c.get(events_url(t), {"x-fault": "timeout-total"})
        assert c.pump(lambda: c.streams[sid].done, 5)
        st = c.streams[sid]
        assert st.reset_code == int(H2ErrorCode.CANCEL) and st.status == 200
        assert 0.3 <= st.reset_at - start < 1.5, st.reset_at - start
        assert st.data and expected(COUNT).startswith(st.data), "a prefix of whole events"
    assert journal_for(proxy, t)["code_name"] == "CANCEL"


def test_timeout_before_headers_resets_the_stream_without_headers(proxy: ProxyProcess, origin: OriginServer) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        start = time.monotonic()
        sid = c.get(events_url(t, first_byte_delay=3), {"x-fault": "timeout-first-byte"})
        assert c.pump(lambda: c.streams[sid].done, 5)
        st = c.streams[sid]
        assert st.reset_code == int(H2ErrorCode.INTERNAL_ERROR)
        assert st.headers_at is None and not st.data, "RST_STREAM before any HEADERS"
        assert 0.25 <= st.reset_at - start < 1.5, st.reset_at - start
    assert origin_record(origin, t).outcome == "client_disconnected"
    assert journal_for(proxy, t)["frame"] == "RST_STREAM"


def test_cut_after_a_duration_resets_mid_stream(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t), {"x-fault": "cut-after-time"})
        assert c.pump(lambda: c.streams[sid].done, 5)
        st = c.streams[sid]
        assert st.reset_code == int(H2ErrorCode.STREAM_CLOSED)
        assert len(SseParser().feed(st.data)) >= 2 and expected(COUNT).startswith(st.data)


def test_cut_at_headers_with_no_error(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t), {"x-fault": "cut-at-headers"})
        assert c.pump(lambda: c.streams[sid].done, 5)
        st = c.streams[sid]
        assert st.status == 200 and st.reset_code == int(H2ErrorCode.NO_ERROR) and not st.data


# --------------------------------------------------------------------------------------------------
# GOAWAY


def test_goaway_default_last_stream_id_is_the_highest_stream_processed(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        faulted = c.get(events_url(t), {"x-fault": "goaway-default"})
        other = c.get(events_url(tag()))
        assert c.pump(lambda: c.closed_at is not None, 5), "the connection must close after GOAWAY (grace 0)"
        assert c.goaway_code == int(H2ErrorCode.PROTOCOL_ERROR)
        assert c.goaway_last_stream_id == max(faulted, other) == 3
        assert c.streams[faulted].data == expected(2)
        assert c.closed_at - c.goaway_at < 1.0
    entry = journal_for(proxy, t)
    assert entry["frame"] == "GOAWAY" and entry["code_name"] == "PROTOCOL_ERROR"
    assert entry["last_stream_id"] == 3 and entry["stream_id"] == faulted
    assert "GOAWAY PROTOCOL_ERROR last_stream_id=3" in entry["outcome"]


def test_goaway_explicit_last_stream_id_debug_data_and_grace(proxy: ProxyProcess, origin: OriginServer) -> None:
    t_low, t_high = tag(), tag()
    with H2Client(LOCAL, proxy.port) as c:
        low = c.get(events_url(t_low))  # stream 1: at or below last_stream_id, goes on for the grace
        assert c.pump(lambda: len(c.streams[low].arrivals) >= 1, 5)
        high = c.get(events_url(t_high), {"x-fault": "goaway-low"})  # stream 3: above it, not processed
        assert c.pump(lambda: c.closed_at is not None, 5)
        assert c.goaway_code == int(H2ErrorCode.ENHANCE_YOUR_CALM) and c.goaway_last_stream_id == 1 == low
        terminated = [ev for _, ev in c.log if isinstance(ev, h2.events.ConnectionTerminated)]
        assert terminated[0].additional_data == b"calm down"
        assert c.streams[high].data == expected(2)
        assert not [at for at, _ in c.streams[high].arrivals if at > c.goaway_at], "stream 3 got data after GOAWAY"
        after = [at for at, _ in c.streams[low].arrivals if at > c.goaway_at]
        assert len(after) >= 3, "stream 1 must go on during the grace period"
        # grace 0.5 s on the proxy's clock (measured 0.50-0.51 s); the client may read the GOAWAY late on a busy box
        assert 0.3 <= c.closed_at - c.goaway_at < 1.5, c.closed_at - c.goaway_at
    # The stream above last_stream_id was ended on the proxy side at once (its upstream closed).
    assert origin_record(origin, t_high).outcome == "client_disconnected"
    entry = journal_for(proxy, t_high)
    assert entry["frame"] == "GOAWAY" and entry["last_stream_id"] == 1 and entry["stream_id"] == high


def test_goaway_grace_lets_streams_at_or_below_last_stream_id_go_on(proxy: ProxyProcess) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t), {"x-fault": "goaway-grace"})
        assert c.pump(lambda: c.closed_at is not None, 5)
        assert c.goaway_code == int(H2ErrorCode.NO_ERROR) and c.goaway_last_stream_id == sid
        st = c.streams[sid]
        assert [at for at, _ in st.arrivals if at > c.goaway_at], "the stream goes on during the grace period"
        # grace 0.6 s on the proxy's clock (measured 0.60-0.61 s); the client may read the GOAWAY late on a busy box
        assert 0.4 <= c.closed_at - c.goaway_at < 1.5, c.closed_at - c.goaway_at
        assert st.ended_at is None, "the connection closes under the still-open stream"
    entry = journal_for(proxy, t)
    assert entry["frame"] == "GOAWAY" and entry["code"] == 0 and entry["last_stream_id"] == sid


# --------------------------------------------------------------------------------------------------
# refuse


def test_refuse_h2_resets_with_refused_stream_before_any_upstream_request(proxy: ProxyProcess, origin: OriginServer) -> None:
    t = tag()
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(events_url(t, count=3), {"x-fault": "refuse"})
        other = c.get(events_url(tag(), count=3, interval=0.01))
        assert c.pump(lambda: c.streams[sid].done and c.streams[other].done, 5)
        st = c.streams[sid]
        assert st.reset_code == int(H2ErrorCode.REFUSED_STREAM)
        assert st.headers_at is None and not st.data, "no HEADERS, no DATA before the RST_STREAM"
        assert c.streams[other].data == expected(3, 3), "other streams on the connection go on"
        assert c.goaway_at is None
    entry = journal_for(proxy, t)
    assert entry["fault"] == "refuse" and entry["code_name"] == "REFUSED_STREAM" and entry["stream_id"] == sid
    assert f"RST_STREAM REFUSED_STREAM on stream {sid}" in entry["outcome"]
    time.sleep(0.2)
    assert not [r for r in origin.requests if r.query.get("tag") == t], "the upstream must not see the request"


def test_refuse_h1_closes_before_any_response_byte(proxy: ProxyProcess, origin: OriginServer) -> None:
    t = tag()
    got, end = tls_http1(proxy.port, http1_request(t, "refuse", count=3))
    assert got == b"", f"no response byte expected, got {got[:200]!r}"
    assert end == "fin", f"a FIN, not {end}"
    entry = proxy.wait_for_journal(lambda e: t in str(e.get("path", "")), 5)
    assert "connection closed before any response byte (HTTP/1.1)" in entry["outcome"]
    time.sleep(0.2)
    assert not [r for r in origin.requests if r.query.get("tag") == t]


# --------------------------------------------------------------------------------------------------
# downgrade


def handshake(port: int, sni: str, offers: list[str]) -> str | None:
    with insecure_tls_context(offers).wrap_socket(socket.create_connection((LOCAL, port), timeout=5), server_hostname=sni) as s:
        return s.selected_alpn_protocol()


def test_downgrade_offers_only_http1_to_matching_sni(proxy: ProxyProcess) -> None:
    assert handshake(proxy.port, "h1only.test", ["h2", "http/1.1"]) == "http/1.1"
    assert handshake(proxy.port, "other.test", ["h2", "http/1.1"]) == "h2", "other hosts keep HTTP/2"
    assert handshake(proxy.port, "h1only.test", ["h2"]) is None, "an h2-only client gets no ALPN"
    entry = proxy.wait_for_journal(lambda e: e.get("event") == "downgrade" and e.get("sni") == "h1only.test", 5)
    assert entry["rule"] == "h1only" and entry["alpn_offers"] == ["h2", "http/1.1"]
    assert entry["outcome"] == "offered only http/1.1 in ALPN"
    assert not [e for e in proxy.journal() if e.get("sni") == "other.test"]


def test_downgraded_client_streams_over_http1(proxy: ProxyProcess) -> None:
    """A real request on a downgraded connection: HTTP/1.1 end to end, and an rst_stream fault falls back."""
    t = tag()
    with H1Client(LOCAL, proxy.port, tls=True, sni="h1only.test") as h:
        assert h.sock.selected_alpn_protocol() == "http/1.1"
        h.get(events_url(t, count=3, interval=0.01))
        assert h.pump(timeout=5) and h.complete and h.body == expected(3, 3)


def test_downgrade_rule_with_request_conditions_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: no-h2\n"
        "    match:\n"
        "      host: api.test\n"
        "      path: /events\n"
        "    faults:\n"
        "      - type: downgrade\n",
        encoding="utf-8",
    )
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    text = str(err.value)
    assert f"{path}:6:7" in text or "bad.yaml:6:7" in text, text
    assert "'path' cannot be checked there" in text and "TLS handshake" in text
    # host alone is fine
    path.write_text(
        "version: 1\nrules:\n  - name: no-h2\n    match: {host: api.test}\n    faults: [{type: downgrade}]\n",
        encoding="utf-8",
    )
    assert load_profile(str(path)).rules[0].faults[0].type == "downgrade"


# --------------------------------------------------------------------------------------------------
# the shipped profile and curl


def test_shipped_profile_h2_rst_stream_resets_with_internal_error_after_five_events(fault_proxy: Any, sse_origin: OriginServer) -> None:
    p = fault_proxy("h2-rst-stream", script=ADDON_SCRIPT)
    t = tag()
    with H2Client(LOCAL, p.port) as c:
        sid = c.get(events_url(t))
        assert c.pump(lambda: c.streams[sid].done, 5)
        st = c.streams[sid]
        assert st.reset_code == int(H2ErrorCode.INTERNAL_ERROR) and st.data == expected(5)
    entry = p.wait_for_journal(lambda e: t in str(e.get("path", "")), 5)
    assert entry["profile"] == "h2-rst-stream" and entry["code_name"] == "INTERNAL_ERROR"


CURL = shutil.which("curl")
CURL_92 = [c for c in CODES if c not in (H2ErrorCode.NO_ERROR, H2ErrorCode.REFUSED_STREAM, H2ErrorCode.HTTP_1_1_REQUIRED)]


def run_curl(proxy: ProxyProcess, fault: str, t: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "--http2", "-k", "-sS", "-N", "--max-time", "10", "-H", f"x-fault: {fault}", proxy.https_url + events_url(t)],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/system-deps.sh installs it)")
@pytest.mark.parametrize("code", CURL_92, ids=[c.name for c in CURL_92])
def test_curl_reports_the_stream_error_with_the_code(proxy: ProxyProcess, code: H2ErrorCode) -> None:
    r = run_curl(proxy, f"rst-{code.name}", tag())
    assert r.returncode == 92, (r.returncode, r.stderr)
    assert f"HTTP/2 stream 1 was not closed cleanly: {code.name} (err {int(code)})" in r.stderr, r.stderr
    assert r.stdout == expected(N).decode()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/system-deps.sh installs it)")
def test_curl_no_error_after_headers_is_a_clean_end(proxy: ProxyProcess) -> None:
    r = run_curl(proxy, "rst-NO_ERROR", tag())
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout == expected(N).decode()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (scripts/system-deps.sh installs it)")
def test_curl_http_1_1_required_retries_over_http1_and_meets_the_fallback(proxy: ProxyProcess) -> None:
    """curl answers RST_STREAM(HTTP_1_1_REQUIRED) by retrying over HTTP/1.1, where the rule's rst_stream
    falls back to a TCP RST (the journal shows both)."""
    t = tag()
    r = run_curl(proxy, "rst-HTTP_1_1_REQUIRED", t)
    assert r.returncode != 0 and r.returncode != 92, (r.returncode, r.stderr)
    proxy.wait_for_journal(lambda e: t in str(e.get("path", "")) and e.get("protocol") == "HTTP/1.1", 5)
    entries = [e for e in proxy.journal() if t in str(e.get("path", ""))]
    assert [e["protocol"] for e in entries] == ["HTTP/2.0", "HTTP/1.1"], entries
    assert entries[0]["code_name"] == "HTTP_1_1_REQUIRED" and "TCP RST" in entries[1]["outcome"]
