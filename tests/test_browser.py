"""What headless Chromium itself reports when faultproxy resets an SSE stream (issue 4, browser level).

Debian's /usr/bin/chromium through Playwright's Python API (faultproxy.testing.browser), in front of
`mitmdump -s addons/faultproxy.py` in reverse mode with TLS on the proxy's port (Chromium negotiates h2).
Each test gets its own browser context (cookies and HTTP/2 sessions are per context) in one Chromium
process per module. A page at https://<proxy>/health opens, same-origin:

* a fetch() whose body is read as a stream, selecting its rule with the header `x-fault: <rule>`
  (credentials omitted, so the EventSource cookie below does not select a rule too);
* an EventSource, selecting its rule with the cookie `fp=<rule>` (EventSource cannot send headers).

The test reads Chromium's own words: Playwright's `requestfailed` error text (net::ERR_...), the
page's fetch() rejection and EventSource events, Chromium's net log (RST_STREAM codes it received),
and the origin's request log (the reconnect's Last-Event-ID). EventSource streams send `retry: 200` so
reconnects take 0.2 s instead of 3 s. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faultproxy.actions import H2ErrorCode
from faultproxy.testing.browser import Browser, PageWatch, find_chromium, h2_frames_received
from faultproxy.testing.origin import OriginServer, sse_event_bytes
from faultproxy.testing.proxy import ProxyProcess

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None,
        reason="Debian's chromium is not installed at /usr/bin/chromium (`make system-deps` / scripts/system-deps.sh installs it)",
    ),
]

REPO = Path(__file__).resolve().parents[1]
ADDON_SCRIPT = REPO / "addons" / "faultproxy.py"
LOCAL = "127.0.0.1"
CODES = list(H2ErrorCode)
N = 3
PROTOCOL_ERROR = "net::ERR_HTTP2_PROTOCOL_ERROR"
REFUSED = "net::ERR_HTTP2_SERVER_REFUSED_STREAM"


def chromium_error(code: H2ErrorCode) -> str | None:
    """What Chromium reports for RST_STREAM(code) after the response headers (net/spdy/spdy_session.cc);
    None: a clean end."""
    return {
        H2ErrorCode.NO_ERROR: None,
        H2ErrorCode.REFUSED_STREAM: REFUSED,
        H2ErrorCode.HTTP_1_1_REQUIRED: "net::ERR_HTTP_1_1_REQUIRED",
    }.get(code, PROTOCOL_ERROR)


def rules_for(name: str, *faults: dict[str, Any]) -> list[dict[str, Any]]:
    """The same faults selected by a request header (fetch) and by a cookie (EventSource)."""
    return [
        {"name": name, "match": {"headers": {"x-fault": name}}, "faults": list(faults)},
        {"name": f"{name}.cookie", "match": {"headers": {"cookie": f"*fp={name}"}}, "faults": list(faults)},
    ]


PROFILE = {
    "version": 1,
    "name": "browser",
    "rules": [
        *[
            r
            for c in CODES
            for r in rules_for(f"rst-{c.name}", {"type": "cut", "after_events": N, "action": "rst_stream", "code": c.name})
        ],
        *rules_for("refuse", {"type": "refuse"}),
    ],
}


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer(LOCAL, 0) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, fault_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with ProxyProcess(
        [PROFILE], upstream=origin.url, script=ADDON_SCRIPT, confdir=fault_confdir, workdir=tmp_path_factory.mktemp("browser-proxy")
    ) as p:
        yield p


@pytest.fixture(scope="module")
def browser(proxy: ProxyProcess) -> Iterator[Browser]:
    with Browser() as b:
        yield b


@pytest.fixture
def page(browser: Browser, proxy: ProxyProcess) -> Iterator[PageWatch]:
    w = browser.page(proxy.https_url + "/health")
    yield w
    w.close()


def wait_client_connections_closed(proxy: ProxyProcess, timeout: float = 5.0) -> None:
    """Until mitmdump has logged a disconnect for every client connect. Stopping mitmdump while a client
    connection is open makes Python 3.12's asyncio log a CancelledError traceback from the stream
    callback at shutdown, which the harness rightly counts as a crash; Chromium closes a context's
    sockets asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        out = proxy.output()
        if out.count("] client connect") <= out.count("] client disconnect") or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def sse_url(t: str, count: int = 100, interval: float = 0.05) -> str:
    return f"/events?count={count}&interval={interval}&retry=200&tag={t}"


def text_of(n: int, count: int = 100) -> str:
    """The body of sse_url() up to event n: the retry block, then whole events."""
    return "retry: 200\n\n" + b"".join(sse_event_bytes(i, count) for i in range(1, n + 1)).decode()


def message_ids_before_first_error(log: list[dict[str, Any]]) -> list[str]:
    ids = []
    for entry in log:
        if entry["type"] == "error":
            break
        if entry["type"] == "message":
            ids.append(entry["id"])
    return ids


def reconnect_with_last_event_id(origin: OriginServer, t: str, last_id: int, timeout: float = 5.0) -> Any:
    return origin.wait_for_request(lambda r: r.query.get("tag") == t and r.last_event_id == last_id, timeout)


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [H2ErrorCode.INTERNAL_ERROR, H2ErrorCode.PROTOCOL_ERROR, H2ErrorCode.CANCEL, H2ErrorCode.REFUSED_STREAM],
    ids=lambda c: c.name,
)
def test_rst_stream_error_in_fetch_and_eventsource(page: PageWatch, proxy: ProxyProcess, origin: OriginServer, code: H2ErrorCode) -> None:
    rule = f"rst-{code.name}"
    want = chromium_error(code)
    tf, te = tag(), tag()
    page.fetch_stream("f", sse_url(tf), {"x-fault": rule}, {"credentials": "omit"})
    page.set_cookie("fp", rule)
    page.event_source("es", sse_url(te))
    page.wait_for(
        lambda: (s := page.state())["f"]["error"] and s["es"]["errors"] >= 1 and page.errors(te),
        10,
        "the fetch to fail and the EventSource to see the reset",
    )
    f = page.state("f")
    assert f["status"] == 200 and f["error"] == "TypeError: network error"
    assert f["text"] == text_of(N), "fetch() must have read exactly the first N events"
    assert page.errors(tf) == [want], f"Chromium's error for the fetch: {page.errors(tf)}"
    assert page.errors(te)[0] == want, f"Chromium's error for the EventSource: {page.errors(te)}"
    es = page.state("es")
    assert message_ids_before_first_error(es["log"]) == [str(i) for i in range(1, N + 1)]
    first_error = next(e for e in es["log"] if e["type"] == "error")
    assert first_error["readyState"] == 0, "EventSource goes back to CONNECTING to reconnect"
    # The reconnect carries Last-Event-ID: the origin's request log shows it.
    rec = reconnect_with_last_event_id(origin, te, N)
    assert rec.header("last-event-id") == str(N)
    page.js("() => fp.closeAll()")
    entry = proxy.wait_for_journal(lambda e: tf in str(e.get("path", "")), 5)
    assert entry["frame"] == "RST_STREAM" and entry["code_name"] == code.name


def test_rst_stream_no_error_after_headers_is_a_clean_end(page: PageWatch, origin: OriginServer) -> None:
    rule = "rst-NO_ERROR"
    tf, te = tag(), tag()
    page.fetch_stream("f", sse_url(tf), {"x-fault": rule}, {"credentials": "omit"})
    page.set_cookie("fp", rule)
    page.event_source("es", sse_url(te))
    page.wait_for(lambda: (s := page.state())["f"]["done"] or s["f"]["error"], 10, "the fetch to end")
    f = page.state("f")
    assert f["done"] and f["error"] is None, f
    assert f["text"] == text_of(N)
    # A clean end of an event stream: EventSource reconnects (WHATWG), with Last-Event-ID.
    rec = reconnect_with_last_event_id(origin, te, N)
    assert rec.header("last-event-id") == str(N)
    failed = [(x.url, x.error_text) for x in page.failed]  # before closing (a closed EventSource is ERR_ABORTED)
    page.js("() => fp.closeAll()")
    es = page.state("es")
    assert message_ids_before_first_error(es["log"])[:N] == [str(i) for i in range(1, N + 1)]
    assert not [f for f in failed if tf in f[0] or te in f[0]], failed


def test_refuse_gives_server_refused_stream(page: PageWatch, proxy: ProxyProcess, origin: OriginServer) -> None:
    tf, te = tag(), tag()
    page.fetch_stream("f", sse_url(tf), {"x-fault": "refuse"}, {"credentials": "omit"})
    page.set_cookie("fp", "refuse")
    page.event_source("es", sse_url(te))
    page.wait_for(
        lambda: (s := page.state())["f"]["error"] and s["es"]["errors"] >= 1 and page.errors(te), 10, "refusals"
    )
    page.js("() => fp.closeAll()")
    assert page.state("f")["error"] == "TypeError: Failed to fetch" and page.state("f")["status"] is None
    assert page.errors(tf) == [REFUSED] and page.errors(te)[0] == REFUSED
    # Chromium retries a refused stream (RFC 9113 8.7: not processed, safe to retry) before giving up.
    refusals = [e for e in proxy.journal() if tf in str(e.get("path", "")) and e["fault"] == "refuse"]
    assert len(refusals) >= 1 and all(e["code_name"] == "REFUSED_STREAM" for e in refusals)
    assert not [r for r in origin.requests if r.query.get("tag") in (tf, te)], "the upstream never saw them"


def test_every_code_chromium_error_and_net_log(browser: Browser, proxy: ProxyProcess, tmp_path: Path) -> None:
    """All 14 codes through fetch(), with Chromium's net log: the RST_STREAM code Chromium received and the
    error it reported. HTTP_1_1_REQUIRED gets its own browser context: Chromium then marks the server as
    HTTP/1.1-only for that context."""
    net_log = tmp_path / "netlog.json"
    tags = {c: tag() for c in CODES}
    with Browser(net_log=net_log, share_with=browser) as b:
        main = b.page(proxy.https_url + "/health")
        own = b.page(proxy.https_url + "/health")
        for c in CODES:
            w = own if c is H2ErrorCode.HTTP_1_1_REQUIRED else main
            w.fetch_stream(c.name, sse_url(tags[c]), {"x-fault": f"rst-{c.name}"}, {"credentials": "omit"})
        for w in (main, own):
            w.wait_for(lambda w=w: all(s["done"] or s["error"] for s in w.state().values()), 15, "every fetch to end")
        seen = {}
        for c in CODES:
            w = own if c is H2ErrorCode.HTTP_1_1_REQUIRED else main
            s = w.state(c.name)
            seen[c.name] = (w.errors(tags[c]), s["error"], s["text"] == text_of(N))
    expected = {c.name: ([] if chromium_error(c) is None else [chromium_error(c)], None if chromium_error(c) is None else "TypeError: network error", True) for c in CODES}
    assert seen == expected
    received = {f["error_code"] for f in h2_frames_received(net_log) if f["frame"] == "RST_STREAM"}
    assert {f"{int(c)} ({c.name})" for c in CODES} <= received, received


def test_a_dozen_eventsources_on_one_page_all_flow(page: PageWatch, proxy: ProxyProcess, origin: OriginServer) -> None:
    """Chromium puts them all on one HTTP/2 connection; plain mitmproxy would start 5 and hold the rest
    (max 5 upstream connections per client connection, see _mitm.raise_stream_limits)."""
    tags = [tag() for _ in range(12)]
    for i, t in enumerate(tags):
        page.event_source(f"es{i}", f"/events?count=6&interval=0.2&tag={t}")
    page.wait_for(lambda: all(s["messages"] >= 6 for s in page.state().values()), 10, "six events on every EventSource")
    page.js("() => fp.closeAll()")
    assert page.js("() => performance.getEntriesByType('navigation')[0].nextHopProtocol") == "h2"
    records = [origin.wait_for_request(lambda r, t=t: r.query.get("tag") == t, 5) for t in tags]
    # All twelve reached the origin while all of them were still open: none waited for another to end.
    first_end = min(
        origin.wait_for_request(lambda r, t=t: r.query.get("tag") == t and r.finished, 5).finished_at for t in tags
    )
    assert max(r.received_at for r in records) < first_end
    assert not [f for f in page.failed if any(t in f.url for t in tags)]
    assert not [e for e in proxy.journal() if any(t in str(e.get("path", "")) for t in tags)], "no fault touched them"


def test_shipped_profile_h2_rst_stream_in_chromium(browser: Browser, fault_proxy: Any, sse_origin: OriginServer) -> None:
    """The incident: an SSE stream reset with INTERNAL_ERROR after five events; Chromium says
    net::ERR_HTTP2_PROTOCOL_ERROR and EventSource reconnects with Last-Event-ID: 5."""
    p = fault_proxy("h2-rst-stream", script=ADDON_SCRIPT)
    w = browser.page(p.https_url + "/health")
    try:
        t = tag()
        w.event_source("es", sse_url(t))
        rec = reconnect_with_last_event_id(sse_origin, t, 5)
        assert rec.header("last-event-id") == "5"
        w.wait_for(lambda: w.errors(t), 5, "requestfailed")
        w.js("() => fp.closeAll()")
        assert w.errors(t)[0] == PROTOCOL_ERROR
        assert message_ids_before_first_error(w.state("es")["log"]) == ["1", "2", "3", "4", "5"]
    finally:
        w.close()
        wait_client_connections_closed(p)
