"""Whatever the faults, the client gets exactly the upstream's bytes in order: all of them, or a prefix when
the stream is cut. 20 MB of pseudo-random bytes (the origin's /bytes) through buffer + throttle + slice,
compared by SHA-256; cuts compared byte for byte with the expected prefix; and the pipeline's memory stays
bounded when the client side is slower than the upstream (the origin is made to wait, TCP backpressure)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultproxy.testing.clients import H1Client, H2Client
from faultproxy.testing.origin import OriginServer, expected_bytes, expected_sha256
from faultproxy.testing.proxy import ProxyProcess

LOCAL = "127.0.0.1"
SIZE = 20 * 1024 * 1024


def rule(name: str, *faults: dict) -> dict:
    return {"name": name, "match": {"headers": {"x-fault": name}}, "faults": list(faults)}


PROFILE = {
    "version": 1,
    "name": "integrity",
    "rules": [
        rule(
            "shaped",
            {"type": "buffer", "size": "64k"},
            {"type": "throttle", "rate": "40MiB/s", "burst": "256k"},
            {"type": "slice", "size": "16k"},
        ),
        rule("cut-bytes", {"type": "slice", "size": "10000"}, {"type": "cut", "after_bytes": 5_000_003, "action": "close"}),
        rule("cut-time", {"type": "throttle", "rate": "4MiB/s"}, {"type": "cut", "after": "500ms", "action": "close"}),
        rule("slow", {"type": "throttle", "rate": "2MiB/s"}),
    ],
}


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer(LOCAL, 0) as o:
        yield o


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(PROFILE, upstream=origin.url, confdir=fault_confdir, workdir=tmp_path_factory.mktemp("integrity"))
    p.start()
    try:
        yield p
    finally:
        p.stop()


def sha_of(arrivals: list[tuple[float, bytes]]) -> str:
    h = hashlib.sha256()
    for _, piece in arrivals:
        h.update(piece)
    return h.hexdigest()


def test_20_mb_through_buffer_throttle_slice_h1(proxy, origin):
    started = time.monotonic()
    with H1Client(LOCAL, proxy.port) as c:
        c.get(f"/bytes?size={SIZE}&seed=11&tag={uuid.uuid4().hex}", {"x-fault": "shaped"})
        assert c.pump(timeout=30) and c.complete, f"{sum(len(p) for _, p in c.arrivals)} of {SIZE} bytes"
        took = time.monotonic() - started
        assert c.headers["x-content-sha256"] == expected_sha256(SIZE, 11)
        assert sum(len(p) for _, p in c.arrivals) == SIZE
        assert sha_of(c.arrivals) == expected_sha256(SIZE, 11)
        assert max(len(p) for _, p in c.arrivals) <= 256 * 1024  # sliced (a read may join a few pieces)
    # 20 MiB at 40 MiB/s: at least half a second; the pipeline's own cost keeps it to a few seconds.
    assert 0.45 <= took <= 15, took
    entries = proxy.journal()
    for kind in ("buffer", "throttle", "slice"):
        assert any(e["fault"] == kind and e["rule"] == "shaped" for e in entries), kind


def test_8_mb_through_buffer_throttle_slice_h2(proxy, origin):
    size = 8 * 1024 * 1024
    with H2Client(LOCAL, proxy.port) as c:
        sid = c.get(f"/bytes?size={size}&seed=12", {"x-fault": "shaped"})
        assert c.pump(lambda: c.stream(sid).done, 30) and c.stream(sid).ended_at
        st = c.stream(sid)
        assert sum(len(p) for _, p in st.arrivals) == size
        assert sha_of(st.arrivals) == expected_sha256(size, 12)


def test_cut_after_bytes_gives_an_exact_prefix(proxy, origin):
    with H1Client(LOCAL, proxy.port) as c:
        c.get(f"/bytes?size={SIZE}&seed=13", {"x-fault": "cut-bytes"})
        assert c.pump(timeout=20)
        assert c.eof_at is not None and not c.complete
        body = c.body
    assert len(body) == 5_000_003
    assert body == expected_bytes(SIZE, 13)[:5_000_003]


def test_cut_after_time_gives_a_prefix(proxy, origin):
    with H1Client(LOCAL, proxy.port) as c:
        c.get(f"/bytes?size={SIZE}&seed=14", {"x-fault": "cut-time"})
        assert c.pump(timeout=10)
        assert c.eof_at is not None and not c.complete
        body = c.body
    # 0.5 s at 4 MiB/s: about 2 MiB, never more than the bucket allows, and exactly the upstream's first bytes.
    assert 1 << 20 <= len(body) <= 3 << 20, len(body)
    assert body == expected_bytes(SIZE, 14)[: len(body)]


def test_a_slow_client_side_makes_the_upstream_wait(proxy, origin):
    """Throttled to 2 MiB/s, a 20 MB body must not pile up in the proxy: the channels between stages are
    bounded, the first one stops reading the upstream socket, and TCP makes the origin wait. (The kernel's
    socket buffers on loopback absorb several MB first - tcp_rmem allows up to 32 MB here - so what is
    measured is the origin's rate once they are full: the client's rate, not the origin's own.)"""
    tag = uuid.uuid4().hex
    with H1Client(LOCAL, proxy.port) as c:
        c.get(f"/bytes?size={SIZE}&seed=15&tag={tag}", {"x-fault": "slow"})
        assert c.pump(lambda: sum(len(p) for _, p in c.arrivals) > 0, 5)
        sent = []
        for _ in range(3):
            assert not c.pump(lambda: False, 0.75)  # the client reads on: it is the throttle that is slow
            rec = origin.wait_for_request(lambda r: r.query.get("tag") == tag, timeout=5)
            sent.append((time.monotonic(), rec.body_bytes_sent, sum(len(p) for _, p in c.arrivals)))
    (t1, origin1, client1), (t2, origin2, client2) = sent[1], sent[2]
    assert client2 - client1 <= (2 << 20) * (t2 - t1) * 1.3 + (256 << 10), sent
    assert origin2 < SIZE, "the origin wrote everything: nothing held it back"
    assert origin2 - origin1 <= (2 << 20) * (t2 - t1) * 1.5 + (1 << 20), f"the origin was not slowed down: {sent}"
