"""The foundation end to end: `mitmdump -s addons/faultproxy.py` in reverse mode in front of the real SSE
origin, with `delay` and `abort` observed by curl and httpx, journal records, flow marks, selection
conditions, seeds, dry runs, option errors and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from faultproxy.testing.proxy import ProxyStartError

CHECKOUT = Path(__file__).resolve().parent.parent
ADDON = CHECKOUT / "addons" / "faultproxy.py"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "faultproxy.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


PROFILE = {
    "version": 1,
    "name": "foundation",
    "rules": [
        {"name": "slow-health", "match": {"path": "/health", "method": "GET"}, "faults": [{"type": "delay", "time": "300ms"}]},
        {
            "name": "maintenance",
            "match": {"path": "/status/*", "headers": {"x-test": "abort*"}},
            "faults": [{"type": "abort", "status": 503, "body": "down for maintenance", "headers": {"Retry-After": "7"}}],
        },
        {
            "name": "replace-teapot",
            "match": {"path": "/status/418"},
            "faults": [{"type": "abort", "phase": "response", "status": 502, "body": "bad gateway"}],
        },
    ],
}


def test_delay_and_abort_through_mitmdump_script(fault_proxy, sse_origin):
    proxy = fault_proxy(PROFILE, script=ADDON)

    started = time.monotonic()
    r = httpx.get(f"{proxy.url}/health", timeout=10)
    took = time.monotonic() - started
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert 0.29 <= took < 2.0

    r = httpx.get(f"{proxy.url}/status/200", headers={"x-test": "abort-please"}, timeout=10)
    assert (r.status_code, r.text, r.headers["retry-after"]) == (503, "down for maintenance", "7")
    # abort at the request phase never reaches the upstream
    assert not [rec for rec in sse_origin.requests if rec.path == "/status/200"]

    # without the header the same path passes untouched
    assert httpx.get(f"{proxy.url}/status/200", timeout=10).status_code == 200

    # abort at the response phase: the upstream was asked, its answer replaced
    r = httpx.get(f"{proxy.url}/status/418", timeout=10)
    assert (r.status_code, r.text) == (502, "bad gateway")
    assert [rec for rec in sse_origin.requests if rec.path == "/status/418"]

    records = {rec["rule"]: rec for rec in proxy.journal() if "rule" in rec}
    assert set(records) == {"slow-health", "maintenance", "replace-teapot"}
    delay = records["slow-health"]
    assert delay["fault"] == "delay" and delay["outcome"].startswith("delayed 0.3")
    for key in ("time", "flow", "client", "host", "path", "protocol", "profile", "params"):
        assert key in delay, key
    assert delay["protocol"] == "HTTP/1.1" and delay["path"] == "/health" and delay["client"].startswith("127.0.0.1:")
    assert records["maintenance"]["outcome"] == "status 503"
    assert records["replace-teapot"]["outcome"] == "status 502 (upstream said 418)"
    # the mitmproxy log carries the same records
    assert "[foundation/slow-health] delay" in proxy.output()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_sees_abort_and_delay(fault_proxy):
    proxy = fault_proxy(PROFILE)
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-H", "x-test: abort", f"{proxy.url}/status/204"],
        capture_output=True, text=True, timeout=30,
    ).stdout.split()
    assert out[0] == "503"
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"{proxy.url}/health"],
        capture_output=True, text=True, timeout=30,
    ).stdout.split()
    assert out[0] == "200" and float(out[1]) >= 0.29


def test_delay_does_not_block_other_flows(fault_proxy):
    proxy = fault_proxy({"version": 1, "rules": [{"name": "slow", "match": {"path": "/delay/*"}, "faults": [{"type": "delay", "time": "1.5s"}]}]})

    async def main() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=10) as client:
            async def timed(path: str) -> float:
                t = time.monotonic()
                r = await client.get(f"{proxy.url}{path}")
                assert r.status_code == 200
                return time.monotonic() - t

            slow = asyncio.create_task(timed("/delay/0"))
            await asyncio.sleep(0.1)
            fast = await asyncio.gather(*(timed("/health") for _ in range(5)))
            return await slow, max(fast)

    slow, fast = asyncio.run(main())
    assert slow >= 1.45
    assert fast < 1.0, f"a fast flow waited {fast:.3f}s behind a delayed one"


def test_time_scale_shrinks_durations(fault_proxy):
    proxy = fault_proxy({"version": 1, "rules": [{"name": "slow", "faults": [{"type": "delay", "time": "60s"}]}]}, time_scale=0.005)
    t = time.monotonic()
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
    assert 0.29 <= time.monotonic() - t < 2.0
    (rec,) = proxy.journal()
    assert rec["params"] == {"time": 0.3} and rec["time_scale"] == 0.005


def test_first_every_probability_with_seed_repeat(fault_proxy):
    profile = {
        "version": 1,
        "rules": [
            {"name": "first2", "match": {"path": "/status/201", "first": 2}, "faults": [{"type": "abort", "status": 500}]},
            {"name": "every3", "match": {"path": "/status/202", "every": 3}, "faults": [{"type": "abort", "status": 500}]},
            {"name": "half", "match": {"path": "/status/203", "probability": 0.5}, "faults": [{"type": "abort", "status": 500}]},
        ],
    }

    def pattern(seed: int) -> dict[str, list[int]]:
        proxy = fault_proxy(profile, seed=seed)
        with httpx.Client(timeout=10) as client:
            result = {p: [client.get(f"{proxy.url}/status/{p}").status_code for _ in range(12)] for p in ("201", "202", "203")}
        proxy.stop()
        return result

    a = pattern(7)
    assert a["201"] == [500, 500] + [201] * 10
    assert a["202"] == [202, 202, 500] * 4
    assert 500 in a["203"] and 203 in a["203"]
    assert pattern(7)["203"] == a["203"], "the same seed must give the same draws"


def test_host_method_version_and_response_conditions(fault_proxy):
    profile = {
        "version": 1,
        "rules": [
            {"name": "other-host", "match": {"host": "*.example.com"}, "faults": [{"type": "abort", "status": 500}]},
            {"name": "posts", "match": {"method": ["POST", "PUT"], "path_regex": "^/upload$"}, "faults": [{"type": "abort", "status": 507}]},
            {"name": "h2-only", "match": {"http_version": "HTTP/2.0"}, "faults": [{"type": "abort", "status": 500}]},
            {
                "name": "json-404",
                "match": {"status": [404], "response_headers": {"content-type": "application/json*"}},
                "faults": [{"type": "abort", "phase": "response", "status": 410, "body": "gone"}],
            },
        ],
    }
    proxy = fault_proxy(profile)
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{proxy.url}/health").status_code == 200
        assert client.post(f"{proxy.url}/upload", content=b"x" * 10).status_code == 507
        assert client.get(f"{proxy.url}/upload").status_code != 507
        assert client.get(f"{proxy.url}/status/404").status_code == 410
        assert client.get(f"{proxy.url}/status/500").status_code == 500  # upstream's own 500, unmatched
    assert {r["rule"] for r in proxy.journal()} == {"posts", "json-404"}


def test_dry_run_matches_and_journals_without_injecting(fault_proxy):
    proxy = fault_proxy(PROFILE, dry_run=True)
    t = time.monotonic()
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
    assert time.monotonic() - t < 0.25
    assert httpx.get(f"{proxy.url}/status/200", headers={"x-test": "abort"}, timeout=10).status_code == 200
    records = proxy.journal()
    assert {r["rule"] for r in records} == {"slow-health", "maintenance"}
    assert all(r["dry_run"] and r["outcome"].startswith("would") for r in records)


def test_bad_profile_stops_startup_with_a_clear_error(fault_proxy, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    faults:\n      - type: delay\n        time: soon\n")
    with pytest.raises(ProxyStartError) as info:
        fault_proxy([str(bad)])
    text = str(info.value)
    assert "bad.yaml:6:15: rules[0].faults[0].time: expected a duration like '30s' or '250ms', got 'soon'" in text
    assert "Traceback" not in text


def test_bad_time_scale_is_a_clear_error(fault_proxy):
    with pytest.raises(ProxyStartError) as info:
        fault_proxy([], extra_args=["--set", "fault_time_scale=fast"])
    assert "fault_time_scale: expected a number above 0" in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("option", ["fault_upstream_reuse=maybe", "fault_seed=abc", "fault_max_active=many"])
def test_unparsable_option_value_is_a_clear_error_under_mitmdump(fault_proxy, option):
    # mitmproxy itself would abort loading the script without a word and serve with no faults.
    with pytest.raises(ProxyStartError) as info:
        fault_proxy([], extra_args=["--set", option])
    assert f"--set {option}: " in str(info.value)  # then mitmproxy's reason, worded per release
    assert "Traceback" not in str(info.value)


def test_flows_are_marked_and_commented(fault_proxy, tmp_path):
    flows = tmp_path / "flows.mitm"
    proxy = fault_proxy(PROFILE, extra_args=["--save-stream-file", str(flows)])
    assert httpx.get(f"{proxy.url}/status/200", headers={"x-test": "abort"}, timeout=10).status_code == 503
    proxy.stop()
    from mitmproxy import io

    with flows.open("rb") as f:
        (flow,) = [fl for fl in io.FlowReader(f).stream() if fl.request.path == "/status/200"]
    assert flow.marked and "foundation/maintenance: abort -> status 503" in flow.comment


def test_summary_table_on_shutdown(fault_proxy):
    proxy = fault_proxy(PROFILE)
    for _ in range(3):
        httpx.get(f"{proxy.url}/status/200", headers={"x-test": "abort"}, timeout=10)
    proxy.stop()
    out = proxy.output()
    assert "faultproxy: faults fired" in out
    assert re.search(r"foundation\s+maintenance\s+abort\s+3\s*$", out, re.MULTILINE), out[-800:]


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_validate_ok_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\nrules:\n  - name: a\n    faults: [{type: delay, time: 1s}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: a\n    faults: [{type: delay, time: 1s, phase: later}]\n  - name: a\n    faults: [{type: cut, after: x}]\n")
    r = run_cli("validate", str(good))
    assert r.returncode == 0 and "ok:" in r.stdout
    r = run_cli("validate", str(good), str(bad), "h2-rst-stream")
    assert r.returncode == 1
    assert "bad.yaml:4:45: rules[0].faults[0].phase: expected 'request' or 'response', got 'later'" in r.stderr
    assert "bad.yaml:5:11: rules[1].name: duplicate rule name 'a'" in r.stderr
    assert "bad.yaml:6:33: rules[1].faults[0].after: expected a duration" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    r = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "no profile file" in r.stderr and "Traceback" not in r.stderr


def test_cli_profiles_and_schema():
    r = run_cli("profiles")
    assert r.returncode == 0 and "h2-rst-stream" in r.stdout
    r = run_cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["$schema"].endswith("2020-12/schema") and "rules" in schema["properties"]


def test_cli_run_rejects_bad_profile_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [{name: a, faults: [{type: nope}]}]\n")
    r = run_cli("run", str(bad), "--upstream", "http://127.0.0.1:9")
    assert r.returncode == 1 and "unknown fault type 'nope'" in r.stderr and "Traceback" not in r.stderr
