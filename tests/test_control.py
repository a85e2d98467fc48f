"""The control plane (issue 5): hot reload, control API and its token guard, commands, schedules,
per-request selection, safety limits, metrics, passthrough of untargeted hosts, the Python client.

Real mitmdump processes (the `fault_proxy` fixture), the real SSE origin, real sockets on loopback.
Every wait is a bounded loop on an observable condition; timing assertions carry stated tolerances.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from faultproxy import Control, ControlError
from faultproxy.testing.origin import OriginServer, expected_sha256
from faultproxy.testing.proxy import ProxyProcess, ProxyStartError

TOKEN = "s3cret-t0ken"


# --- profile builders ------------------------------------------------------------------------------


def rule(name: str, match: dict[str, Any], *faults: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "faults": list(faults), **extra}


def profile(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "name": name, "rules": list(rules)}


def abort(status: int) -> dict[str, Any]:
    return {"type": "abort", "status": status}


def write_profile(path: Path, data: dict[str, Any] | str) -> None:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic, as editors save


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def status_of(proxy: ProxyProcess, path: str, **headers: str) -> int:
    return httpx.get(proxy.url + path, headers=headers, timeout=10).status_code


def call(
    proxy: ProxyProcess,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    """One raw request to the control API: (status, parsed JSON or text, response)."""
    host, port = proxy.api_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("content-type", "")
    return resp.status, json.loads(raw) if ctype.startswith("application/json") else raw.decode(), resp


# --- 1. hot reload under load --------------------------------------------------------------------

V1 = profile(
    "live",
    rule("target", {"path": "/status/418"}, abort(503)),
    rule("victim", {"path": "/events", "headers": {"x-victim": "yes"}}, {"type": "cut", "after_events": 12, "action": "close"}),
)
V2 = profile("live", rule("target", {"path": "/status/418"}, abort(504)))
BAD = """\
version: 1
name: live
rules:
  - name: target
    match: {path: /status/418}
    faults:
      - type: abort
        status: 9999
        colour: red
"""
V3 = profile("live", rule("target", {"path": "/status/418"}, abort(502)))
UPLOAD = """\
version: 1
name: uploaded-live
rules:
  - name: target
    match: {path: /status/418}
    faults: [{type: abort, status: 501}]
"""
UPLOAD_BAD = """\
version: 1
name: uploaded-live
rules:
  - name: target
    match: {path: /status/418, methd: GET}
    faults: [{type: abort, status: 501}]
"""
UPLOAD_BAD_ERROR = (
    "request-body:5:32: rules[0].match.methd: unknown key 'methd' (expected one of: host, path, path_regex, "
    "method, headers, response_headers, status, http_version, probability, first, every)"
)


class Load:
    """Steady background traffic through the proxy that no rule targets: SSE streams and byte bodies,
    each checked byte for byte. Runs on its own event loop in a thread."""

    def __init__(self, url: str, sse_reference: bytes, workers: int = 16):
        self.url, self.reference, self.workers = url, sse_reference, workers
        self.results: list[tuple[bool, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load generator did not stop"

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        async with httpx.AsyncClient(timeout=15, limits=limits) as client:
            await asyncio.gather(*(self._worker(i, client) for i in range(self.workers)))

    async def _worker(self, i: int, client: httpx.AsyncClient) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            kind = "sse" if (i + n) % 2 else "bytes"
            try:
                if kind == "sse":
                    async with client.stream("GET", f"{self.url}/events?count=8&interval=0.01") as r:
                        body = b"".join([chunk async for chunk in r.aiter_raw()])
                    ok, detail = r.status_code == 200 and body == self.reference, f"{r.status_code} {len(body)}B"
                else:
                    size, seed = 2048 + (i * 7919 + n * 104729) % 60000, i * 100_000 + n
                    r = await client.get(f"{self.url}/bytes?size={size}&seed={seed}")
                    got = hashlib.sha256(r.content).hexdigest()
                    ok, detail = r.status_code == 200 and got == expected_sha256(size, seed), f"{r.status_code} {size}"
            except httpx.HTTPError as e:
                ok, detail = False, f"{type(e).__name__}: {e}"
            self.results.append((ok, kind, detail))


def validate_cli(path: Path) -> list[str]:
    """What `faultproxy validate` prints for a file: one line per problem."""
    done = subprocess.run(
        [sys.executable, "-m", "faultproxy.cli", "validate", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done
    return [line for line in done.stderr.splitlines() if line and not re.match(r"^\d+ error\(s\)$", line)]


def test_hot_reload_good_bad_good_and_api_replacement_under_load(
    fault_proxy: Callable[..., ProxyProcess], sse_origin: OriginServer, tmp_path: Path
) -> None:
    path = tmp_path / "live.yaml"
    write_profile(path, V1)
    proxy = fault_proxy([path], control_api=True)
    ctl = proxy.control
    reference = httpx.get(f"{sse_origin.url}/events?count=8&interval=0.01", timeout=10).content
    assert reference.count(b"data: ") == 8
    assert status_of(proxy, "/status/418") == 503

    load = Load(proxy.url, reference).start()
    figures: dict[str, Any] = {}
    try:
        # A stream matched under V1 (cut after 12 events) is in progress when V2 (no such rule) lands.
        victim: dict[str, Any] = {"events": 0}

        def victim_stream() -> None:
            try:
                with httpx.stream(
                    "GET", f"{proxy.url}/events?count=40&interval=0.1", headers={"x-victim": "yes"}, timeout=15
                ) as r:
                    for chunk in r.iter_raw():
                        victim["events"] += chunk.count(b"data: ")
                victim["end"] = "complete"
            except httpx.HTTPError as e:
                victim["end"] = type(e).__name__

        victim_thread = threading.Thread(target=victim_stream, daemon=True)
        victim_thread.start()
        wait_until(lambda: victim["events"] >= 2, 5, "the victim stream started")

        # good edit: applies to new flows within a second
        started = time.monotonic()
        write_profile(path, V2)
        wait_until(lambda: status_of(proxy, "/status/418") == 504, 1.0, "V2 in force")
        figures["reload_latency_v2"] = time.monotonic() - started
        assert victim["events"] < 12, "the reload must land while the victim stream is in progress"

        # ... while the flow in progress keeps the rule it started with
        victim_thread.join(15)
        assert victim == {"events": 12, "end": "RemoteProtocolError"}, victim
        after = httpx.get(f"{proxy.url}/events?count=14&interval=0", headers={"x-victim": "yes"}, timeout=10)
        assert after.status_code == 200 and after.content.count(b"data: ") == 14

        # bad edit: rejected with validate's file:line errors, logged; the last good profile stays
        write_profile(path, BAD)
        rejected = proxy.wait_for_journal(lambda e: e.get("event") == "reload_rejected", timeout=2)
        assert rejected["errors"] == validate_cli(path)
        assert any(":8:" in e and "status" in e for e in rejected["errors"]), rejected["errors"]
        assert any(":9:" in e and "colour" in e for e in rejected["errors"]), rejected["errors"]
        assert "profile reload rejected" in proxy.output()
        assert [status_of(proxy, "/status/418") for _ in range(5)] == [504] * 5
        assert ctl.status()["reload"]["rejected"] == 1

        # fixed: in force again
        started = time.monotonic()
        write_profile(path, V3)
        wait_until(lambda: status_of(proxy, "/status/418") == 502, 1.0, "V3 in force")
        figures["reload_latency_v3"] = time.monotonic() - started

        # replaced through the API: good, then bad (422 with errors; nothing changes)
        ctl.upload(UPLOAD)
        assert status_of(proxy, "/status/418") == 501
        with pytest.raises(ControlError) as bad:
            ctl.upload(UPLOAD_BAD)
        assert bad.value.status == 422
        assert bad.value.errors == [UPLOAD_BAD_ERROR]
        assert status_of(proxy, "/status/418") == 501

        # switched off and on
        ctl.off()
        assert status_of(proxy, "/status/418") == 418
        ctl.on()
        assert status_of(proxy, "/status/418") == 501

        wait_until(lambda: len(load.results) >= 300, 20, "a few hundred background flows", interval=0.05)
    finally:
        load.stop()
    failures = [r for r in load.results if not r[0]]
    figures["background_flows"] = len(load.results)
    print(f"\ncontrol-plane figures: {figures}")
    assert len(load.results) >= 300
    assert failures == [], f"{len(failures)} of {len(load.results)} untargeted flows failed: {failures[:5]}"
    status = ctl.status()
    assert status["reload"]["ok"] == 2 and status["reload"]["rejected"] == 1
    assert max(figures["reload_latency_v2"], figures["reload_latency_v3"]) < 1.0


# --- 2. the control API and its token guard -------------------------------------------------------

API_PROFILES = [
    profile(
        "api",
        rule("teapot", {"path": "/status/418"}, abort(503)),
        rule("twin", {"path": "/status/419"}, abort(502)),
    ),
    profile("other", rule("twin", {"path": "/status/420"}, abort(502))),
]


def test_control_api_token_guard_errors_sse_and_metrics(fault_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = fault_proxy(API_PROFILES, control_api=True, api_token=TOKEN)
    ctl = proxy.control

    # --- the token guard: 401, and nothing changes
    status, body, resp = call(proxy, "GET", "/status")
    assert status == 401 and body["error"] == "missing bearer token"
    assert resp.getheader("www-authenticate", "").startswith("Bearer")
    assert call(proxy, "GET", "/status", token="wrong")[0] == 401
    assert call(proxy, "GET", "/status", headers={"Authorization": TOKEN})[0] == 401  # no scheme
    assert call(proxy, "POST", "/off", token="wrong")[0] == 401
    assert call(proxy, "POST", "/rules/api/teapot/disable", token="wrong")[0] == 401
    assert call(proxy, "PUT", "/profiles", token="wrong", body=UPLOAD, headers={"Content-Type": "application/yaml"})[0] == 401
    assert call(proxy, "GET", "/events", token="wrong")[0] == 401
    assert call(proxy, "GET", "/metrics")[0] == 401
    with pytest.raises(ControlError) as refused:
        Control(proxy.api_url, "wrong").off()
    assert refused.value.status == 401
    status = ctl.status()
    assert status["killed"] is False and status["generation"] == 1
    assert [r["enabled"] for r in ctl.rules()] == [True, True, True]
    assert call(proxy, "GET", "/health", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200  # scheme any case

    # --- listing
    assert [p["name"] for p in status["profiles"]] == ["api", "other"]
    assert [r["key"] for r in ctl.rules()] == ["api/teapot", "api/twin", "other/twin"]
    assert ctl.rule("teapot")["faults"] == ["abort"]

    # --- SSE: the stream is open when events() returns; the next fault arrives on it
    stream = ctl.events(timeout=5)
    assert status_of(proxy, "/status/418") == 503
    record = next(stream)
    assert (record["profile"], record["rule"], record["fault"], record["outcome"]) == ("api", "teapot", "abort", "status 503")
    ctl.disable("api/teapot")
    assert next(stream)["event"] == "rule_disabled"
    stream.close()
    assert status_of(proxy, "/status/418") == 418
    assert ctl.counters("api/teapot") == {"matched": 1, "injected": 1, "skipped": 0}
    code, body, _ = call(proxy, "PATCH", "/rules/api/teapot", token=TOKEN, body='{"enabled": true}')
    assert code == 200 and body["rules"][0]["enabled"] is True
    assert status_of(proxy, "/status/418") == 503
    backlog = ctl.events(backlog=3, timeout=5)
    assert [next(backlog).get("event") for _ in range(3)] == ["rule_disabled", "rule_enabled", None]
    backlog.close()

    # --- kill switch: every fault off, matches counted as skipped; resume
    ctl.off()
    assert [status_of(proxy, p) for p in ("/status/418", "/status/419", "/status/420")] == [418, 419, 420]
    assert ctl.status()["killed"] is True
    ctl.on()
    assert [status_of(proxy, p) for p in ("/status/418", "/status/419", "/status/420")] == [503, 502, 502]
    assert ctl.counters("api/teapot") == {"matched": 3, "injected": 3, "skipped": 1}

    # --- Prometheus text: the same counters
    metrics = ctl.metrics()
    samples = dict(re.findall(r"^(faultproxy_\S+) (\S+)$", metrics, re.MULTILINE))
    assert samples['faultproxy_rule_matched_total{profile="api",rule="teapot"}'] == "3"
    assert samples['faultproxy_rule_injected_total{profile="api",rule="teapot"}'] == "3"
    assert samples['faultproxy_rule_skipped_total{profile="api",rule="teapot"}'] == "1"
    assert samples['faultproxy_rule_injected_total{profile="other",rule="twin"}'] == "1"
    assert samples["faultproxy_active_faults"] == "0" and samples["faultproxy_kill_switch"] == "0"
    assert "# TYPE faultproxy_rule_injected_total counter" in metrics

    # --- every bad request: a clear 4xx with a JSON error, never a 500, and nothing changes
    generation = ctl.status()["generation"]
    bad_requests: list[tuple[str, str, Any, dict[str, str], int, str]] = [
        ("POST", "/rules/nope/disable", None, {}, 404, "no loaded rule 'nope'"),
        ("POST", "/rules/twin/disable", None, {}, 409, "api/twin, other/twin"),
        ("GET", "/rules/api/nope", None, {}, 404, "no loaded rule"),
        ("PATCH", "/rules/api/teapot", "{not json", {}, 400, "not valid JSON"),
        ("PATCH", "/rules/api/teapot", '{"enabled": "no"}', {}, 400, "expected a JSON object"),
        ("PATCH", "/rules/api/teapot", "", {}, 400, "empty"),
        ("PUT", "/profiles", "[1,", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        ("PUT", "/profiles", '{"profiles": 5}', {"Content-Type": "application/json"}, 400, "expected JSON"),
        ("PUT", "/profiles", '{"profiles": [{"bogus": 1}]}', {"Content-Type": "application/json"}, 400, "profiles[0]"),
        ("PUT", "/profiles", '{"profiles": ["/etc/hostname"]}', {"Content-Type": "application/json"}, 403, "not allowed"),
        ("PUT", "/profiles", '{"profiles": ["no-such-shipped"]}', {"Content-Type": "application/json"}, 403, "not allowed"),
        ("PUT", "/profiles", UPLOAD_BAD, {"Content-Type": "application/yaml"}, 422, "invalid profile"),
        ("PUT", "/profiles", "version: 1\nrules: [\n", {"Content-Type": "application/yaml"}, 422, "invalid profile"),
        ("PUT", "/profiles", "", {"Content-Type": "application/yaml"}, 400, "empty"),
        ("PUT", "/profiles", b"\xff\xfe", {"Content-Type": "application/yaml"}, 400, "not UTF-8"),
        ("PUT", "/profiles", "x", {"Content-Type": "multipart/form-data"}, 415, "unsupported Content-Type"),
        ("GET", "/nope", None, {}, 404, "no such endpoint"),
        ("DELETE", "/status", None, {}, 405, "not allowed"),
        ("POST", "/events", None, {}, 405, "not allowed"),
        ("GET", "/events?backlog=x", None, {}, 400, "integers"),
        ("GET", "/status", None, {"Origin": "http://evil.example"}, 403, "web pages"),
    ]
    for method, path, body, headers, want, text in bad_requests:
        code, answer, _ = call(proxy, method, path, token=TOKEN, body=body, headers=headers)
        assert (code, text in json.dumps(answer)) == (want, True), (method, path, code, answer)
    code, answer, _ = call(proxy, "PUT", "/profiles", token=TOKEN, body=UPLOAD_BAD, headers={"Content-Type": "application/yaml"})
    assert answer["errors"] == [UPLOAD_BAD_ERROR]
    with socket.create_connection((proxy.api_url.split("//")[1].rsplit(":", 1)[0], int(proxy.api_url.rsplit(":", 1)[1])), 5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    status = ctl.status()
    assert (status["generation"], status["killed"]) == (generation, False)
    assert [r["enabled"] for r in status["profiles"][0]["rules"]] == [True, True]
    assert [status_of(proxy, p) for p in ("/status/418", "/status/419")] == [503, 502]

    # --- replace with two YAML documents in one body; unnamed ones get a name
    body = UPLOAD + "---\n" + "version: 1\nrules:\n  - name: r\n    match: {path: /status/419}\n    faults: [{type: abort, status: 500}]\n"
    code, answer, _ = call(proxy, "PUT", "/profiles", token=TOKEN, body=body, headers={"Content-Type": "application/yaml"})
    assert code == 200, answer
    assert [p["name"] for p in answer["profiles"]] == ["uploaded-live", "uploaded-2"]
    assert [status_of(proxy, p) for p in ("/status/418", "/status/419", "/status/420")] == [501, 500, 420]
    assert ctl.reload()["ok"] is True  # uploaded profiles re-validate from their text

    # shutting down with an SSE client still connected is clean (stop() raises on any traceback)
    lingering = ctl.events(timeout=5)
    proxy.stop()
    assert list(lingering) == []


def test_api_off_loopback_requires_token(sse_origin: OriginServer, fault_confdir: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(
        [], upstream=sse_origin.url, confdir=fault_confdir, workdir=tmp_path, extra_args=["--set", "fault_api=0.0.0.0:0"]
    )
    with pytest.raises(ProxyStartError) as refused:
        proxy.start()
    assert "not a loopback address" in str(refused.value) and "requires fault_api_token" in str(refused.value)


def test_listen_address_parsing() -> None:
    from faultproxy.control.plane import is_loopback, parse_listen

    assert parse_listen("8089") == ("127.0.0.1", 8089)
    assert parse_listen("127.0.0.2:0") == ("127.0.0.2", 0)
    assert parse_listen("[::1]:8089") == ("::1", 8089)
    assert parse_listen(":8089") == ("", 8089)
    for bad in ("host:port", "1.2.3.4:70000", "[::1]8089"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "0.0.0.0", "", "::", "10.0.0.1", "example.com")] == [
        True, True, True, True, False, False, False, False, False,
    ]  # fmt: skip


# --- 3. mitmproxy commands ---------------------------------------------------------------------------


def test_commands_steer_rules_and_kill_switch(tmp_path: Path) -> None:
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    from faultproxy.addon import FaultProxy

    path = tmp_path / "cmd.yaml"
    write_profile(path, API_PROFILES[0])
    addon = FaultProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, fault_profile=[str(path)])
        commands = tctx.master.commands
        assert {"faults.status", "faults.enable", "faults.disable", "faults.off", "faults.on"} <= set(commands.commands)
        commands.call("faults.disable", "api/teapot")
        assert [r.enabled for r in addon.rules] == [False, True]
        text = commands.call("faults.status")
        assert re.search(r"api/teapot\s+disabled", text) and re.search(r"api/twin\s+live", text)
        commands.call("faults.enable", "teapot")
        commands.call("faults.off")
        assert addon.control.killed and "kill switch: ON" in commands.call("faults.status")
        commands.call("faults.on")
        assert not addon.control.killed and all(r.enabled for r in addon.rules)
        with pytest.raises(exceptions.CommandError, match="no loaded rule 'nope'"):
            commands.call("faults.disable", "nope")
        # the command line form, as typed in mitmweb/console
        commands.execute("faults.disable api/twin")
        assert [r.enabled for r in addon.rules] == [True, False]
        addon.done()


# --- 4. schedules ------------------------------------------------------------------------------------


def test_schedule_windows_are_journaled_and_gate_the_fault(fault_proxy: Callable[..., ProxyProcess]) -> None:
    # time scale 0.01: after 20 s -> 0.2 s, for 30 s -> 0.3 s, every 100 s -> 1 s
    scheduled = profile(
        "sched", rule("pulse", {"path": "/status/418"}, abort(503), active={"after": "20s", "for": "30s", "every": "100s"})
    )
    proxy = fault_proxy([scheduled], time_scale=0.01, control_api=True)
    probes: list[tuple[float, float, int]] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # ~2 windows' worth of probes
        t0 = time.time()
        code = status_of(proxy, "/status/418")
        probes.append((t0, time.time(), code))
        time.sleep(0.01)
    windows = [e for e in proxy.journal() if e.get("event") in ("window_open", "window_close")]
    kinds = [(e["event"], e["window"]) for e in windows]
    assert kinds[:4] == [("window_open", 0), ("window_close", 0), ("window_open", 1), ("window_close", 1)], kinds
    # the records name their boundaries (seconds since the proxy started serving): 0.2, 0.5, 1.2, 1.5;
    # each is written when the loop gets to it: on a busy 2-core machine within 150 ms
    assert [round(e["scheduled_at"], 3) for e in windows[:4]] == [0.2, 0.5, 1.2, 1.5]
    for e in windows[:4]:
        assert 0 <= e["at"] - e["scheduled_at"] < 0.15, e
    # the fault acted exactly inside the windows: judge every probe that lay wholly inside or outside one
    edges = [e["ts"] - (e["at"] - e["scheduled_at"]) for e in windows[:4]]  # wall time of each boundary
    spans = [(edges[0], edges[1]), (edges[2], edges[3])]
    judged = []
    for t0, t1, code in probes:
        if any(a < t0 and t1 < b for a, b in spans):
            judged.append((code, 503))
        elif all(t1 < a or t0 > b for a, b in spans) and t0 > edges[0] - 0.2:
            judged.append((code, 418))
    assert len(judged) > 10 and all(code == want for code, want in judged), judged
    assert {want for _, want in judged} == {503, 418}
    assert proxy.control.rule("sched/pulse")["schedule"] == "after 0.2s, for 0.3s, every 1s"


# --- 5 + 6. per-request selection, max_active, marker header -------------------------------------


SELECT_PROFILES = [
    profile(
        "alpha",
        rule("a503", {"path": "/status/418"}, abort(503)),
        rule("tag", {"path": "/status/201"}, {"type": "delay", "phase": "response", "time": "1ms"}),
    ),
    profile("beta", rule("a504", {"path": "/status/418"}, abort(504))),
]


def test_selection_header_and_marker(fault_proxy: Callable[..., ProxyProcess], sse_origin: OriginServer) -> None:
    options = ["fault_select_header=x-fault", "fault_select_only=true", "fault_marker_header=x-faultproxy"]
    proxy = fault_proxy(SELECT_PROFILES, control_api=True, extra_args=[a for o in options for a in ("--set", o)])

    def get(path: str, select: str | None = None) -> httpx.Response:
        return httpx.get(proxy.url + path, headers={"x-fault": select} if select else {}, timeout=10)

    # only what the header names; without it (fault_select_only) nothing
    assert get("/status/418").status_code == 418
    r = get("/status/418", "alpha")
    assert (r.status_code, r.headers["x-faultproxy"]) == (503, "alpha/a503")
    r = get("/status/418", "beta")
    assert (r.status_code, r.headers["x-faultproxy"]) == (504, "beta/a504")
    assert get("/status/418", "rule=a504").status_code == 504
    assert get("/status/418", "rule=alpha/a503").status_code == 503
    assert get("/status/418", "profile=beta").status_code == 504
    assert get("/status/418", "none").status_code == 418
    assert "x-faultproxy" not in get("/status/418", "none").headers

    # unknown names: a clear 400 from the proxy, the request never reaches the origin
    sse_origin.clear_requests()
    for select, words in (("nope", "no loaded profile or rule named 'nope'"), ("rule=nope", "no loaded rule named 'nope'"),
                          ("bogus=x", "unknown selector 'bogus'"), ("alpha, nope", "'nope'")):
        r = get("/status/200", select)
        assert r.status_code == 400 and words in r.text and "loaded profiles: alpha, beta" in r.text, (select, r.text)
    assert not [q for q in sse_origin.requests if q.path.startswith("/status/200")]

    # the header is removed before the request goes upstream
    assert get("/status/200?probe=hdr", "alpha").status_code == 200
    seen = sse_origin.wait_for_request(lambda q: q.query.get("probe") == "hdr", timeout=5)
    assert seen.header("x-fault") is None

    # marker on an upstream response (headers not yet sent when the rule's fault acts)
    r = get("/status/201", "rule=tag")
    assert (r.status_code, r.headers["x-faultproxy"]) == (201, "alpha/tag")

    # parallel tests sharing the proxy each get their own choice
    choices = {"alpha": 503, "beta": 504, "none": 418, "rule=beta/a504": 504, "rule=a503": 503}

    async def parallel() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(timeout=10) as client:
            async def one(i: int) -> tuple[str, int]:
                select = list(choices)[i % len(choices)]
                resp = await client.get(f"{proxy.url}/status/418", headers={"x-fault": select})
                return select, resp.status_code

            return await asyncio.gather(*(one(i) for i in range(60)))

    outcomes = asyncio.run(parallel())
    assert all(code == choices[select] for select, code in outcomes), outcomes

    # the API's DNS-rebinding guard without a token: only IP literals / localhost as Host
    assert call(proxy, "GET", "/health", headers={"Host": "evil.example:80"})[0] == 403
    assert call(proxy, "GET", "/health", headers={"Host": "localhost"})[0] == 200


def test_max_active_limits_concurrent_faults(fault_proxy: Callable[..., ProxyProcess]) -> None:
    """fault_max_active=2: five concurrent matches -> two delayed, three pass untouched (counted)."""
    slow = profile("alpha", rule("slow", {"path": "/health"}, {"type": "delay", "time": "800ms"}))
    proxy = fault_proxy([slow], control_api=True, extra_args=["--set", "fault_max_active=2"])
    ctl = proxy.control
    before = ctl.counters("alpha/slow")

    async def concurrent_slow() -> list[float]:
        async with httpx.AsyncClient(timeout=10) as client:
            async def one() -> float:
                t0 = time.monotonic()
                resp = await client.get(f"{proxy.url}/health")
                assert resp.status_code == 200
                return time.monotonic() - t0

            return list(await asyncio.gather(*(one() for _ in range(5))))

    active_seen: list[int] = []
    sampler_stop = threading.Event()

    def sample() -> None:
        while not sampler_stop.is_set():
            active_seen.append(ctl.status()["active_faults"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    took = sorted(asyncio.run(concurrent_slow()))
    sampler_stop.set()
    sampler.join(5)
    assert [t >= 0.75 for t in took] == [False, False, False, True, True], took
    assert all(t < 0.5 for t in took[:3]), took
    after = ctl.counters("alpha/slow")
    assert after["matched"] - before["matched"] == 5
    assert after["injected"] - before["injected"] == 2
    assert after["skipped"] - before["skipped"] == 3
    assert max(active_seen) == 2 and ctl.status()["active_faults"] == 0


# --- 8. untargeted hosts pass through (regular mode) -----------------------------------------------


def _peer_cert(proxy_port: int, host: str, port: int) -> bytes:
    """CONNECT host:port through the proxy, TLS handshake: the DER certificate the client was shown."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_untargeted_hosts_are_not_intercepted_in_regular_mode(
    fault_proxy: Callable[..., ProxyProcess], sse_origin: OriginServer, tmp_path: Path
) -> None:
    from faultproxy.testing.tls import TlsRelay, self_signed_cert

    cert_path, key_path = self_signed_cert(tmp_path / "tls")
    origin_der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    targeted = profile("hosted", rule("only-localhost", {"host": "localhost"}, abort(503)))
    with TlsRelay(cert_path, key_path, ("127.0.0.1", sse_origin.port)) as relay:
        proxy = fault_proxy([targeted], mode="regular", control_api=True, extra_args=["--set", "ssl_insecure=true"])
        ctl = proxy.control
        passthrough = ctl.status()["passthrough"]
        assert passthrough == {"applies": True, "allow_hosts": [r"^(?:localhost):\d+$"]}

        # no rule can match 127.0.0.1: the tunnel is not intercepted, the client sees the origin's own cert
        assert _peer_cert(proxy.port, "127.0.0.1", relay.port) == origin_der
        # a targeted host is intercepted: mitmproxy's certificate
        assert _peer_cert(proxy.port, "localhost", relay.port) != origin_der

        # recomputed when profiles change: a rule without a host condition can match anything
        ctl.replace(profile("anyhost", rule("all", {"path": "/nothing-here"}, abort(503))))
        assert ctl.status()["passthrough"]["allow_hosts"] == []
        assert _peer_cert(proxy.port, "127.0.0.1", relay.port) != origin_der
        # and no profile at all: nothing is intercepted
        ctl.replace()
        assert ctl.status()["passthrough"]["allow_hosts"] == ["(?!)"]
        assert _peer_cert(proxy.port, "localhost", relay.port) == origin_der
        # plain HTTP through the regular proxy still works
        with httpx.Client(proxy=proxy.url, timeout=10) as client:
            assert client.get(f"{sse_origin.url}/health").status_code == 200


# --- 9. the Python client in the fixture -------------------------------------------------------------


def test_proxy_faults_context_switches_mid_test(fault_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = fault_proxy([profile("base", rule("r", {"path": "/status/418"}, abort(503)))], control_api=True)
    assert status_of(proxy, "/status/418") == 503
    with proxy.faults(profile("mid", rule("r", {"path": "/status/418"}, abort(504)))) as ctl:
        assert status_of(proxy, "/status/418") == 504
        assert [p["name"] for p in ctl.status()["profiles"]] == ["mid"]
    assert status_of(proxy, "/status/418") == 503
    with proxy.faults("h2-rst-stream"):  # a shipped profile by name
        assert [r["key"] for r in proxy.control.rules()] == ["h2-rst-stream/reset-after-events"]
    with pytest.raises(RuntimeError), proxy.faults():  # restored also when the block fails
        assert status_of(proxy, "/status/418") == 418
        raise RuntimeError("test body failed")
    assert status_of(proxy, "/status/418") == 503
    with proxy.control.killed():
        assert status_of(proxy, "/status/418") == 418
    assert status_of(proxy, "/status/418") == 503


# --- pieces, without a proxy ---------------------------------------------------------------------------


def test_selection_schedule_passthrough_units(tmp_path: Path) -> None:
    from faultproxy.control import passthrough, schedule, selection
    from faultproxy.control.plane import split_yaml_documents
    from faultproxy.matching import compile_profiles
    from faultproxy.profile import load_profile

    loaded = [load_profile(p) for p in API_PROFILES]
    rules = compile_profiles(loaded)
    keys = lambda value: [r.key for r in selection.resolve("x-fault", value, rules)]
    assert keys("api") == ["api/teapot", "api/twin"]
    assert keys("rule=twin") == ["api/twin", "other/twin"]
    assert keys("other, rule=api/teapot") == ["api/teapot", "other/twin"]
    assert keys("none") == []
    for bad in ("", " , ", "nope", "profile=teapot", "x=y"):
        with pytest.raises(selection.SelectionError):
            keys(bad)

    assert passthrough.allow_patterns(rules) == []  # no host condition: every host
    hosted = compile_profiles([load_profile(profile("h", rule("a", {"host": ["*.example.com", "api.test"]}, abort(500))))])
    [pattern] = passthrough.allow_patterns(hosted)
    assert re.search(pattern, "x.example.com:443") and re.search(pattern, "API.TEST:80", re.IGNORECASE)  # as mitmproxy does
    assert not re.search(pattern, "example.com.evil:443") and not re.search(pattern, "127.0.0.1:443")
    assert passthrough.allow_patterns([]) == ["(?!)"]

    from faultproxy.profile import Schedule

    sched = Schedule.model_validate({"after": 10, "for": 30, "every": 120})
    assert [schedule.next_boundary(sched, t) for t in (0, 10, 25, 40, 100, 130)] == [10, 40, 40, 130, 130, 160]
    assert schedule.next_boundary(Schedule.model_validate({"after": 5}), 6) is None
    assert schedule.next_boundary(Schedule.model_validate({"after": 5, "for": 2}), 6) == 7

    docs = split_yaml_documents("a: 1\n---\nb: 2\n--- \n# only a comment\n---\nc: 3\n")
    assert [(start, text.count("\n")) for start, text in docs] == [(0, 1), (1, 3), (5, 7)]
    assert [start for start, _ in split_yaml_documents("---\na: 1\n")] == [0]

    assert passthrough.modes_allow_passthrough(["regular"])
    assert passthrough.modes_allow_passthrough(["upstream:http://proxy.internal:3128", "regular@8081"])
    assert not passthrough.modes_allow_passthrough(["reverse:http://127.0.0.1:8000"])
    assert not passthrough.modes_allow_passthrough(["regular", "transparent"])
