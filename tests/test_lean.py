"""The lean engine (faultproxy.lean): what faultproxy promises, served by the lean master.

Real processes and sockets on loopback: `python -m faultproxy.lean` through the harness
(`ProxyProcess(engine="lean")`), and `faultproxy run` for the command line. No timing assertions
beyond generous bounds on waits: speed is measured in bench/.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from faultproxy import _mitm, lean
from faultproxy._mitm import dispatch
from faultproxy.testing.origin import OriginServer, expected_bytes
from faultproxy.testing.proxy import ProxyProcess

pytestmark = pytest.mark.timeout(60)

PROFILE = {
    "version": 1,
    "name": "lean-test",
    "rules": [
        {"name": "slow", "match": {"path": "/delay-me*"}, "faults": [{"type": "delay", "time": "300ms"}]},
        {
            "name": "cut-events",
            "match": {"path": "/events"},
            "faults": [{"type": "cut", "after_events": 2, "action": "close"}],
        },
    ],
}


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer("127.0.0.1", 0) as o:
        yield o


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lean-confdir")


@pytest.fixture(scope="module")
def proxy(origin: OriginServer, confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(PROFILE, upstream=origin.url, confdir=confdir, workdir=tmp_path_factory.mktemp("lean"), engine="lean")
    with p:
        yield p


class _ModeProxy(ProxyProcess):
    """The harness with another mode than reverse (the harness itself always builds reverse:UPSTREAM)."""

    def __init__(self, mode: str, **kw: object) -> None:
        super().__init__(upstream="http://unused.invalid", engine="lean", **kw)  # type: ignore[arg-type]
        self.mode = mode

    def build_command(self) -> list[str]:
        cmd = super().build_command()
        at = cmd.index("--mode")
        cmd[at + 1] = self.mode
        return cmd


# --- engine basics -------------------------------------------------------------------------------------


def test_lean_loads_only_its_addons(proxy: ProxyProcess) -> None:
    line = next(ln for ln in proxy.output().splitlines() if "lean engine; addons:" in ln)
    loaded = line.split("addons:", 1)[1].replace(" ", "").split(",")
    for needed in ("proxyserver", "nextlayer", "tlsconfig", "faultproxy", "errorcheck"):
        assert needed in loaded
    for left_out in ("dumper", "save", "mapremote", "onboarding", "upstreamauth"):
        assert left_out not in loaded


def test_option_addons_are_added_on_use() -> None:
    extra, unknown = lean.addons_for(
        ["save_stream_file=/tmp/x", "upstream_auth=a:b", "client_certs=/tmp/c", "fault_seed=1", "no_such=1"], []
    )
    assert extra == {"save", "upstreamauth"}  # client_certs: tlsconfig, always loaded
    assert unknown == ["no_such"]
    assert lean.addons_for(["block_global=false", "stream_large_bodies=1m"], [])[0] == set()


def test_reverse_http1(proxy: ProxyProcess) -> None:
    r = httpx.get(proxy.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert r.http_version == "HTTP/1.1"


def _h2_get(port: int, cafile: Path, path: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    """One HTTP/2 GET over TLS with the h2 library (httpx offers http/1.1 first, and mitmproxy honours that)."""
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1"), (":path", path)], end_stream=True)
        tls.sendall(conn.data_to_send())
        status, body = 0, b""
        while True:
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
                    return status, body, tls.selected_alpn_protocol() or ""
            tls.sendall(conn.data_to_send())


def test_reverse_http2_over_tls(proxy: ProxyProcess) -> None:
    status, body, alpn = _h2_get(proxy.port, proxy.ca_cert, "/bytes?size=200000&seed=3")
    assert (status, alpn, len(body)) == (200, "h2", 200000)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected_bytes(200000, 3)).hexdigest()
    ctx = ssl.create_default_context(cafile=str(proxy.ca_cert))  # and HTTP/1.1 over TLS on the same port
    assert httpx.get(proxy.https_url + "/health", verify=ctx, timeout=10).json() == {"ok": True}


def test_delay_fault_journaled(proxy: ProxyProcess) -> None:
    started = time.monotonic()
    r = httpx.get(proxy.url + "/delay-me/0", timeout=10)  # no such endpoint: 404 after the delay
    assert r.status_code == 404
    assert time.monotonic() - started >= 0.29
    rec = proxy.wait_for_journal(lambda e: e.get("rule") == "slow")
    assert rec["fault"] == "delay" and rec["outcome"].startswith("delayed")


def test_cut_fault_journaled(proxy: ProxyProcess) -> None:
    got = b""
    with httpx.stream("GET", proxy.url + "/events?count=6&interval=0.05", timeout=10) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in r.iter_raw():
                got += chunk
    assert got.count(b"\n\n") == 2  # exactly two events, then the cut
    rec = proxy.wait_for_journal(lambda e: e.get("rule") == "cut-events")
    assert rec["fault"] == "cut"


# --- WebSocket pass-through --------------------------------------------------------------------------------


def _ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


class _WsEcho:
    """A minimal WebSocket origin: one handshake, then echoes text frames (payloads < 126 bytes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(20)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = next(ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key"))
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + _ws_accept(key) + b"\r\n\r\n"
            )
            while True:
                hdr = conn.recv(2)
                if len(hdr) < 2:
                    return
                n = hdr[1] & 0x7F
                mask = conn.recv(4) if hdr[1] & 0x80 else b""
                data = b""
                while len(data) < n:
                    data += conn.recv(n - len(data))
                if mask:
                    data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
                if hdr[0] & 0x0F == 0x8:
                    return
                conn.sendall(bytes([0x81, len(data)]) + data)

    def close(self) -> None:
        self.sock.close()


def test_websocket_pass_through(confdir: Path, tmp_path: Path) -> None:
    ws = _WsEcho()
    try:
        p = ProxyProcess(PROFILE, upstream=f"http://127.0.0.1:{ws.port}", confdir=confdir, workdir=tmp_path, engine="lean")
        with p:
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            with s:
                key = base64.b64encode(os.urandom(16))
                s.sendall(
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(4096)
                assert head.startswith(b"HTTP/1.1 101") and _ws_accept(key) in head
                mask = os.urandom(4)
                payload = b"hello through the lean engine"
                s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
                echo = b""
                while len(echo) < 2 + len(payload):
                    chunk = s.recv(4096)
                    assert chunk, "proxy closed the WebSocket"
                    echo += chunk
                assert echo == bytes([0x81, len(payload)]) + payload
                s.sendall(bytes([0x88, 0x80]) + mask)
    finally:
        ws.close()


# --- regular and upstream modes ----------------------------------------------------------------------------


def test_regular_and_upstream_modes(origin: OriginServer, confdir: Path, tmp_path: Path) -> None:
    with _ModeProxy("regular", profiles=PROFILE, confdir=confdir, workdir=tmp_path / "regular") as regular:
        r = httpx.get(origin.url + "/health", proxy=regular.url, timeout=10)
        assert r.json() == {"ok": True}
        # HTTPS through CONNECT: the lean engine's TLS interception with its CA. The origin is plain HTTP,
        # so only the CONNECT + TLS handshake to the proxy is checked here (the upstream TLS would fail).
        with _ModeProxy(f"upstream:{regular.url}", profiles=PROFILE, confdir=confdir, workdir=tmp_path / "up") as up:
            started = time.monotonic()
            r = httpx.get(origin.url + "/delay-me/x", proxy=up.url, timeout=10)
            assert r.status_code == 404 and time.monotonic() - started >= 0.29
            up.wait_for_journal(lambda e: e.get("rule") == "slow")
        assert regular.wait_for_journal(lambda e: e.get("rule") == "slow")  # both proxies delayed it


# --- command line: option errors and shutdown --------------------------------------------------------------


def _python(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=30, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["-m", "faultproxy.lean", "--set", "no_such_option=1"], 2, "unknown mitmproxy option(s): no_such_option"),
        (["-m", "faultproxy.lean", "--set", "fault_time_scale=fast"], 2, "fault_time_scale: expected a number"),
        (["-m", "faultproxy.lean", "--set", "fault_profile=/nonexistent.yaml"], 2, "invalid fault profile"),
        (["-m", "faultproxy.cli", "run", "--upstream", "http://x", "--", "--anticache"], 2, "Use --full"),
        (["-m", "faultproxy.cli", "run", "nonexistent-profile", "--upstream", "http://x"], 1, "nonexistent-profile"),
    ],
)
def test_option_errors_are_clean(argv: list[str], code: int, message: str, confdir: Path) -> None:
    res = _python(*argv, "--set", f"confdir={confdir}") if "faultproxy.lean" in argv else _python(*argv)
    assert res.returncode == code, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_port_in_use_is_a_clean_startup_error(confdir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = _python(
            "-m", "faultproxy.lean", "--mode", "reverse:http://127.0.0.1:9", "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "--set", f"confdir={confdir}",
        )  # fmt: skip
    assert res.returncode == 1
    assert "Traceback" not in res.stderr + res.stdout
    assert "startup" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    raise AssertionError("faultproxy run did not start")


@pytest.mark.parametrize("sig, full", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_faultproxy_run_stops_cleanly(sig: int, full: bool, origin: OriginServer, confdir: Path, tmp_path: Path) -> None:
    port = _free_port()
    journal = tmp_path / "journal.jsonl"
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps(PROFILE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "faultproxy.cli", "run", str(profile), "--upstream", origin.url, "--port", str(port),
         "--log", str(journal), "--set", f"confdir={confdir}", *(["--full"] if full else [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_serving(port, proc)
        # A live stream open while stopping must not hold the shutdown up.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /events?count=1000&interval=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        httpx.get(f"http://127.0.0.1:{port}/delay-me/1", timeout=10)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=15)
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "faults fired" in out  # the addon's done hook ran: journal summary written
    assert any(json.loads(line)["rule"] == "slow" for line in journal.read_text().splitlines())


def test_lean_argument_parser() -> None:
    # The mitmdump-like subset `python -m faultproxy.lean` and `faultproxy run -- ...` take.
    parser = lean.build_parser()
    args = parser.parse_args(["-s", "a.py", "--mode", "regular", "--set", "x=1", "-q"])
    assert args.scripts == ["a.py"] and args.mode == ["regular"] and args.setoptions == ["x=1"] and args.quiet
    assert asyncio.iscoroutinefunction(lean.run_lean)


# --- hot paths: the rule index and the cached hook dispatch ------------------------------------------------


def _rule_set(matches: list[dict]) -> list:
    from faultproxy.matching import compile_profiles
    from faultproxy.profile import load_profile

    rules = [{"name": f"r{i}", "match": m, "faults": [{"type": "delay", "time": "0s"}]} for i, m in enumerate(matches)]
    return compile_profiles([load_profile({"version": 1, "name": "idx", "rules": rules})])


INDEX_MATCHES = [
    {"path": "/v1/stream/*"},
    {"path": ["/events", "/events/*"]},
    {"path": "/ev*"},
    {"path": "*/x"},
    {"path": "/"},
    {"path_regex": "^/api/v[0-9]+/items"},
    {"path_regex": "^/a/?b/"},
    {"path_regex": "items"},
    {"path_regex": "^/a|^/b"},
    {"host": ["api.example.com", "*.svc.internal"]},
    {"host": "EXAMPLE.*"},
    {"host": "x[.]com"},
    {"host": "localhost", "path": "/v1/*"},
    {"method": "POST"},
    {},
]
INDEX_PATHS = ["/", "/v1/stream/a", "/v1", "/events", "/events/1?x=1", "/ev", "/evx/y", "/a/x", "/x", "/api/v2/items/3",
               "/api/vx/items", "/ab/", "/a/b/", "/b", "/v1/z?q", "?", "/items/1", "*"]  # fmt: skip
INDEX_HOSTS = ["api.example.com", "a.svc.internal", "example.org", "Example.COM", "xacom", "x.com", "localhost", "127.0.0.1"]


def test_rule_index_never_loses_a_matching_rule() -> None:
    from mitmproxy.test import tflow

    from faultproxy.matching import RuleIndex

    rules = _rule_set(INDEX_MATCHES)
    index = RuleIndex(rules)
    assert index.indexed >= 5  # most of these rules are bucketed
    for path in INDEX_PATHS:
        for host in INDEX_HOSTS:
            for method in ("GET", "POST"):
                f = tflow.tflow()
                f.request.path, f.request.host, f.request.method = path, host, method
                f.request.headers["host"] = host
                want = [r.name for r in rules if r.matches_request(f)]
                got = index.candidates(f)
                assert [r.name for r in got if r.matches_request(f)] == want, (path, host, method)
                assert [rules.index(r) for r in got] == sorted(rules.index(r) for r in got)  # rule order kept
    f = tflow.tflow()
    f.request.path = "/nothing/here"
    only_bucketed = RuleIndex(_rule_set([{"path": "/v1/*"}, {"host": "a.example.com"}]))
    assert only_bucketed.candidates(f) == []  # a request no rule can match tries no rule at all


class _Rec:
    def __init__(self, name: str, calls: list[str], child: object | None = None, fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail
        if child is not None:
            self.addons = [child]

    def requestheaders(self, flow: object) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


class _UpdateRec(_Rec):
    def update(self, flows: list[object]) -> None:
        self.calls.append(f"{self.name}:update:{len(flows)}")


class _AsyncRec(_Rec):
    async def requestheaders(self, flow: object) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.calls.append(self.name)


def test_cached_dispatch_calls_what_mitmproxy_calls() -> None:
    from mitmproxy import exceptions, hooks, master, options
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
    from mitmproxy.test import tflow

    async def run(cached: bool) -> list[str]:
        calls: list[str] = []
        m = master.Master(options.Options())
        if cached:
            _mitm.cache_hook_dispatch(m.addons)
        m.addons.add(_Rec("a", calls, child=_Rec("a.child", calls)), _AsyncRec("b", calls), _Rec("c", calls, fail=True),
                     _Rec("d", calls))  # fmt: skip
        hook = HttpRequestHeadersHook(tflow.tflow())
        await m.addons.handle_lifecycle(hook)
        m.addons.add(_Rec("e", calls))  # added later: the cache must see it
        await m.addons.handle_lifecycle(hook)
        m.addons.add(_UpdateRec("u", calls))  # now an addon has `update`: lifecycle events must reach it
        await m.addons.handle_lifecycle(hook)
        m.addons.remove(m.addons.get("a"))
        await m.addons.trigger_event(hook)

        class Halt:
            name = "halt"

            def requestheaders(self, flow: object) -> None:
                raise exceptions.AddonHalt

        m.addons.chain.insert(0, Halt())  # direct chain edit, as some tools do: then add() refreshes
        m.addons.add(_Rec("f", calls))
        await m.addons.trigger_event(hook)
        await m.addons.trigger_event(hooks.UpdateHook([]))
        await m.done()  # uninstalls the master's log handler (its loop is about to close)
        return calls

    plain = asyncio.run(run(cached=False))
    cached = asyncio.run(run(cached=True))
    assert cached == plain
    assert plain[:5] == ["a", "a.child", "b", "c", "d"]
    assert "u:update:1" in plain


def test_lean_hook_handler_disarms_the_idle_watchdog_as_mitmproxy_does() -> None:
    """install_lean_hook_handler re-implements ProxyConnectionHandler.handle_hook with the watchdog's
    disarm() inlined: fail loudly when either changes in a mitmproxy release."""
    import inspect
    import types

    from mitmproxy.proxy import mode_servers, server
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
    from mitmproxy.test import tflow

    hook_src = inspect.getsource(dispatch.MITM_HANDLE_HOOK)
    for needle in ("with self.timeout_watchdog.disarm():", "(data,) = hook.args()",
                   "await self.master.addons.handle_lifecycle(hook)", "await data.wait_for_resume()"):  # fmt: skip
        assert needle in hook_src, f"ProxyConnectionHandler.handle_hook changed ({needle!r}): re-check _mitm.install_lean_hook_handler"
    disarm_src = inspect.getsource(server.TimeoutWatchdog.disarm)
    for needle in ("self.can_timeout.clear()", "self.blocker += 1", "self.blocker -= 1", "if self.blocker == 0:",
                   "self.register_activity()", "self.can_timeout.set()"):  # fmt: skip
        assert needle in disarm_src, f"TimeoutWatchdog.disarm changed ({needle!r}): re-check _mitm.install_lean_hook_handler"

    async def go() -> None:
        async def on_timeout() -> None:
            pass

        watchdog = server.TimeoutWatchdog(10, on_timeout)
        seen: list[tuple[bool, int]] = []

        class Addons:
            async def handle_lifecycle(self, hook: object) -> None:
                seen.append((watchdog.can_timeout.is_set(), watchdog.blocker))

        handler = types.SimpleNamespace(timeout_watchdog=watchdog, master=types.SimpleNamespace(addons=Addons()))
        _mitm.install_lean_hook_handler()
        await mode_servers.ProxyConnectionHandler.handle_hook(handler, HttpRequestHeadersHook(tflow.tflow()))  # type: ignore[arg-type]
        assert seen == [(False, 1)]  # disarmed while the addons run
        assert watchdog.can_timeout.is_set() and watchdog.blocker == 0  # armed again afterwards

    asyncio.run(go())


def test_save_option_loads_flow_saving(origin: OriginServer, confdir: Path, tmp_path: Path) -> None:
    flows = tmp_path / "flows.mitm"
    p = ProxyProcess(PROFILE, upstream=origin.url, confdir=confdir, workdir=tmp_path / "w", engine="lean",
                     extra_args=["--set", f"save_stream_file={flows}"])  # fmt: skip
    with p:
        assert httpx.get(p.url + "/health", timeout=10).status_code == 200
        assert "save" in next(ln for ln in p.output().splitlines() if "lean engine; addons:" in ln)
    assert flows.stat().st_size > 0


def test_control_plane_options_are_known_to_the_lean_engine():
    # They are declared by a child addon of FaultProxy; the lean engine must accept them.
    from faultproxy.lean import addons_for

    _, unknown = addons_for(
        ["fault_api=127.0.0.1:0", "fault_passthrough=false", "fault_select_header=x-fault", "fault_max_active=3"], []
    )
    assert unknown == []
