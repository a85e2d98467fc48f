"""Load generators for the benchmarks, and the small servers some of them need.

- wrk (HTTP/1.1) and h2load (HTTP/2 over TLS) runs, parsed into req/s, p50/p99 and errors (`run_wrk`,
  `run_h2load`; `Run` is one such run with the proxy's CPU);
- the SSE origin (a process of its own: `python bench/loadgen.py --sse-origin PORT FILE`) and the asyncio
  SSE clients that hold many streams open through a proxy (`sse_load`);
- the throttle client (`throttle_run`) and concurrent timed GETs for the delay (`concurrent_gets`);
- the passthrough client: keep-alive connections through `CONNECT` + TLS or plain absolute-form HTTP
  (`pt_load`, `PtRun`), and the TLS relay origin it connects to (a process of its own:
  `python bench/loadgen.py --tls-relay CERT KEY PORT`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from procs import PY, ROOT, cpu_seconds, proc_status_kb

SCRIPT = Path(__file__).resolve()

# --------------------------------------------------------------------------------------------------
# wrk and h2load


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


# --------------------------------------------------------------------------------------------------
# SSE: the origin and the clients


SSE_EVENTS = 6
SSE_INTERVAL = 1.0


async def _sse_origin(port: int, out_file: str) -> None:
    """A minimal SSE origin for the SSE scenario (run as `bench/loadgen.py --sse-origin PORT FILE`).

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


def start_sse_origin(port: int, out_file: Path) -> subprocess.Popen:
    """The SSE origin in a process of its own; SIGTERM makes it write the times of the last events to `out_file`."""
    return subprocess.Popen([PY, str(SCRIPT), "--sse-origin", str(port), str(out_file)])


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


async def sse_load(port: int, pid: int, n: int, ramp: float, faulted: bool) -> dict:
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


# --------------------------------------------------------------------------------------------------
# Throttle and delay clients


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


async def concurrent_gets(port: int, path: str, n: int) -> list[float]:
    return list(await asyncio.gather(*(_timed_get(port, path) for _ in range(n))))


# --------------------------------------------------------------------------------------------------
# Passthrough: CONNECT tunnels and the TLS origin behind them

PT_CONNS = 8


def _tls_relay_main(cert: str, key: str, target_port: int) -> None:
    """`loadgen.py --tls-relay CERT KEY PORT`: faultproxy.testing.tls.TlsRelay in front of 127.0.0.1:PORT, in its
    own process (so it does not share a GIL with the load generator); prints its port, runs until stdin closes."""
    from faultproxy.testing.tls import TlsRelay

    with TlsRelay(Path(cert), Path(key), ("127.0.0.1", target_port)) as relay:
        print(relay.port, flush=True)
        sys.stdin.read()


def start_tls_relay(cert: Path, key: Path, target_port: int) -> subprocess.Popen:
    """The TLS relay in a process of its own: it prints its port on stdout; closing its stdin stops it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([PY, str(SCRIPT), "--tls-relay", str(cert), str(key), str(target_port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip


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


def main(argv: Sequence[str]) -> int:
    """The servers that run in processes of their own: `--sse-origin PORT FILE`, `--tls-relay CERT KEY PORT`."""
    if argv[:1] == ["--sse-origin"] and len(argv) == 3:
        asyncio.run(_sse_origin(int(argv[1]), argv[2]))
        return 0
    if argv[:1] == ["--tls-relay"] and len(argv) == 4:
        _tls_relay_main(argv[1], argv[2], int(argv[3]))
        return 0
    print("usage: loadgen.py --sse-origin PORT FILE | --tls-relay CERT KEY PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
