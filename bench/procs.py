"""Processes and ports for the benchmarks, the nginx origin they share and the proxies under test.

Process utilities read /proc (CPU time, RSS, children); `Nginx` is the origin every throughput, accuracy and
passthrough run goes through (its own config and self-signed certificate in a work directory); `Proxy`,
`mitmdump()` and `faultproxy_run()` start the proxies in reverse mode in front of an upstream, and
`nomatch_rules()` / `write_profile()` build the profiles they load. Also used by bench/profile_proxy.py.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADDON_SCRIPT = ROOT / "addons" / "faultproxy.py"
PY = sys.executable
MITMDUMP = [str(Path(PY).parent / "mitmdump")] if (Path(PY).parent / "mitmdump").exists() else [
    PY, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Processes and ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and of its reaped children: none here)."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2, verify=False)
            return
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} not serving after {timeout} s: {last}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


# --------------------------------------------------------------------------------------------------
# The origin: nginx


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_requests 1000000;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /files/ {{ alias {dir}/files/; }}
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


def self_signed(dir_: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    (dir_ / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dir_ / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class Nginx:
    def __init__(self, work: Path, files: dict[str, int]):
        self.dir = work / "nginx"
        (self.dir / "tmp").mkdir(parents=True)
        for d in (work, self.dir):  # nginx's workers run as nobody: they must read the files
            d.chmod(0o755)
        (self.dir / "files").mkdir()
        for name, size in files.items():
            with open(self.dir / "files" / name, "wb") as f:
                f.truncate(size)
        self_signed(self.dir)
        self.http, self.https = free_port(), free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, http=self.http, https=self.https))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_http(f"http://127.0.0.1:{self.http}/", proc=self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def worker(self) -> int:
        kids = children(self.proc.pid)
        return kids[0] if kids else self.proc.pid

    def stop(self) -> None:
        stop(self.proc)


# --------------------------------------------------------------------------------------------------
# Proxies under test


def nomatch_rules(n: int = 20) -> list[dict]:
    """Rules that match nothing a benchmark sends, with the kinds of condition users write."""
    rules = []
    for i in range(n):
        kind = i % 5
        match: dict = (
            {"host": [f"api{i}.example.com", f"*.svc{i}.internal"]}
            if kind == 0
            else {"path": [f"/v{i}/stream/*", f"/events{i}"]}
            if kind == 1
            else {"method": ["POST", "PUT"], "path": f"/upload{i}/*"}
            if kind == 2
            else {"path_regex": f"^/api/v{i}/items/[0-9]+$"}
            if kind == 3
            else {"headers": {"x-fault-test": f"case-{i}"}, "path": "/chaos/*"}
        )
        rules.append({"name": f"nomatch-{i}", "match": match, "faults": [{"type": "delay", "time": "1s"}]})
    return rules


def write_profile(path: Path, name: str, rules: list[dict]) -> Path:
    path.write_text(json.dumps({"version": 1, "name": name, "rules": rules}, indent=1))
    return path


@dataclass
class Proxy:
    label: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen | None = None
    cpu: list[float] = field(default_factory=list)

    def start(self) -> Proxy:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True)  # fmt: skip
        return self

    def ready(self) -> None:
        assert self.proc is not None
        wait_http(f"http://127.0.0.1:{self.port}/", proc=self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def mitmdump(label: str, upstream: str, confdir: Path, profile: Path | None, extra: Sequence[str] = ()) -> Proxy:
    port = free_port()
    cmd = [*MITMDUMP, "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1", "--listen-port", str(port),
           "--set", f"confdir={confdir}"]  # fmt: skip
    if profile is not None:
        cmd += ["-s", str(ADDON_SCRIPT), "--set", f"fault_profile={profile}"]
    return Proxy(label, cmd + list(extra), port)


def faultproxy_run(label: str, upstream: str, confdir: Path, profile: Path | None, extra: Sequence[str] = ()) -> Proxy:
    port = free_port()
    cmd = [PY, "-m", "faultproxy.cli", "run", *([str(profile)] if profile else []), "--upstream", upstream,
           "--port", str(port), "--set", f"confdir={confdir}", *extra]  # fmt: skip
    return Proxy(label, cmd, port)
