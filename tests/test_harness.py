"""Tests of the proxy harness (faultproxy.testing.proxy) and the pytest plugin's fixtures.

They run real ``mitmdump`` processes with a stand-in addon script (written below) that declares the
faultproxy options and journals what it was given, so the harness is tested independently of the fault
addon itself.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from faultproxy.testing.origin import OriginServer
from faultproxy.testing.proxy import ProxyCrashed, ProxyProcess, ProxyStartError

pytest_plugins = ("pytester",)

# Declares the options faultproxy's addon declares, and journals what it received. Note the option types:
# mitmproxy's `--set` parses only str, int, bool, Optional[str|int] and collections.abc.Sequence[str]
# (typing.Sequence[str] does not compare equal to it) - a float option cannot be set from the command line.
STAND_IN_ADDON = """\
import json
from collections.abc import Sequence
from typing import Optional

from mitmproxy import ctx


class StandIn:
    def load(self, loader):
        loader.add_option("fault_profile", Sequence[str], [], "profiles")
        loader.add_option("fault_log", str, "", "journal path")
        loader.add_option("fault_time_scale", str, "1.0", "time scale (float, parsed by the addon)")
        loader.add_option("fault_seed", Optional[int], None, "seed")
        loader.add_option("fault_dry_run", bool, False, "dry run")

    def _journal(self, entry):
        if ctx.options.fault_log:
            with open(ctx.options.fault_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\\n")

    def running(self):
        o = ctx.options
        self._journal({"event": "started", "profiles": list(o.fault_profile), "time_scale": o.fault_time_scale,
                       "seed": o.fault_seed, "dry_run": o.fault_dry_run})

    def response(self, flow):
        self._journal({"event": "response", "path": flow.request.path, "status": flow.response.status_code})


addons = [StandIn()]
"""

# Misbehaviour on demand, loaded through extra_args: /die kills the process, /boom raises in a hook.
MISBEHAVING_ADDON = """\
import os


class Misbehave:
    def request(self, flow):
        if flow.request.path.startswith("/die"):
            os._exit(3)
        if flow.request.path.startswith("/boom"):
            raise RuntimeError("boom from the misbehaving addon")


addons = [Misbehave()]
"""


@pytest.fixture(scope="session")
def addon_scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("addons")
    scripts = {"stand_in": STAND_IN_ADDON, "misbehave": MISBEHAVING_ADDON, "empty": "addons = []\n"}
    paths = {}
    for name, text in scripts.items():
        paths[name] = directory / f"{name}.py"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def plugin_args() -> list[str]:
    """`-p faultproxy.testing.plugin` unless the installed entry point loads it already (pytest refuses to
    register one module under two names: "Plugin already registered under a different name")."""
    from importlib.metadata import entry_points

    if any(ep.value == "faultproxy.testing.plugin" for ep in entry_points(group="pytest11")):
        return []
    return ["-p", "faultproxy.testing.plugin"]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------


def test_proxy_starts_proxies_and_passes_options(
    fault_proxy: Callable[..., ProxyProcess],
    sse_origin: OriginServer,
    addon_scripts: dict[str, Path],
    tmp_path: Path,
) -> None:
    profile_file = tmp_path / "mine.yaml"
    profile_file.write_text("name: mine\n")
    inline = {"name": "inline", "rules": [{"match": {"path": "/events"}, "fault": {"kind": "delay", "ms": 5}}]}
    proxy = fault_proxy(
        ["shipped-name", profile_file, inline], script=addon_scripts["stand_in"], seed=7, time_scale=0.5
    )
    assert proxy.port > 0 and proxy.url == f"http://127.0.0.1:{proxy.port}"
    assert proxy.is_running()

    response = httpx.get(f"{proxy.url}/events?count=3&interval=0", timeout=10)
    assert response.status_code == 200
    assert response.text.count("data: ") == 3
    assert sse_origin.wait_for_request(lambda r: r.path == "/events", timeout=5).events_sent == 3

    started = proxy.wait_for_journal(lambda e: e["event"] == "started", timeout=5)
    assert started["profiles"][:2] == ["shipped-name", str(profile_file)]
    assert yaml.safe_load(Path(started["profiles"][2]).read_text()) == inline
    assert (started["seed"], started["time_scale"], started["dry_run"]) == (7, "0.5", False)
    entry = proxy.wait_for_journal(lambda e: e["event"] == "response", timeout=5)
    assert entry == {"event": "response", "path": "/events?count=3&interval=0", "status": 200}
    assert "Loading script" in proxy.output()


def h2_get(port: int, cafile: Path, path: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    """One HTTP/2 GET over TLS with the h2 library: (status, body, negotiated ALPN).

    Not httpx: httpcore offers ALPN ["http/1.1", "h2"] in that order and mitmproxy honours the client's
    preference, so httpx(http2=True) always ends up on HTTP/1.1 through mitmproxy. Browsers offer h2 first.
    """
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    deadline = time.monotonic() + timeout
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        alpn = tls.selected_alpn_protocol() or ""
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1"), (":path", path)]
        conn.send_headers(1, headers, end_stream=True)
        tls.sendall(conn.data_to_send())
        status, body = 0, b""
        while True:
            tls.settimeout(max(0.01, deadline - time.monotonic()))
            data = tls.recv(65536)
            if not data:
                raise EOFError("connection closed before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body, alpn
            tls.sendall(conn.data_to_send())


def test_tls_clients_use_the_same_port(
    fault_proxy: Callable[..., ProxyProcess], addon_scripts: dict[str, Path]
) -> None:
    proxy = fault_proxy([], script=addon_scripts["stand_in"])
    # TLS on the plain port, certificate for 127.0.0.1 signed by the confdir's CA.
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with httpx.Client(verify=context, timeout=10) as client:
        assert client.get(f"{proxy.https_url}/health").json() == {"ok": True}
    status, body, alpn = h2_get(proxy.port, proxy.ca_cert, "/events?count=2&interval=0")
    assert (status, alpn) == (200, "h2")
    assert body.count(b"data: ") == 2
    assert httpx.get(f"{proxy.url}/health", timeout=10).http_version == "HTTP/1.1"


def test_context_manager_stops_cleanly(
    sse_origin: OriginServer, addon_scripts: dict[str, Path], fault_confdir: Path, tmp_path: Path
) -> None:
    with ProxyProcess(
        {"name": "x"},
        upstream=sse_origin.url,
        script=addon_scripts["stand_in"],
        confdir=fault_confdir,
        workdir=tmp_path / "run",
    ) as proxy:
        port = proxy.port
        assert httpx.get(f"{proxy.url}/status/201", timeout=10).status_code == 201
        proxy.wait_for_journal(lambda e: e.get("status") == 201, timeout=5)
    assert not proxy.is_running()
    assert proxy.returncode == 0 and not proxy.killed
    assert not port_accepts(port)
    # The journal stays readable after stop (also when the harness owned and removed the work dir).
    assert [e["event"] for e in proxy.journal()] == ["started", "response"]
    assert (tmp_path / "run" / "profile-0.yaml").is_file()


def test_crash_is_surfaced_with_output(
    sse_origin: OriginServer, addon_scripts: dict[str, Path], fault_confdir: Path
) -> None:
    proxy = ProxyProcess(
        upstream=sse_origin.url,
        script=addon_scripts["stand_in"],
        confdir=fault_confdir,
        extra_args=["-s", str(addon_scripts["misbehave"])],
    )
    with pytest.raises(ProxyCrashed) as excinfo, proxy:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{proxy.url}/die", timeout=10)
        with pytest.raises(ProxyCrashed):
            # Fails fast instead of waiting out the timeout: the process is gone.
            proxy.wait_for_journal(lambda e: False, timeout=30)
    assert excinfo.value.returncode == 3
    assert "exited on its own with code 3" in str(excinfo.value)
    assert "misbehave.py" in excinfo.value.output  # the "Loading script" line: output is attached


def test_addon_error_is_surfaced_without_masking_the_test_error(
    sse_origin: OriginServer,
    addon_scripts: dict[str, Path],
    fault_confdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = ProxyProcess(
        upstream=sse_origin.url,
        script=addon_scripts["stand_in"],
        confdir=fault_confdir,
        extra_args=["-s", str(addon_scripts["misbehave"])],
    )
    with pytest.raises(LookupError, match="the test's own failure"), proxy:
        httpx.get(f"{proxy.url}/boom", timeout=10)
        wait_until(lambda: "boom from the misbehaving addon" in proxy.output(), 5, "addon error logged")
        raise LookupError("the test's own failure")
    assert "logged an addon error" in capsys.readouterr().err


def test_startup_problems_fail_fast_with_output(
    sse_origin: OriginServer, addon_scripts: dict[str, Path], fault_confdir: Path, tmp_path: Path
) -> None:
    # mitmproxy ignores `--set` of options no addon declared; the harness must not.
    started = time.monotonic()
    with pytest.raises(ProxyStartError, match="declared by no addon: fault_log, fault_profile"):
        ProxyProcess("p", upstream=sse_origin.url, script=addon_scripts["empty"], confdir=fault_confdir).start()
    with pytest.raises(ProxyStartError, match="No such script"):
        ProxyProcess(upstream=sse_origin.url, script=tmp_path / "missing.py", confdir=fault_confdir).start()
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('broken addon')\n")
    with pytest.raises(ProxyStartError, match="broken addon"):
        ProxyProcess(upstream=sse_origin.url, script=broken, confdir=fault_confdir).start()
    assert time.monotonic() - started < 20


def test_journal_tolerates_a_partly_written_last_line(tmp_path: Path) -> None:
    proxy = ProxyProcess(upstream="http://127.0.0.1:9", workdir=tmp_path)
    assert proxy.journal() == []
    proxy.journal_path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert proxy.journal() == [{"a": 1}, {"b": 2}]
    assert proxy.wait_for_journal(lambda e: "b" in e, timeout=1) == {"b": 2}
    with pytest.raises(TimeoutError):
        proxy.wait_for_journal(lambda e: "c" in e, timeout=0.1)
    proxy.journal_path.write_text('{"a": 1}\n{"c": 3}')  # complete but not yet newline-terminated
    assert proxy.journal() == [{"a": 1}, {"c": 3}]
    proxy.journal_path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"journal\.jsonl:2"):
        proxy.journal()


def test_plugin_fixtures_clean_up_and_fail_on_crash(pytester: pytest.Pytester, addon_scripts: dict[str, Path]) -> None:
    pytester.makepyfile(
        f"""
        import httpx

        STAND_IN = {str(addon_scripts["stand_in"])!r}
        MISBEHAVE = {str(addon_scripts["misbehave"])!r}

        def test_default_upstream_is_sse_origin(fault_proxy, sse_origin):
            proxy = fault_proxy({{"name": "p"}}, script=STAND_IN)
            assert httpx.get(proxy.url + "/health", timeout=10).json() == {{"ok": True}}
            assert [r.path for r in sse_origin.requests] == ["/health"]

        def test_crash_fails_at_teardown(fault_proxy):
            proxy = fault_proxy([], script=STAND_IN, extra_args=["-s", MISBEHAVE])
            try:
                httpx.get(proxy.url + "/die", timeout=10)
            except httpx.TransportError:
                pass
        """
    )
    result = pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*exited on its own with code 3*"])
