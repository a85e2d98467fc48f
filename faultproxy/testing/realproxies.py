"""Real proxies started by tests and benchmarks, to measure faultproxy against the system it models.

`Nginx` runs Debian's nginx in the foreground (`daemon off; master_process off;`) with a configuration
the caller gives as the body of the `http {}` block; every path (pid, logs, temp dirs) lives in the work
dir, every listener on loopback. The caller's text may use `{host}`, `{port}`, `{tls_port}`, `{cert}`,
`{key}`, `{origin}` (HOST:PORT of the origin) and `{dir}`; literal braces are doubled.

Ports are picked free and handed over; the small window in which another process could take one is
covered by retrying with new ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .tls import self_signed_cert

LOCAL = "127.0.0.1"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)

_NGINX_MAIN = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""


def free_port(host: str = LOCAL) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accepts(port: int, host: str = LOCAL) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RealProxy:
    """A real proxy process in its own work dir, with a plain port and a TLS port."""

    name = "proxy"

    def __init__(self, workdir: Path, origin_port: int, config: str) -> None:
        self.dir = Path(workdir)
        self.origin_port = origin_port
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.tls_port = 0

    def command(self, conf: Path) -> list[str]:
        raise NotImplementedError

    def render(self, **values: object) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> RealProxy:
        cert, key = self_signed_cert(self.dir / "tls")
        for _attempt in range(5):
            self.port, self.tls_port = free_port(), free_port()
            conf = self.dir / f"{self.name}.conf"
            conf.write_text(
                self.render(
                    dir=self.dir, host=LOCAL, port=self.port, tls_port=self.tls_port,
                    origin=f"{LOCAL}:{self.origin_port}", cert=cert, key=key,
                )
            )  # fmt: skip
            with open(self.dir / "stderr.log", "wb") as log:
                self.proc = subprocess.Popen(self.command(conf), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if all(accepts(p) for p in (self.port, self.tls_port)):
                    return self
                time.sleep(0.02)  # poll interval of a deadline-bounded wait
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.output()}")

    def output(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RealProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nginx(RealProxy):
    """Debian's nginx; `config` is the body of the `http {}` block (see the module docstring)."""

    name = "nginx"

    def render(self, **values: object) -> str:
        return _NGINX_MAIN.format(http=self.config.format(**values), **values)

    def command(self, conf: Path) -> list[str]:
        assert NGINX is not None, "nginx is not installed"
        return [NGINX, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")]
