"""Upstream connections of HTTP/2 clients (faultproxy._mitm.install_upstream_connection_management).

mitmproxy gives every request of an HTTP/2 client to an HTTP/1.1 upstream a fresh connection and keeps
every closed one in HttpLayer.connections for the life of the client connection. faultproxy reuses idle
HTTP/1.1 upstream connections (option fault_upstream_reuse, on by default) and forgets finished ones.
These tests count what the origin sees (one record per request, with the id of the TCP connection it
came on) and, through a probe addon, the HttpLayer's connection table.

Real sockets on loopback: the test origin, the lean engine (or mitmdump), the h2 library as client.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from faultproxy.testing.clients import H2Client
from faultproxy.testing.origin import OriginServer, expected_sha256

# Reports the size of the flow's HttpLayer.connections in a response header; optionally shortens the
# idle limit for reuse so expiry is testable in well under a second.
PROBE = """
from mitmproxy import ctx
from faultproxy._mitm import connections, locate

IDLE_MAX = {idle_max!r}
if IDLE_MAX is not None:
    connections.REUSE_IDLE_MAX = IDLE_MAX


def responseheaders(flow):
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    found = locate.find_stream(handler.layer, flow) if handler else None
    if found is not None:
        flow.response.headers["x-upstream-entries"] = str(len(found[0].connections))
"""


def probe_args(tmp_path: Path, idle_max: float | None = None) -> list[str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(idle_max=idle_max), encoding="utf-8")
    return ["-s", str(script)]


def wait_streams(client: H2Client, sids: list[int], timeout: float = 10.0) -> list:
    assert client.pump(lambda: all(client.stream(s).done for s in sids), timeout), "responses did not complete"
    return [client.stream(s) for s in sids]


def get_all(client: H2Client, paths: list[str], timeout: float = 10.0) -> list:
    return wait_streams(client, [client.get(p) for p in paths], timeout)


def connections_used(origin: OriginServer, marker: str) -> set[int]:
    return {r.connection_id for r in origin.log.snapshot() if r.query.get("t") == marker}


@pytest.mark.parametrize("engine", ["lean", "mitmdump"])
def test_http2_requests_reuse_idle_http1_upstream_connections(fault_proxy, sse_origin, tmp_path, engine):
    proxy = fault_proxy(engine=engine, extra_args=probe_args(tmp_path))
    with H2Client("127.0.0.1", proxy.port) as client:
        for batch in range(10):  # 10 batches of 3 concurrent requests
            paths = [f"/bytes?size={1000 + i}&seed={batch}&t=reuse" for i in range(3)]
            for i, st in enumerate(get_all(client, paths)):
                assert st.status == 200
                assert hashlib.sha256(st.data).hexdigest() == expected_sha256(1000 + i, batch)
    used = connections_used(sse_origin, "reuse")
    assert len(sse_origin.log.snapshot()) >= 30
    # 3 at a time need 3 connections; the eager connection of reverse mode may add one.
    assert len(used) <= 4, f"30 requests, 3 at a time, came on {len(used)} upstream connections"


def test_reuse_off_gives_mitmproxys_connection_per_request_and_the_table_stays_small(fault_proxy, sse_origin, tmp_path):
    proxy = fault_proxy(engine="lean", extra_args=[*probe_args(tmp_path), "--set", "fault_upstream_reuse=false"])
    entries = []
    with H2Client("127.0.0.1", proxy.port) as client:
        for i in range(120):
            (st,) = get_all(client, [f"/bytes?size=10&seed={i}&t=off"])
            assert st.status == 200
            entries.append(int(st.headers["x-upstream-entries"]))
    assert len(connections_used(sse_origin, "off")) == 120
    # Without pruning the table holds every connection ever used (it grows by one per request).
    assert max(entries) <= 40, f"HttpLayer.connections grew to {max(entries)} entries over 120 requests"


def test_read_until_eof_responses_are_never_reused(fault_proxy, sse_origin, tmp_path):
    proxy = fault_proxy(engine="lean")
    with H2Client("127.0.0.1", proxy.port) as client:
        for i in range(4):
            (st,) = get_all(client, [f"/events?count=2&interval=0&framing=close&t=eof{i}"])
            assert st.status == 200 and st.data.count(b"data:") == 2
    used = set().union(*(connections_used(sse_origin, f"eof{i}") for i in range(4)))
    assert len(used) == 4


def test_connections_idle_too_long_are_closed_not_reused(fault_proxy, sse_origin, tmp_path):
    idle_max = 0.2
    proxy = fault_proxy(engine="lean", extra_args=probe_args(tmp_path, idle_max=idle_max))
    with H2Client("127.0.0.1", proxy.port) as client:
        (a,) = get_all(client, ["/bytes?size=10&t=idle"])
        (b,) = get_all(client, ["/bytes?size=10&t=idle"])
        assert len(connections_used(sse_origin, "idle")) == 1  # reused at once
        time.sleep(idle_max * 2)  # the condition under test: idle for longer than the limit
        (c,) = get_all(client, ["/bytes?size=10&t=idle"])
        assert a.status == b.status == c.status == 200
    assert len(connections_used(sse_origin, "idle")) == 2


def test_origin_closing_an_idle_connection_costs_no_request(fault_proxy, tmp_path):
    # The origin drops idle keep-alive connections after 0.15 s (Node.js does after 5 s); requests
    # spaced wider than that must each find a fresh connection, never a 502.
    with OriginServer("127.0.0.1", 0, keepalive_timeout=0.15) as origin:
        proxy = fault_proxy(engine="lean", upstream=origin.url)
        with H2Client("127.0.0.1", proxy.port) as client:
            for _ in range(4):
                (st,) = get_all(client, ["/bytes?size=100&t=ka"])
                assert st.status == 200 and len(st.data) == 100
                # until the origin has dropped the connection this request came on (bounded)
                deadline = time.monotonic() + 5
                while origin.open_connections and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert origin.open_connections == 0
        assert len(connections_used(origin, "ka")) == 4


def test_faults_on_reused_connections_touch_only_their_own_exchange(fault_proxy, sse_origin, tmp_path):
    """A cut stream and a throttled body among plain requests that share upstream connections."""
    profile = {
        "version": 1,
        "name": "mixed",
        "rules": [
            {"name": "cut-events", "match": {"path": "/events"}, "faults": [{"type": "cut", "after_events": 2, "action": "rst_stream"}]},
            {"name": "slow-bytes", "match": {"path": "/bytes", "headers": {"x-slow": "1"}}, "faults": [{"type": "throttle", "rate": "400KiB/s"}]},
        ],
    }
    proxy = fault_proxy(profile, engine="lean")
    with H2Client("127.0.0.1", proxy.port) as client:
        for round_ in range(3):
            sids = [
                client.get(f"/events?count=5&interval=0.01&t=mix{round_}"),
                client.get(f"/bytes?size=60000&seed={round_}&t=mix{round_}", {"x-slow": "1"}),
                *[client.get(f"/bytes?size=5000&seed={i}&t=mix{round_}") for i in range(4)],
            ]
            events, slow, *plain = wait_streams(client, sids)
            assert events.reset_code == 2 and events.data.count(b"data:") == 2
            assert hashlib.sha256(slow.data).hexdigest() == expected_sha256(60000, round_)
            for i, st in enumerate(plain):
                assert st.status == 200 and hashlib.sha256(st.data).hexdigest() == expected_sha256(5000, i)
    used = set().union(*(connections_used(sse_origin, f"mix{r}") for r in range(3)))
    assert len(used) < 18, "no upstream connection was reused"
