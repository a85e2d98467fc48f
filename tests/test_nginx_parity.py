"""faultproxy side by side with real nginx (Debian's /usr/sbin/nginx) in front of the same SSE origin.

The profiles claim to reproduce what nginx does; these tests run both and compare what clients see:

(a) `gzip on; gzip_types text/event-stream;` with proxy buffering on, versus faultproxy `compress`: both hold
    the whole stream until it ends; with `X-Accel-Buffering: no` from the origin both deliver each event at
    once, as its own sync-flushed gzip piece (arrival times compared event by event);
(b) `proxy_read_timeout 1s` versus faultproxy `timeout` (scope idle, 1 s, action rst_stream INTERNAL_ERROR,
    http1: close): over HTTP/2 the same frame (RST_STREAM) with the same code, about one second after the last
    upstream byte; over HTTP/1.1 the same truncation (connection closed, no terminating chunk). And a stream
    with heartbeats more often than the timeout survives both.

Streams to nginx and to faultproxy run at the same time, from threads, each measured against its own origin
request (`received_at`, same clock as the clients). nginx gets its own config in tmp_path: loopback only,
`daemon off; master_process off;`, every path inside tmp_path, a self-signed certificate for HTTP/2.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faultproxy.testing.clients import GzipStream, H1Client, H2Client, SseParser, run_in_threads
from faultproxy.testing.origin import OriginServer, RequestRecord, sse_event_bytes
from faultproxy.testing.proxy import ProxyProcess
from faultproxy.testing.realproxies import LOCAL, NGINX, Nginx

INTERNAL_ERROR = 2
FIGURES: list[str] = []  # measured numbers, printed at the end of the module (pytest -s shows them)

PROFILE = {
    "version": 1,
    "name": "nginx-parity",
    "rules": [
        # nginx: gzip on; gzip_types text/event-stream; (gzip_comp_level 1, proxy_buffering on)
        {"name": "gzip", "match": {"headers": {"x-fault": "gzip"}}, "faults": [{"type": "compress", "level": 1}]},
        # nginx: proxy_read_timeout 1s
        {
            "name": "read-timeout",
            "match": {"headers": {"x-fault": "read-timeout"}},
            "faults": [
                {"type": "timeout", "scope": "idle", "after": "1s", "action": "rst_stream", "code": "INTERNAL_ERROR", "http1": "close"}
            ],
        },
    ],
}

NGINX_HTTP = """\
    upstream origin {{ server {origin}; }}
    server {{
        listen {host}:{port};
        listen {host}:{tls_port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location /gzip/ {{
            proxy_pass http://origin/;
            gzip on;
            gzip_types text/event-stream;
        }}
        location /read-timeout/ {{
            proxy_pass http://origin/;
            proxy_read_timeout 1s;
        }}
    }}
"""


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer(LOCAL, 0) as o:
        yield o


@pytest.fixture(scope="module")
def nginx(origin: OriginServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if NGINX is None:
        pytest.skip("nginx is not installed (looked for nginx on PATH and /usr/sbin/nginx)")
    n = Nginx(tmp_path_factory.mktemp("nginx"), origin.port, NGINX_HTTP).start()
    try:
        yield n
    finally:
        n.stop()
        if FIGURES:
            print("\nnginx vs faultproxy:\n  " + "\n  ".join(FIGURES))


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(PROFILE, upstream=origin.url, confdir=fault_confdir, workdir=tmp_path_factory.mktemp("parity"))
    p.start()
    try:
        yield p
    finally:
        p.stop()


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def record_of(origin: OriginServer, tag: str) -> RequestRecord:
    return origin.wait_for_request(lambda r: r.query.get("tag") == tag and r.finished, timeout=5)


def events(count: int) -> bytes:
    return b"".join(sse_event_bytes(i, count) for i in range(1, count + 1))


# ==================================================================================================
# (a) gzip + buffering versus compress


def gzip_stream(port: int, path: str, fault: str | None) -> dict[str, Any]:
    headers = {"accept": "text/event-stream", "accept-encoding": "gzip", **({"x-fault": fault} if fault else {})}
    with H1Client(LOCAL, port) as c:
        c.get(path, headers)
        assert c.pump(timeout=8) and c.complete, f"stream did not end cleanly via port {port}"
        gz = GzipStream()
        for at, piece in c.arrivals:
            gz.feed(piece, at)
        sse = SseParser()
        for at, piece in gz.pieces:
            sse.feed(piece, at)
        return {
            "headers": c.headers,
            "arrivals": c.arrivals,
            "chunks": c.chunk_sizes,
            "gz": gz,
            "events": sse.events,
            "headers_at": c.headers_at,
        }


@pytest.mark.parametrize("accel", ["buffered", "x-accel-buffering-no"])
def test_gzip_buffering_matches_nginx(nginx, proxy, origin, accel):
    count, interval = 5, 0.12
    tn, tf = new_tag(), new_tag()
    extra = "&accel=no" if accel != "buffered" else ""
    q = f"count={count}&interval={interval}{extra}"
    got_n, got_f = run_in_threads(
        lambda: gzip_stream(nginx.port, f"/gzip/events?tag={tn}&{q}", None),
        lambda: gzip_stream(proxy.port, f"/events?tag={tf}&{q}", "gzip"),
    )
    rec_n, rec_f = record_of(origin, tn), record_of(origin, tf)
    offsets = {}
    for who, got, rec in (("nginx", got_n, rec_n), ("faultproxy", got_f, rec_f)):
        assert got["headers"].get("content-encoding") == "gzip", (who, got["headers"])
        assert "content-length" not in got["headers"], who
        assert got["gz"].finished and got["gz"].data == events(count), who
        offsets[who] = [round(ev.at - rec.received_at, 3) for ev in got["events"]]
        first_body = got["arrivals"][0][0] - rec.received_at
        if accel == "buffered":
            # Held until the upstream ended: no body byte before the origin's last event.
            last_sent = (count - 1) * interval
            assert first_body >= last_sent - 0.02, f"{who}: body bytes at {first_body:.3f}s, last event sent at {last_sent:.3f}s"
            assert all(o >= last_sent - 0.02 for o in offsets[who]), (who, offsets[who])
        else:
            # Each event as its own flushed piece, as it was sent.
            for i, o in enumerate(offsets[who]):
                assert o - i * interval < 0.1, f"{who}: event {i + 1} at {o:.3f}s, sent at {i * interval:.3f}s: {offsets}"
    # Same zlib, same level, same flush points: the very same compressed bytes, in the same pieces.
    # (Unbuffered, a flush follows each upstream read: two events that reach a proxy in one read share
    # a flush, which changes the bytes but not what decodes. Compared when both saw one read per event.)
    body_n = b"".join(p for _, p in got_n["arrivals"])
    body_f = b"".join(p for _, p in got_f["arrivals"])
    if accel == "buffered" or len(got_n["chunks"]) == len(got_f["chunks"]) == count + 2:
        assert body_f == body_n, f"gzip bodies differ: nginx {got_n['chunks']}, faultproxy {got_f['chunks']}"
        assert got_f["chunks"] == got_n["chunks"], (got_n["chunks"], got_f["chunks"])
    pairs = list(zip(offsets["nginx"], offsets["faultproxy"]))
    assert all(abs(a - b) < 0.1 for a, b in pairs), f"event arrival offsets differ: nginx/faultproxy {pairs}"
    FIGURES.append(
        f"gzip {accel}: event arrival offsets from request (s) nginx {offsets['nginx']} | faultproxy "
        f"{offsets['faultproxy']}; HTTP chunks nginx {got_n['chunks']} faultproxy {got_f['chunks']}"
    )


# ==================================================================================================
# (b) proxy_read_timeout versus timeout idle


def h2_stream(port: int, path: str, fault: str | None) -> dict[str, Any]:
    with H2Client(LOCAL, port) as c:
        sid = c.get(path, {"accept": "text/event-stream", **({"x-fault": fault} if fault else {})})
        assert c.pump(lambda: c.stream(sid).done or c.closed_at is not None, 8)
        st = c.stream(sid)
        return {
            "status": st.status,
            "data": st.data,
            "last_data_at": st.arrivals[-1][0] if st.arrivals else None,
            "reset_code": st.reset_code,
            "reset_at": st.reset_at,
            "ended": st.ended_at is not None,
            "goaway": c.goaway_code,
            "closed": c.closed_at is not None,
            "events": len(SseParser().feed(st.data, 0.0)),
        }


def h1_stream(port: int, path: str, fault: str | None) -> dict[str, Any]:
    with H1Client(LOCAL, port) as c:
        c.get(path, {"accept": "text/event-stream", **({"x-fault": fault} if fault else {})})
        assert c.pump(timeout=8)
        return {
            "status": c.status,
            "data": c.body,
            "last_data_at": c.arrivals[-1][0] if c.arrivals else None,
            "complete": c.complete,
            "eof_at": c.eof_at,
            "reset": c.reset,
            "events": len(SseParser().feed(c.body, 0.0)),
        }


def test_idle_timeout_matches_nginx_proxy_read_timeout(nginx, proxy, origin):
    # Events 0.4 s apart: nginx re-arms its read timer on a read only when the new deadline moves by more
    # than NGX_TIMER_LAZY_DELAY (300 ms, src/event/ngx_event_timer.h); with reads closer together its cut
    # comes up to 0.3 s "early", counted from an earlier read. faultproxy counts from the last byte exactly.
    q = "count=2&interval=0.4&end=hang"
    tags = [new_tag() for _ in range(4)]
    n2, f2, n1, f1 = run_in_threads(
        lambda: h2_stream(nginx.tls_port, f"/read-timeout/events?tag={tags[0]}&{q}", None),
        lambda: h2_stream(proxy.port, f"/events?tag={tags[1]}&{q}", "read-timeout"),
        lambda: h1_stream(nginx.port, f"/read-timeout/events?tag={tags[2]}&{q}", None),
        lambda: h1_stream(proxy.port, f"/events?tag={tags[3]}&{q}", "read-timeout"),
    )
    # HTTP/2: the same frame, with the same code, the same time after the last upstream byte.
    for who, got in (("nginx", n2), ("faultproxy", f2)):
        assert got["status"] == 200 and got["data"] == events(2), who
        assert got["reset_code"] == INTERNAL_ERROR, f"{who}: RST_STREAM code {got['reset_code']}, stream ended={got['ended']}"
        assert got["goaway"] is None and not got["closed"], f"{who}: the connection went too"
    gap_n2 = n2["reset_at"] - n2["last_data_at"]
    gap_f2 = f2["reset_at"] - f2["last_data_at"]
    assert 0.9 <= gap_n2 <= 1.3 and 0.9 <= gap_f2 <= 1.3, (gap_n2, gap_f2)
    assert abs(gap_n2 - gap_f2) < 0.15, (gap_n2, gap_f2)
    # HTTP/1.1: the same truncation: the connection closes (FIN, no RST) without a terminating chunk.
    for who, got in (("nginx", n1), ("faultproxy", f1)):
        assert got["status"] == 200 and got["data"] == events(2), who
        assert got["eof_at"] is not None and not got["complete"] and not got["reset"], who
    gap_n1 = n1["eof_at"] - n1["last_data_at"]
    gap_f1 = f1["eof_at"] - f1["last_data_at"]
    assert 0.9 <= gap_n1 <= 1.3 and 0.9 <= gap_f1 <= 1.3, (gap_n1, gap_f1)
    assert abs(gap_n1 - gap_f1) < 0.15, (gap_n1, gap_f1)
    # Both let go of the upstream.
    for tag in tags:
        assert record_of(origin, tag).client_disconnected
    FIGURES.append(
        f"idle timeout 1s, last upstream byte -> cut: HTTP/2 RST_STREAM(INTERNAL_ERROR) nginx {gap_n2:.3f}s "
        f"faultproxy {gap_f2:.3f}s; HTTP/1.1 close without last chunk nginx {gap_n1:.3f}s faultproxy {gap_f1:.3f}s"
    )


def test_heartbeats_keep_the_stream_alive_through_both(nginx, proxy, origin):
    q = "count=2&interval=1.3&heartbeat=0.3"
    tags = [new_tag() for _ in range(2)]
    n2, f2 = run_in_threads(
        lambda: h2_stream(nginx.tls_port, f"/read-timeout/events?tag={tags[0]}&{q}", None),
        lambda: h2_stream(proxy.port, f"/events?tag={tags[1]}&{q}", "read-timeout"),
    )
    for who, got in (("nginx", n2), ("faultproxy", f2)):
        assert got["ended"] and got["reset_code"] is None, f"{who}: the stream was cut"
        assert got["events"] == 2 and got["data"].count(b": ping") >= 3, who
