"""faultproxy benchmarks: one command, one run, every figure side by side.

    python bench/run.py            # full run (about 9 minutes), writes bench/RESULTS.md
    python bench/run.py --quick    # shorter runs, for a smoke check (throttle runs 3 s, not 10 s)

Tables (markdown on stdout, and into bench/RESULTS.md unless --no-write):

1. Small GETs, HTTP/1.1 (wrk) and HTTP/2 over TLS (h2load): nginx direct; plain mitmdump; `mitmdump -s
   addons/faultproxy.py` with 20 rules that match nothing; `faultproxy run` (lean engine) with the same
   profile; the same two with one more rule that matches everything with `delay: 0`. Every proxy is in
   reverse mode in front of the same nginx (plain HTTP upstream). Rounds are interleaved (round 1 of every
   configuration, then round 2, ...) so the noise of this machine spreads over all of them; req/s is the
   median with min-max, latencies are medians over rounds of each run's p50/p99, CPU is the proxy's CPU time
   over wall time while loaded (100% = one core), peak RSS is the proxy's VmHWM at the end.
2. 1,000 concurrent SSE streams (HTTP/1.1, no TLS) with an idle-timeout rule and a buffer rule: timer
   lateness (when the client sees the idle timeout's cut, minus when it should have come), RSS per stream, CPU.
3. Throttle accuracy at 64 KiB/s, 1 MiB/s, 10 MiB/s over 10 s each (issue 3).
4. Delay accuracy: 50 concurrent requests delayed 500 ms (issue 2).
5. Passthrough: `faultproxy run --mode regular` with rules that all target one host; HTTPS through CONNECT
   to an untargeted loopback TLS origin with `fault_passthrough` on (not intercepted) and off (intercepted),
   plain HTTP absolute-form for reference. An asyncio client (keep-alive inside each tunnel) drives it, since
   wrk cannot tunnel through CONNECT.

Everything runs on loopback on this machine: load generator and proxy share the cores, so absolute figures
are low and noisy; ratios from one run are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADDON_SCRIPT = ROOT / "addons" / "faultproxy.py"
PY = sys.executable
MITMDUMP = [str(Path(PY).parent / "mitmdump")] if (Path(PY).parent / "mitmdump").exists() else [
    PY, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"
]  # fmt: skip


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


# --------------------------------------------------------------------------------------------------
# Load generators


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


@dataclass
class Run:
    rps: float
    p50: float  # ms
    p99: float
    cpu: float  # proxy CPU seconds per wall second
    errors: int = 0


def run_wrk(url: str, seconds: float, conns: int) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s", url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed on {url}: {out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_err = (int(errs.group(1)) if errs else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return rps, p50, p99, n_err


def run_h2load(url: str, seconds: float, clients: int, streams: int, work: Path) -> tuple[float, float, float, int]:
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(
        ["h2load", f"-c{clients}", f"-m{streams}", "-D", str(max(1, round(seconds))), "--log-file", str(log), url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    rps = float(m.group(1)) if m else 0.0
    lat = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.count("\t") >= 2)
    st = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    n_err = int(st.group(2)) + int(st.group(3)) if st else 0
    if not lat:
        return rps, float("nan"), float("nan"), n_err
    return rps, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], n_err


def fmt_range(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


# --------------------------------------------------------------------------------------------------
# Table 1: throughput


def _throughput_rounds(work, nginx, configs, protocols, proxies, rounds, seconds):  # type: ignore[no-untyped-def]
    results: dict[tuple[str, str], list[Run]] = {(proto, label): [] for proto in protocols for label, _ in configs}
    for rnd in range(rounds):
        for proto in protocols:
            for label, _ in configs:
                px = proxies.get((proto, label))
                pid = px.pid if px else nginx.worker()
                if proto == "HTTP/1.1":
                    url = f"http://127.0.0.1:{px.port if px else nginx.http}/"
                    c0, t0 = cpu_seconds(pid), time.monotonic()
                    rps, p50, p99, errs = run_wrk(url, seconds, conns=10)
                else:
                    url = f"https://127.0.0.1:{px.port if px else nginx.https}/"
                    c0, t0 = cpu_seconds(pid), time.monotonic()
                    rps, p50, p99, errs = run_h2load(url, seconds, clients=4, streams=4, work=work)
                cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
                results[(proto, label)].append(Run(rps, p50, p99, cpu, errs))
                print(f"  round {rnd + 1} {proto:12} {label:62} {rps:10,.0f} req/s  p50 {p50:7.2f} ms  "
                      f"p99 {p99:7.2f} ms  cpu {cpu:4.0%}  errors {errs}", file=sys.stderr, flush=True)  # fmt: skip
    rss = {k: proc_status_kb(p.pid, "VmHWM") for k, p in proxies.items()}
    rss.update({(proto, "nginx direct"): proc_status_kb(nginx.worker(), "VmHWM") for proto in protocols})
    return results, rss



H2_H2 = "HTTP/2 (TLS), h2 upstream"


def throughput(work: Path, nginx: Nginx, confdir: Path, rounds: int, seconds: float) -> tuple[str, dict]:
    nomatch = write_profile(work / "nomatch20.yaml", "nomatch20", nomatch_rules())
    delay0 = write_profile(
        work / "delay0.yaml", "delay0", [*nomatch_rules(), {"name": "all-delay-0", "faults": [{"type": "delay", "time": "0s"}]}]
    )
    def up(proto: str) -> tuple[str, list[str]]:
        # The informational third set: an HTTP/2 upstream (nginx over TLS, self-signed), where mitmproxy
        # multiplexes one upstream connection instead of opening one per request as it does h2 -> h1.
        if proto == H2_H2:
            return f"https://127.0.0.1:{nginx.https}", ["--set", "ssl_insecure=true"]
        return nginx.url, []

    def md(profile: Path | None) -> Callable[[str, str], Proxy]:
        return lambda label, proto: mitmdump(label, up(proto)[0], confdir, profile, up(proto)[1])

    def fp(profile: Path) -> Callable[[str, str], Proxy]:
        return lambda label, proto: faultproxy_run(label, up(proto)[0], confdir, profile, up(proto)[1])

    configs: list[tuple[str, Callable[[str, str], Proxy] | None]] = [
        ("nginx direct", None),
        ("plain mitmdump", md(None)),
        ("mitmdump -s addons/faultproxy.py, 20 rules, no match", md(nomatch)),
        ("faultproxy run, 20 rules, no match", fp(nomatch)),
        ("mitmdump -s addons/faultproxy.py, + delay: 0 on every request", md(delay0)),
        ("faultproxy run, + delay: 0 on every request", fp(delay0)),
    ]
    protocols = ["HTTP/1.1", "HTTP/2 (TLS)", H2_H2]
    proxies: dict[tuple[str, str], Proxy] = {}
    for proto in protocols:
        for label, make in configs:
            if make is not None:
                proxies[(proto, label)] = make(label, proto).start()
    try:
        for p in proxies.values():
            p.ready()
        results, rss = _throughput_rounds(work, nginx, configs, protocols, proxies, rounds, seconds)
    finally:
        for p in proxies.values():
            p.stop()

    lines = [
        "| protocol | configuration | req/s median (min–max) | vs plain mitmdump | p50 ms | p99 ms | CPU | CPU µs/request | peak RSS | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, float] = {}
    for proto in protocols:
        base = statistics.median(r.rps for r in results[(proto, "plain mitmdump")])
        for label, _ in configs:
            runs = results[(proto, label)]
            med = statistics.median(r.rps for r in runs)
            ratio = med / base if base else float("nan")
            ratios[f"{proto} | {label}"] = ratio
            lines.append(
                f"| {proto} | {label} | {fmt_range([r.rps for r in runs])} | {ratio:.2f}x | "
                f"{statistics.median(r.p50 for r in runs):.2f} | {statistics.median(r.p99 for r in runs):.2f} | "
                f"{statistics.median(r.cpu for r in runs):.0%} | "
                # CPU time per request varies less between rounds than req/s on a shared machine.
                f"{statistics.median(r.cpu / r.rps * 1e6 if r.rps else float('nan') for r in runs):,.0f} | "
                f"{rss[(proto, label)] / 1024:.0f} MB | "
                f"{sum(r.errors for r in runs)} |"
            )
    # Per-round ratios (each round's runs are minutes apart at most, so noise shared within a round).
    for proto in protocols:
        for label in ("faultproxy run, 20 rules, no match", "mitmdump -s addons/faultproxy.py, 20 rules, no match"):
            per_round = [a.rps / b.rps for a, b in zip(results[(proto, label)], results[(proto, "plain mitmdump")]) if b.rps]
            ratios[f"{proto} | {label} | per round"] = per_round  # type: ignore[assignment]
    return "\n".join(lines), ratios


# --------------------------------------------------------------------------------------------------
# Table 2: 1,000 SSE streams


SSE_RULES = [
    {
        "name": "idle-timeout",
        "match": {"path": "/events"},
        "faults": [{"type": "timeout", "scope": "idle", "after": "2s", "action": "close"}],
    },
    {"name": "buffer", "match": {"path": "/events"}, "faults": [{"type": "buffer", "events": 1}]},
]
SSE_EVENTS = 6
SSE_INTERVAL = 1.0


async def _sse_origin(port: int, out_file: str) -> None:
    """A minimal SSE origin for table 2 (run as `bench/run.py --sse-origin PORT FILE`).

    GET /events?id=N: SSE_EVENTS events SSE_INTERVAL s apart (chunked), then silence until the peer
    closes. It notes when it wrote each stream's last event (CLOCK_MONOTONIC, the clock every process
    here shares) and writes {id: time} to FILE on SIGTERM: the idle timeout of a stream is due exactly
    2 s after that write.
    """
    import signal as sig

    last: dict[str, float] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            sid = target.split("id=", 1)[1].split("&", 1)[0] if "id=" in target else "?"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            start = time.monotonic()
            for k in range(1, SSE_EVENTS + 1):
                await asyncio.sleep(max(0.0, start + (k - 1) * SSE_INTERVAL - time.monotonic()))
                event = b"id: %d\ndata: {\"seq\":%d}\n\n" % (k, k)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                if k == SSE_EVENTS:
                    last[sid] = time.monotonic()
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(sig.SIGTERM, stop.set)
    await stop.wait()
    Path(out_file).write_text(json.dumps(last))
    server.close()


SSE_RULES = [
    {
        "name": "idle-timeout",
        "match": {"path": "/events"},
        "faults": [{"type": "timeout", "scope": "idle", "after": "2s", "action": "close"}],
    },
    {"name": "buffer", "match": {"path": "/events"}, "faults": [{"type": "buffer", "events": 1}]},
]
IDLE = 2.0


async def _sse_client(port: int, out: dict, i: int, faulted: bool) -> None:
    rec = out.setdefault(i, {"events": 0, "end": None, "error": None})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        rec["error"] = f"connect: {e}"
        return
    try:
        writer.write(f"GET /events?id={i} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 200"):
            rec["error"] = head[:40].decode(errors="replace")
            return
        while True:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            rec["events"] += data.count(b"data:")
            if not faulted and rec["events"] >= SSE_EVENTS:
                await asyncio.sleep(1.0)  # stay open a moment: RSS is sampled with every stream open
                break
        rec["end"] = time.monotonic()
    except (ConnectionError, asyncio.IncompleteReadError):
        rec["end"] = time.monotonic()
    except TimeoutError:
        rec["error"] = "timeout"
    finally:
        writer.close()


async def _sse_load(port: int, pid: int, n: int, ramp: float, faulted: bool) -> dict:
    out: dict = {}
    rss0 = proc_status_kb(pid, "VmRSS")
    c0, t0 = cpu_seconds(pid), time.monotonic()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(_sse_client(port, out, i, faulted)))
        await asyncio.sleep(ramp / n)
    peak = rss0
    while not all(t.done() for t in tasks):
        peak = max(peak, proc_status_kb(pid, "VmRSS"))
        await asyncio.sleep(0.1)
    cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    return {"clients": out, "rss0": rss0, "peak": peak, "cpu": cpu}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def sse_table(work: Path, confdir: Path, n: int, ramp: float) -> tuple[str, dict]:
    rows = [("plain mitmdump (stream_large_bodies=1), no faults", "mitmdump", False), ("mitmdump -s addons/faultproxy.py", "mitmdump", True),
            ("faultproxy run", "lean", True)]  # fmt: skip
    profile = write_profile(work / "sse.yaml", "sse-bench", SSE_RULES)
    lines = [
        "| configuration | streams as expected | cut lateness p50 / p99 / max | RSS per stream | CPU |",
        "|---|---|---|---|---|",
    ]
    summary: dict = {}
    for label, engine, faulted in rows:
        origin_port, times_file = free_port(), work / f"sse-origin-{engine}-{faulted}.json"
        origin = subprocess.Popen([PY, str(Path(__file__).resolve()), "--sse-origin", str(origin_port), str(times_file)])
        px: Proxy | None = None
        try:
            wait_port(origin_port, origin)
            upstream = f"http://127.0.0.1:{origin_port}"
            prof = profile if faulted else None
            maker = faultproxy_run if engine == "lean" else mitmdump
            # Plain mitmdump would buffer the endless SSE bodies whole (mitmproxy issue 4469): stream them.
            extra = ["--", "-q"] if engine == "lean" else ["-q"] if faulted else ["-q", "--set", "stream_large_bodies=1"]
            px = maker(label, upstream, confdir, prof, extra).start()
            wait_port(px.port, px.proc)
            res = asyncio.run(_sse_load(px.port, px.pid, n, ramp, faulted))
        finally:
            if px is not None:
                px.stop()
            origin.send_signal(signal.SIGTERM)
            origin.wait(10)
        last_sent = json.loads(times_file.read_text())
        clients = res["clients"]
        if faulted:
            good = {i: c for i, c in clients.items() if not c["error"] and c["end"] and c["events"] == SSE_EVENTS - 1}
            late = sorted((c["end"] - last_sent[str(i)] - IDLE) * 1000 for i, c in good.items() if str(i) in last_sent)
            lat = f"{_pct(late, 0.5):.1f} / {_pct(late, 0.99):.1f} / {late[-1]:.1f} ms" if late else "—"
        else:
            good = {i: c for i, c in clients.items() if not c["error"] and c["events"] == SSE_EVENTS}
            late, lat = [], "— (no timer)"
        per = (res["peak"] - res["rss0"]) / n
        expect = f"{SSE_EVENTS - 1} events, then the cut" if faulted else f"all {SSE_EVENTS} events"
        lines.append(f"| {label} | {len(good)}/{n} ({expect}) | {lat} | {per:.1f} KB | {res['cpu']:.0%} |")
        summary[label] = {"ok": len(good), "late": late, "rss_per_stream_kb": per, "cpu": res["cpu"]}
        print(f"  SSE {label}: ok {len(good)}/{n}, lateness {lat}, {per:.1f} KB/stream, cpu {res['cpu']:.0%}",
              file=sys.stderr, flush=True)  # fmt: skip
    return "\n".join(lines), summary


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
# Tables 3 and 4: throttle and delay accuracy (faultproxy run)


RATES = [("64 KiB/s", 64 * 1024, "t64k"), ("1 MiB/s", 1024 * 1024, "t1m"), ("10 MiB/s", 10 * 1024 * 1024, "t10m")]


def accuracy_profile(work: Path) -> Path:
    rules = [
        {"name": f"throttle-{key}", "match": {"path": f"/files/{key}"}, "faults": [{"type": "throttle", "rate": f"{rate}B/s"}]}
        for _, rate, key in RATES
    ]
    rules.append({"name": "delay-500", "match": {"path": "/delayed"}, "faults": [{"type": "delay", "time": "500ms"}]})
    return write_profile(work / "accuracy.yaml", "accuracy", rules)


def throttle_run(port: int, key: str, size: int) -> tuple[float, float, int]:
    """(achieved bytes/s after the first chunk, seconds, bytes)."""
    first = last = None
    got = first_len = 0
    with httpx.stream("GET", f"http://127.0.0.1:{port}/files/{key}", timeout=60) as r:
        for chunk in r.iter_raw():
            now = time.monotonic()
            if first is None:
                first, first_len = now, len(chunk)
            got += len(chunk)
            last = now
    assert first is not None and last is not None and got == size, (got, size)
    return (got - first_len) / (last - first), last - first, got


async def _timed_get(port: int, path: str) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    await reader.read()  # until close
    took = time.monotonic() - t0
    writer.close()
    return took


async def _concurrent(port: int, path: str, n: int) -> list[float]:
    return list(await asyncio.gather(*(_timed_get(port, path) for _ in range(n))))


def accuracy_tables(work: Path, nginx: Nginx, confdir: Path, throttle_seconds: float) -> tuple[str, str, dict]:
    px = faultproxy_run("accuracy", nginx.url, confdir, accuracy_profile(work), ["--", "-q"]).start()
    summary: dict = {}
    try:
        px.ready()
        tl = ["| rate | bytes | seconds | achieved | error | within 5% |", "|---|---|---|---|---|---|"]
        for label, rate, key in RATES:
            size = int(rate * throttle_seconds)
            achieved, secs, got = throttle_run(px.port, key, size)
            err = achieved / rate - 1
            summary[f"throttle {label}"] = err
            tl.append(f"| {label} | {got:,} | {secs:.2f} | {achieved / 1024:,.1f} KiB/s | {err:+.2%} | {'yes' if abs(err) <= 0.05 else 'NO'} |")
            print(f"  throttle {label}: {achieved:,.0f} B/s over {secs:.2f} s ({err:+.2%})", file=sys.stderr, flush=True)
        n = 50
        asyncio.run(_concurrent(px.port, "/plain", 5))  # warm up
        base = asyncio.run(_concurrent(px.port, "/plain", n))
        delayed = asyncio.run(_concurrent(px.port, "/delayed", n))
        # 50 requests at once queue in the proxy: the k-th fastest undelayed request is the fair
        # reference for the k-th fastest delayed one (the difference of the two latency quantiles);
        # against the median, the fastest delayed request would seem to get less than the delay.
        base.sort()
        delayed.sort()
        added = sorted((d - b) * 1000 for d, b in zip(delayed, base))
        within = sum(1 for a in added if abs(a - 500) <= 30)
        summary["delay added ms"] = added
        dl = [
            "| requests | baseline latency min / median / max (no rule) | added latency min / median / max | within 500 ± 30 ms |",
            "|---|---|---|---|",
            f"| {n} concurrent | {base[0] * 1000:.1f} / {statistics.median(base) * 1000:.1f} / {base[-1] * 1000:.1f} ms "
            f"| {added[0]:.1f} / {statistics.median(added):.1f} / {added[-1]:.1f} ms | {within}/{n} |",
        ]
        print(f"  delay: added {added[0]:.1f}/{statistics.median(added):.1f}/{added[-1]:.1f} ms", file=sys.stderr, flush=True)
    finally:
        px.stop()
    return "\n".join(tl), "\n".join(dl), summary


# --------------------------------------------------------------------------------------------------
# Passthrough: CONNECT tunnels to a host no rule targets, regular mode

PT_TARGETED = "targeted.example"
PT_CONNS = 8


def _tls_relay_main(cert: str, key: str, target_port: int) -> None:
    """`run.py --tls-relay CERT KEY PORT`: faultproxy.testing.tls.TlsRelay in front of 127.0.0.1:PORT, in its
    own process (so it does not share a GIL with the load generator); prints its port, runs until stdin closes."""
    from faultproxy.testing.tls import TlsRelay

    with TlsRelay(Path(cert), Path(key), ("127.0.0.1", target_port)) as relay:
        print(relay.port, flush=True)
        sys.stdin.read()


@dataclass
class PtRun:
    rps: float
    p50: float
    p99: float
    cpu: float
    errors: int
    intercepted: bool | None  # None: plain HTTP, no certificate to compare


async def _pt_conn(proxy_port: int | None, connect: tuple[str, int] | None, target: str, host: str, deadline: float,
                   origin_der: bytes | None, lat: list[float], seen: list[bool], errors: list[int]) -> None:  # fmt: skip
    """One keep-alive connection sending GETs until `deadline`: through `CONNECT connect` + TLS when
    `connect` is set (to the proxy, or straight to the TLS origin when `proxy_port` is None), else plain
    HTTP absolute-form (`target` is then the absolute URL) to the proxy."""
    writer = None
    try:
        port = proxy_port if proxy_port is not None else connect[1]  # type: ignore[index]
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        if connect is not None:
            if proxy_port is not None:
                writer.write(f"CONNECT {connect[0]}:{connect[1]} HTTP/1.1\r\nHost: {connect[0]}:{connect[1]}\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                    raise RuntimeError(f"CONNECT refused: {head[:60]!r}")
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            await asyncio.wait_for(writer.start_tls(ctx, server_hostname=connect[0]), 10)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            seen.append(der != origin_der)
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
            if m is None or not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {head[:80]!r}")
            await asyncio.wait_for(reader.readexactly(int(m.group(1))), 10)
            lat.append((time.perf_counter() - t0) * 1000)
    except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError, ssl.SSLError) as e:
        errors.append(1)
        print(f"  passthrough client error: {e!r}", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()


def pt_load(proxy_port: int | None, connect: tuple[str, int] | None, target: str, host: str, seconds: float,
            origin_der: bytes | None) -> tuple[float, float, float, int, bool | None]:  # fmt: skip
    """(req/s, p50 ms, p99 ms, errors, intercepted) for PT_CONNS concurrent keep-alive connections."""
    lat: list[float] = []
    seen: list[bool] = []
    errors: list[int] = []

    async def go() -> float:
        t0 = time.monotonic()
        deadline = t0 + seconds
        await asyncio.wait_for(
            asyncio.gather(*(_pt_conn(proxy_port, connect, target, host, deadline, origin_der, lat, seen, errors)
                             for _ in range(PT_CONNS))),  # fmt: skip
            seconds + 30,
        )
        return time.monotonic() - t0

    wall = asyncio.run(go())
    lat.sort()
    if not lat:
        return 0.0, float("nan"), float("nan"), len(errors), None
    intercepted = (any(seen) if all(x == seen[0] for x in seen) else None) if seen else None
    return len(lat) / wall, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(errors), intercepted


def passthrough_table(work: Path, nginx: Nginx, confdir: Path, rounds: int, seconds: float) -> str:
    from faultproxy.testing.tls import self_signed_cert

    cert, key = self_signed_cert(work / "pt-tls")
    origin_der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    rules = [
        {"name": f"targeted-{i}", "match": {"host": PT_TARGETED}, "faults": [fault]}
        for i, fault in enumerate([{"type": "delay", "time": "1s"}, {"type": "abort", "status": 503}] * 2 + [{"type": "delay", "time": "2s"}])
    ]
    prof = write_profile(work / "targeted.yaml", "targeted", rules)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    relay = subprocess.Popen([PY, str(Path(__file__).resolve()), "--tls-relay", str(cert), str(key), str(nginx.http)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    proxies: dict[str, Proxy] = {}
    try:
        line = relay.stdout.readline() if relay.stdout else ""  # type: ignore[union-attr]
        if not line.strip().isdigit():
            raise RuntimeError(f"TLS relay did not start: {line!r}")
        origin = ("127.0.0.1", int(line))

        def regular(label: str, extra: Sequence[str]) -> Proxy:
            port = free_port()
            return Proxy(label, [PY, "-m", "faultproxy.cli", "run", str(prof), "--mode", "regular", "--port", str(port),
                                 "--set", f"confdir={confdir}", "--set", "ssl_insecure=true", *extra, "--", "-q"], port)  # fmt: skip

        on = "fault_passthrough on (default)"
        off = "--set fault_passthrough=false"
        proxies = {on: regular(on, []).start()}
        proxies[on].ready()
        px_off = regular(off, ["--set", "fault_passthrough=false"]).start()
        try:
            px_off.ready()
        except RuntimeError:
            if px_off.proc is None or px_off.proc.returncode != 2:
                raise
            # This lean engine rejects the option as unknown (exit 2): intercept every host through
            # mitmproxy's own allow_hosts instead, which is what fault_passthrough=false leaves in force.
            off = "--set allow_hosts=. (fault_passthrough=false rejected, see note)"
            px_off = regular(off, ["--set", "allow_hosts=."]).start()
            px_off.ready()
            print("  passthrough: --set fault_passthrough=false rejected by the lean engine; using allow_hosts=.",
                  file=sys.stderr, flush=True)  # fmt: skip
        proxies[off] = px_off
        https, http = "HTTPS via CONNECT (keep-alive in tunnel)", "plain HTTP, absolute-form"
        configs: list[tuple[str, str, Proxy | None]] = [
            ("direct to the TLS origin, no proxy (ceiling of client + origin)", https, None),
            (on, https, proxies[on]),
            (off, https, proxies[off]),
            (on, http, proxies[on]),
            (off, http, proxies[off]),
        ]
        # warm-up: one short run on each (first TLS handshakes, mitmproxy's certificate generation)
        for _, kind, px in configs:
            pt_load(px.port if px else None, origin if kind == https else None,
                    "/" if kind == https else f"http://127.0.0.1:{nginx.http}/", "127.0.0.1", 0.3, origin_der)  # fmt: skip
        results: dict[tuple[str, str], list[PtRun]] = {(c, k): [] for c, k, _ in configs}
        for rnd in range(rounds):
            for cfg, kind, px in configs:
                c0, t0 = (cpu_seconds(px.pid) if px else 0.0), time.monotonic()
                if kind == https:
                    rps, p50, p99, errs, icp = pt_load(px.port if px else None, origin, "/", f"{origin[0]}:{origin[1]}", seconds, origin_der)
                else:
                    rps, p50, p99, errs, icp = pt_load(px.port if px else None, None, f"http://127.0.0.1:{nginx.http}/",
                                                       f"127.0.0.1:{nginx.http}", seconds, None)  # fmt: skip
                cpu = (cpu_seconds(px.pid) - c0) / (time.monotonic() - t0) if px else float("nan")
                results[(cfg, kind)].append(PtRun(rps, p50, p99, cpu, errs, icp))
                print(f"  round {rnd + 1} {kind:40} {cfg:62} {rps:9,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                      f"cpu {cpu:4.0%}  errors {errs}  intercepted {icp}", file=sys.stderr, flush=True)  # fmt: skip
        rss = {label: proc_status_kb(p.pid, "VmHWM") for label, p in proxies.items()}
    finally:
        for p in proxies.values():
            p.stop()
        if relay.stdin:
            relay.stdin.close()
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()

    base = {k: statistics.median(r.rps for r in results[(off, k)]) for k in (https, http)}
    lines = [
        "| request | configuration | tunnel intercepted | req/s median (min–max) | vs passthrough off | p50 ms | p99 ms | proxy CPU | peak RSS | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg, kind, px in configs:
        runs = results[(cfg, kind)]
        icps = {r.intercepted for r in runs}
        icp = "—" if kind == http else ("yes" if icps == {True} else "no" if icps == {False} else "mixed/unknown")
        med = statistics.median(r.rps for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        lines.append(
            f"| {kind if px else 'HTTPS, TLS straight to the origin (no CONNECT)'} | {cfg} | {icp} | {fmt_range([r.rps for r in runs])} | "
            f"{med / base[kind] if base[kind] else float('nan'):.2f}x | "
            f"{statistics.median(r.p50 for r in runs):.2f} | {statistics.median(r.p99 for r in runs):.2f} | "
            f"{'—' if px is None else f'{cpu:.0%}'} | {'—' if px is None else f'{rss[cfg] / 1024:.0f} MB'} | "
            f"{sum(r.errors for r in runs)} |"
        )
    if off != "--set fault_passthrough=false":
        lines += [
            "",
            "Note: this lean engine rejects `--set fault_passthrough=false` as an unknown option (exit 2; it checks "
            "option names against mitmproxy's addons and the faultproxy addon's own `load()`, not the control plane's "
            "`fault_*` options), so the intercepted configuration sets mitmproxy's `allow_hosts=.` instead: every "
            "host intercepted, which is what `fault_passthrough=false` leaves in force. The run tries the real option "
            "first and uses it once the engine accepts it.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def targets(ratios: dict, sse: dict, acc: dict) -> str:
    def ok(b: bool) -> str:
        return "met" if b else "NOT met"

    lines = ["| target | measured | |", "|---|---|---|"]
    for proto in ("HTTP/1.1", "HTTP/2 (TLS)"):
        r = ratios[f"{proto} | faultproxy run, 20 rules, no match"]
        lines.append(f"| faultproxy run >= 1.8x plain mitmdump, {proto} | {r:.2f}x | {ok(r >= 1.8)} |")
    r = ratios[f"{H2_H2} | faultproxy run, 20 rules, no match"]
    lines.append(f"| (no target; informational) faultproxy run vs plain mitmdump, {H2_H2} | {r:.2f}x | — |")
    for proto in ("HTTP/1.1", "HTTP/2 (TLS)"):
        r = ratios[f"{proto} | mitmdump -s addons/faultproxy.py, 20 rules, no match"]
        lines.append(f"| mitmdump -s faultproxy, 20 non-matching rules >= 0.95x plain mitmdump, {proto} | {r:.2f}x | {ok(r >= 0.95)} |")
    lean = sse.get("faultproxy run")
    if lean:
        p99 = lean["late"][min(len(lean["late"]) - 1, int(len(lean["late"]) * 0.99))] if lean["late"] else float("nan")
        lines.append(f"| 1,000 faulted SSE streams: timer lateness p99 <= 50 ms (faultproxy run) | {p99:.1f} ms | {ok(p99 <= 50)} |")
        lines.append(
            f"| <= 60 KB RSS per plain (non-TLS) stream (faultproxy run, faulted) | {lean['rss_per_stream_kb']:.1f} KB | "
            f"{ok(lean['rss_per_stream_kb'] <= 60)} |"
        )
    for label, _, _ in RATES:
        err = acc[f"throttle {label}"]
        lines.append(f"| throttle {label} within 5% | {err:+.2%} | {ok(abs(err) <= 0.05)} |")
    added = acc["delay added ms"]
    lines.append(
        f"| delay 500 ms, 50 concurrent: every added latency within 500 ± 30 ms | {added[0]:.1f}–{added[-1]:.1f} ms | "
        f"{ok(all(abs(a - 500) <= 30 for a in added))} |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--sse-origin"]:
        asyncio.run(_sse_origin(int(args_in[1]), args_in[2]))
        return 0
    if args_in[:1] == ["--tls-relay"]:
        _tls_relay_main(args_in[1], args_in[2], int(args_in[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (2 rounds of 2 s, 200 SSE streams, 3 s throttle)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per configuration (default 7)")
    ap.add_argument("--seconds", type=float, help="seconds per load run (default 3)")
    ap.add_argument("--streams", type=int, help="concurrent SSE streams (default 1000)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    ap.add_argument("--only", choices=["throughput", "sse", "accuracy", "passthrough"], action="append", help="run only these parts")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    streams = args.streams or (200 if args.quick else 1000)
    throttle_seconds = 3.0 if args.quick else 10.0
    parts = set(args.only or ["throughput", "sse", "accuracy", "passthrough"])
    pt_seconds = min(seconds, 3.0)
    for tool in ("wrk", "h2load", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"bench: {tool} is missing; run `make system-deps` (scripts/system-deps.sh)", file=sys.stderr)
            return 1

    import mitmproxy.version

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="faultproxy-bench-"))
    confdir = work / "confdir"
    out: list[str] = []
    nginx: Nginx | None = None
    try:
        files = {key: int(rate * throttle_seconds) for _, rate, key in RATES}
        nginx = Nginx(work, files)
        # Generate the CA once, before anything is timed.
        warm = mitmdump("warm", nginx.url, confdir, None).start()
        warm.ready()
        warm.stop()
        header = [
            "# faultproxy benchmarks",
            "",
            f"Command: `{' '.join(['python', 'bench/run.py', *(argv if argv is not None else sys.argv[1:])])}` "
            f"(`make bench`). Python {sys.version.split()[0]}, mitmproxy {mitmproxy.version.VERSION}, "
            f"{os.cpu_count()} CPUs, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Load generator, proxy and "
            "origin share this machine.",
            "",
        ]
        out += header
        ratios: dict = {}
        sse: dict = {}
        acc: dict = {}
        if "throughput" in parts:
            t1, ratios = throughput(work, nginx, confdir, rounds, seconds)
            out += [
                f"## Small GETs ({rounds} interleaved rounds of {seconds:g} s; wrk -t1 -c10; h2load -c4 -m4 over TLS)",
                "",
                t1,
                "",
                "Per-round ratios to plain mitmdump (same round): "
                + "; ".join(
                    f"{k.replace(' | per round', '')}: " + ", ".join(f"{x:.2f}x" for x in v)
                    for k, v in ratios.items()
                    if k.endswith("per round")
                ),
                "",
            ]
        if "sse" in parts:
            t2, sse = sse_table(work, confdir, streams, ramp=2.0)
            out += [
                f"## {streams:,} concurrent SSE streams (HTTP/1.1) with an idle-timeout (2 s, close) and a buffer (events: 1) rule",
                "",
                "Each stream (opened over 2 s): 6 events 1 s apart, then the origin goes silent; the buffer holds each "
                "event until the next arrives (the client gets 5), and the idle timeout must cut the stream 2 s after "
                "the origin's last write. Lateness = when the client sees the cut - (when the origin wrote its last event "
                "+ 2 s), both on CLOCK_MONOTONIC: the proxy's timer lateness plus its delivery of the close. RSS per "
                "stream = (peak RSS with every stream open - RSS before) / streams.",
                "",
                t2,
                "",
            ]
        if "accuracy" in parts:
            t3, t4, acc = accuracy_tables(work, nginx, confdir, throttle_seconds)
            out += [
                f"## Throttle accuracy (faultproxy run; a body of rate x {throttle_seconds:g} s from nginx; rate measured "
                "from the first to the last body chunk)",
                "",
                t3,
                "",
                "## Delay accuracy (faultproxy run; 50 concurrent requests, rule delay 500 ms; added = latency of the k-th fastest delayed request - latency of the k-th fastest of 50 concurrent undelayed requests)",
                "",
                t4,
                "",
            ]
        if "passthrough" in parts:
            t5 = passthrough_table(work, nginx, confdir, rounds, pt_seconds)
            out += [
                f"## Passthrough: HTTPS to a host no rule targets, regular mode ({rounds} interleaved rounds of {pt_seconds:g} s)",
                "",
                f"`faultproxy run --mode regular` (lean engine) with a profile whose 5 rules all match `host: {PT_TARGETED}`; "
                "requests go to an untargeted loopback TLS origin (faultproxy.testing.tls.TlsRelay, in its own process, "
                "in front of nginx) through `CONNECT 127.0.0.1:PORT`, with `fault_passthrough` on (the default: the "
                "tunnel is not intercepted, mitmproxy only relays bytes) and off (mitmproxy terminates TLS and parses "
                "HTTP); plain-HTTP absolute-form requests to nginx for reference. \"tunnel intercepted\" compares the "
                "certificate the client sees with the origin's. Load generator: a Python asyncio client in this process "
                f"({PT_CONNS} concurrent keep-alive connections, one CONNECT + TLS handshake each, then back-to-back GETs "
                "inside the tunnel until the run's time is up; latency per request, handshakes not counted), because wrk "
                "and h2load cannot tunnel through CONNECT. The client is itself Python and shares the machine's "
                f"{os.cpu_count()} CPUs with the proxy, nginx and the relay: the first row is its ceiling without a proxy.",
                "",
                t5,
                "",
            ]
        if ratios and sse and acc:
            out += ["## Targets", "", targets(ratios, sse, acc), ""]
        out.append(f"Total bench time: {time.monotonic() - started:.0f} s.")
    finally:
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(out) + "\n"
    print(text)
    if not args.no_write:
        (ROOT / "bench" / "RESULTS.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
