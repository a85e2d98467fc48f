"""The browser demo (`faultproxy demo`), driven in Debian's Chromium through five shipped profiles.

One demo (backend + lean proxy with TLS, so Chromium speaks HTTP/2) and one page for the module; each case
picks a profile on the page at time scale 0.01 (1 s = 100 s: a run takes about 5 s), starts an upload and
reads the verdicts the page shows. Expected, as in the incident and in docs/demo.md:

* the naive client (one EventSource, failed on error) fails or stalls under every profile;
* the resilient client (Last-Event-ID, watchdog, backoff, polling fallback) completes with no event lost
  or repeated under every profile;
* where an origin switch is the real fix (heartbeats for idle timeouts, X-Accel-Buffering: no for gzip),
  "Apply the origin fix" makes the naive client complete too.

Screenshots go to artifacts/ (gitignored). docs/demo.png (the README's) is remade, from a run at time scale
0.05 where each event stands apart (25 s), only when it is missing or when FAULTPROXY_DEMO_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from faultproxy.demo import Demo
from faultproxy.demo.server import DemoServer, scoped_profile_yaml
from faultproxy.profile import load_profile, load_text, shipped_profiles

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
README_SHOT = ROOT / "docs" / "demo.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--ignore-certificate-errors",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
RUN_TIMEOUT_MS = 20_000  # a run lasts ~5 s at time scale 0.01 (440 s of upload + 100 s grace)



def browser_test(fn: Any) -> Any:
    """Marker `browser`, skipped only when Debian's Chromium is absent."""
    fn = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)")(fn)
    return pytest.mark.browser(fn)


# --- without a browser: the scoped profiles and the backend's tasks ---------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_scoped_profiles_are_the_shipped_ones_on_events_only(scale: float) -> None:
    for name in shipped_profiles():
        scoped = load_text(scoped_profile_yaml(name, scale), f"{name}.yaml")
        original = load_profile(name).scaled(scale)
        assert scoped.name == original.name
        assert len(scoped.rules) == len(original.rules)
        for mine, theirs in zip(scoped.rules, original.rules):
            assert mine.match.path == ["/events"]
            a, b = mine.model_dump(), theirs.model_dump()
            a["match"].pop("path"), b["match"].pop("path")
            assert a == b, name


def test_scoped_profile_keeps_a_rules_own_path_conditions(tmp_path: Path) -> None:
    import re

    path = tmp_path / "mine.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        "  - {name: glob, match: {path: '/ev*'}, faults: [{type: cut, after_events: 1}]}\n"
        "  - {name: regex, match: {path_regex: 'ent'}, faults: [{type: cut, after_events: 1}]}\n"
        "  - {name: nulled, faults: [{type: timeout, after: 2s, before_headers: null}]}\n",
        encoding="utf-8",
    )
    rules = load_text(scoped_profile_yaml(str(path), 0.5), "mine.yaml").rules
    assert (rules[0].match.path, rules[0].match.path_regex) == (["/ev*"], "^/events$")
    regex = rules[1].match.path_regex
    assert [p for p in ("/events", "/events2", "/api/events", "/x") if re.search(regex, p)] == ["/events"]
    assert rules[2].faults[0].before_headers is None  # an explicit null survives
    assert rules[2].faults[0].after == 1.0  # scaled


def test_backend_task_stream_resumes_and_polls() -> None:
    import http.client
    import json
    import time

    with DemoServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/api/upload?scale=0.001&heartbeat=15&accel=1&flush=1")
        task = json.loads(conn.getresponse().read())
        assert task["count"] == 20 and len(task["offsets"]) == 20
        assert task["offsets"][10] - task["offsets"][9] == pytest.approx(0.402)  # 400 s of silence, scaled
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", f"/events?task={task['task']}", headers={"Last-Event-ID": "17"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("X-Accel-Buffering") == "no"
        body = resp.read().decode()
        assert [line for line in body.splitlines() if line.startswith("id:")] == ["id: 18", "id: 19", "id: 20"]
        assert "event: done" in body and body.count(": ping") >= 10  # 15 s heartbeats through 400 s of silence
        time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", f"/api/progress?task={task['task']}&after=18")
        progress = json.loads(conn.getresponse().read())
        assert progress["done"] and [e["id"] for e in progress["events"]] == [19, 20]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/events?task=nope")
        assert conn.getresponse().status == 404


# --- in Chromium -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with Demo(port=0, confdir=tmp_path_factory.mktemp("demo-confdir")) as d:
        yield d


@pytest.fixture(scope="module")
def page(demo: Demo) -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    profile_dir = tempfile.mkdtemp(prefix="faultproxy-demo-chromium-")
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile_dir,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 1000},
                ignore_https_errors=True,
            )
            try:
                pg = context.new_page()
                pg.set_default_timeout(10_000)
                pg.on("pageerror", lambda e: errors.append(str(e)))
                pg.goto(demo.url)
                pg.wait_for_selector("body[data-ready='1']")
                pg.select_option("#scale", "0.01")
                pg.page_errors = errors  # type: ignore[attr-defined]
                yield pg
            finally:
                context.close()
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    assert not errors, f"JavaScript errors on the page: {errors}"


def _set(page: Any, profile: str, *, heartbeat: str = "0", accel: bool = False, flush: str = "1") -> None:
    page.select_option("#profile", profile)
    page.select_option("#heartbeat", heartbeat)
    page.set_checked("#accel", accel)
    page.select_option("#flush", flush)


def _run(page: Any, *, keyboard: bool = False, timeout_ms: int = RUN_TIMEOUT_MS) -> dict[str, dict[str, Any]]:
    """Start an upload (button or keyboard), wait for both verdicts, return what each panel shows."""
    previous = page.get_attribute("body", "data-task") or ""
    if keyboard:
        page.focus("#start")
        page.keyboard.press("Enter")
    else:
        page.click("#start")
    page.wait_for_function(
        "prev => document.body.dataset.task && document.body.dataset.task !== prev && document.body.dataset.run === 'done'",
        arg=previous,
        timeout=timeout_ms,
    )
    shown: dict[str, dict[str, Any]] = {}
    for client in ("naive", "resilient"):
        panel = f"#{client}"
        shown[client] = {
            "verdict": page.get_attribute(panel, "data-verdict"),
            "head": page.inner_text(f"{panel} .vhead"),
            "text": page.inner_text(f"{panel} .vtext"),
            "badge": page.inner_text(f"{panel} .badge"),
            "pct": page.inner_text(f"{panel} .pct"),
            **{k: page.inner_text(f"{panel} [data-stat={k}]") for k in ("events", "lost", "repeated", "reconnects", "errors", "stall")},
            "log": page.inner_text(f"{panel} .log"),
        }
    return shown


def _wait_proxy_line(page: Any, client: str, pattern: str) -> str:
    """What the page says the proxy did to this client (the journal arrives over SSE): the text of a proxy
    mark on the client's timeline (its tooltip; the log below keeps only the last lines)."""
    handle = page.wait_for_function(
        """([client, pattern]) => {
            const re = new RegExp(pattern);
            const hit = [...document.querySelectorAll(`#${client} .proxymark title`)].find(t => re.test(t.textContent));
            return hit ? hit.textContent : false;
        }""",
        arg=[client, pattern],
        timeout=5_000,
    )
    return str(handle.json_value())


def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"demo-{name}.png"
    page.screenshot(path=str(path))
    return path


def _assert_resilient_complete(shown: dict[str, Any]) -> None:
    assert shown["verdict"] == "complete", shown
    assert shown["head"] == "COMPLETE", shown
    assert shown["events"] == "20 / 20", shown
    assert shown["lost"] == "0" and shown["repeated"] == "0", shown
    assert shown["pct"] == "100 %", shown


def _assert_naive_complete(shown: dict[str, Any]) -> None:
    assert shown["verdict"] == "complete", shown
    assert shown["events"] == "20 / 20" and shown["lost"] == "0" and shown["repeated"] == "0", shown
    assert shown["errors"] == "0" and shown["reconnects"] == "0", shown


@browser_test
def test_page_is_http2_and_keyboard_operable(page: Any) -> None:
    assert "HTTP/2" in page.inner_text("#proto")
    # Every control has a label, and Tab reaches each one in order with a visible focus ring.
    ids = page.eval_on_selector_all("#controls select, #controls input, #controls button", "els => els.map(e => e.id)")
    assert ids == ["profile", "scale", "heartbeat", "flush", "accel", "fix", "start"]
    for control in ("profile", "scale", "heartbeat", "flush", "accel"):
        assert page.locator(f"label[for={control}]").count() == 1
    page.select_option("#profile", "nginx-read-timeout")  # a profile with an origin fix: every button enabled
    page.focus("#profile")
    for control in ids:
        assert page.evaluate("document.activeElement.id") == control
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("", "none"), f"no visible focus ring on #{control}"
        page.keyboard.press("Tab")
    # Shipped profiles are offered, with "none".
    options = page.eval_on_selector_all("#profile option", "os => os.map(o => o.value)")
    assert options[0] == "none"
    assert {"h2-rst-stream", "nginx-read-timeout", "nginx-gzip-buffered", "aws-alb", "aws-nlb"} <= set(options)


@browser_test
def test_h2_reset_naive_fails_resilient_resumes(page: Any) -> None:
    _set(page, "h2-rst-stream")
    boxes_before = _layout(page)
    shown = _run(page, keyboard=True)
    naive, resilient = shown["naive"], shown["resilient"]
    assert naive["verdict"] == "failed" and naive["head"] == "FAILED at 25 %", naive
    assert naive["events"] == "5 / 20" and naive["lost"] == "15" and naive["errors"] == "1", naive
    _assert_resilient_complete(resilient)
    assert int(resilient["reconnects"]) >= 1, resilient
    assert "RST_STREAM INTERNAL_ERROR after 5 events" in _wait_proxy_line(page, "naive", "RST_STREAM")
    _wait_proxy_line(page, "resilient", "RST_STREAM INTERNAL_ERROR after 5 events")
    # Nothing moved while events, errors and verdicts arrived.
    assert _layout(page) == boxes_before
    _shot(page, "h2-rst-stream")


# profile, what the naive client shows, the proxy's action as the page words it, the fix's switch
CASES = [
    ("nginx-read-timeout", "failed", r"RST_STREAM INTERNAL_ERROR after 1 min without a byte", "heartbeat"),
    ("nginx-gzip-buffered", "stalled", r"stream held 7 min \d+ s by compression", "accel"),
    ("aws-alb", "failed", r"RST_STREAM INTERNAL_ERROR after 1 min without a byte", "heartbeat"),
    ("aws-nlb", "stalled", r"black hole after 5 min 50 s without a byte", "heartbeat"),
]


@browser_test
@pytest.mark.parametrize(("profile", "naive_verdict", "proxy_says", "fix"), CASES, ids=[c[0] for c in CASES])
def test_profile_then_origin_fix(page: Any, profile: str, naive_verdict: str, proxy_says: str, fix: str) -> None:
    _set(page, profile)
    shown = _run(page)
    naive = shown["naive"]
    assert naive["verdict"] == naive_verdict, naive
    if naive_verdict == "failed":
        assert naive["head"] == "FAILED at 50 %" and naive["lost"] == "10", naive
    else:
        assert naive["head"].startswith("STALLED"), naive
    _assert_resilient_complete(shown["resilient"])
    _wait_proxy_line(page, "naive", proxy_says)
    _shot(page, profile)

    # The page's "Apply the origin fix" sets the switch that fixes this profile; the naive client then completes.
    page.click("#fix")
    if fix == "heartbeat":
        assert page.input_value("#heartbeat") == "15"
    else:
        assert page.is_checked("#accel")
    shown = _run(page)
    _assert_naive_complete(shown["naive"])
    _assert_resilient_complete(shown["resilient"])
    if fix == "heartbeat":  # heartbeats keep the stream alive: the proxy breaks nothing
        # (Not "no reconnect": at time scale 0.01 the watchdog is 0.3 s, and a loaded machine can miss it.)
        assert shown["resilient"]["errors"] == "0", shown["resilient"]
    _shot(page, f"{profile}-fixed")


@browser_test
def test_heartbeats_do_not_fix_gzip(page: Any) -> None:
    """The origin fix must be the matching one: heartbeats are held by the compressor too."""
    _set(page, "nginx-gzip-buffered", heartbeat="15")
    shown = _run(page)
    assert shown["naive"]["verdict"] == "stalled", shown["naive"]
    _assert_resilient_complete(shown["resilient"])


@browser_test
@pytest.mark.skipif(
    README_SHOT.exists() and os.environ.get("FAULTPROXY_DEMO_SCREENSHOT") != "1",
    reason="docs/demo.png exists; FAULTPROXY_DEMO_SCREENSHOT=1 remakes it",
)
def test_readme_screenshot(page: Any) -> None:
    _set(page, "h2-rst-stream")
    page.select_option("#scale", "0.05")
    try:
        shown = _run(page, timeout_ms=60_000)
        assert shown["naive"]["verdict"] == "failed", shown["naive"]
        _assert_resilient_complete(shown["resilient"])
        _wait_proxy_line(page, "naive", "RST_STREAM")
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.screenshot(path=str(README_SHOT))
    finally:
        page.select_option("#scale", "0.01")


def _layout(page: Any) -> list[tuple[float, ...]]:
    """Boxes of everything that changes during a run (rounded to whole pixels)."""
    return page.eval_on_selector_all(
        "#controls, #scenario, .client, .client .badge, .client .bar, .client .timeline, .client .stats, "
        ".client .verdict, .client .log, footer",
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height].map(Math.round); })",
    )
