"""The benchmark scenarios: each starts what it needs, measures, stops it and returns the numbers.

- `throughput`: small GETs over HTTP/1.1 (wrk), HTTP/2 over TLS (h2load) and HTTP/2 with an h2 upstream,
  nginx direct and every proxy configuration, in interleaved rounds;
- `sse`: many concurrent SSE streams with an idle-timeout and a buffer rule (timer lateness, RSS per stream);
- `accuracy`: throttle rates and a 500 ms delay under `faultproxy run`;
- `passthrough`: HTTPS through CONNECT to a host no rule targets, `fault_passthrough` on and off.

Each returns a dataclass of measurements (no markdown: bench/tables.py renders them). Progress goes to
stderr as each run finishes. `prepare` starts the nginx origin shared by throughput, accuracy and passthrough.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadgen import (
    PT_CONNS,
    SSE_EVENTS,
    PtRun,
    Run,
    concurrent_gets,
    pt_load,
    run_h2load,
    run_wrk,
    sse_load,
    start_sse_origin,
    start_tls_relay,
    throttle_run,
)
from procs import (
    PY,
    Nginx,
    Proxy,
    cpu_seconds,
    faultproxy_run,
    free_port,
    mitmdump,
    nomatch_rules,
    proc_status_kb,
    wait_port,
    write_profile,
)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


# --------------------------------------------------------------------------------------------------
# The shared origin


def prepare(work: Path, confdir: Path, throttle_seconds: float) -> Nginx:
    """nginx with the accuracy scenario's files (rate x throttle_seconds bytes each), and mitmproxy's CA
    generated in `confdir` once, before anything is timed. The caller stops the nginx."""
    nginx = Nginx(work, {key: int(rate * throttle_seconds) for _, rate, key in RATES})
    try:
        warm = mitmdump("warm", nginx.url, confdir, None).start()
        warm.ready()
        warm.stop()
    except BaseException:
        nginx.stop()
        raise
    return nginx


# --------------------------------------------------------------------------------------------------
# Throughput


H2_H2 = "HTTP/2 (TLS), h2 upstream"
PLAIN = "plain mitmdump"
# The two configurations whose per-round ratios to plain mitmdump are reported.
PER_ROUND = ("faultproxy run, 20 rules, no match", "mitmdump -s addons/faultproxy.py, 20 rules, no match")


@dataclass
class Throughput:
    rounds: int
    seconds: float
    protocols: list[str]
    configs: list[str]  # configuration labels, in table order
    runs: dict[tuple[str, str], list[Run]]  # (protocol, configuration) -> one Run per round
    rss_kb: dict[tuple[str, str], int]  # peak RSS (VmHWM) of the proxy, or of nginx's worker for "nginx direct"
    ratios: dict[str, float]  # "protocol | configuration" -> median req/s / plain mitmdump's median req/s
    per_round: dict[str, list[float]]  # "protocol | configuration" -> per round req/s / plain mitmdump's, PER_ROUND only


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


def throughput(work: Path, nginx: Nginx, confdir: Path, rounds: int, seconds: float) -> Throughput:
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
        (PLAIN, md(None)),
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

    ratios: dict[str, float] = {}
    for proto in protocols:
        base = statistics.median(r.rps for r in results[(proto, PLAIN)])
        for label, _ in configs:
            med = statistics.median(r.rps for r in results[(proto, label)])
            ratios[f"{proto} | {label}"] = med / base if base else float("nan")
    # Per-round ratios (each round's runs are minutes apart at most, so noise shared within a round).
    per_round: dict[str, list[float]] = {}
    for proto in protocols:
        for label in PER_ROUND:
            per_round[f"{proto} | {label}"] = [a.rps / b.rps for a, b in zip(results[(proto, label)], results[(proto, PLAIN)]) if b.rps]
    return Throughput(rounds, seconds, protocols, [label for label, _ in configs], results, rss, ratios, per_round)


# --------------------------------------------------------------------------------------------------
# SSE streams


SSE_RULES = [
    {
        "name": "idle-timeout",
        "match": {"path": "/events"},
        "faults": [{"type": "timeout", "scope": "idle", "after": "2s", "action": "close"}],
    },
    {"name": "buffer", "match": {"path": "/events"}, "faults": [{"type": "buffer", "events": 1}]},
]
IDLE = 2.0


@dataclass
class SseRun:
    label: str
    faulted: bool  # with the idle-timeout and buffer rules: SSE_EVENTS - 1 events, then the cut
    streams: int
    ok: int  # streams that went as expected
    late: list[float]  # sorted, ms: when the client saw the cut - when it was due (faulted streams that went as expected)
    rss_per_stream_kb: float
    cpu: float  # the proxy's CPU seconds per wall second

    def lateness(self, q: float) -> float:
        """The q-quantile of `late` (nan without any)."""
        return _pct(self.late, q) if self.late else float("nan")


@dataclass
class Sse:
    streams: int
    ramp: float
    runs: dict[str, SseRun]  # by configuration label, in table order


def sse(work: Path, confdir: Path, n: int, ramp: float) -> Sse:
    rows = [("plain mitmdump (stream_large_bodies=1), no faults", "mitmdump", False), ("mitmdump -s addons/faultproxy.py", "mitmdump", True),
            ("faultproxy run", "lean", True)]  # fmt: skip
    profile = write_profile(work / "sse.yaml", "sse-bench", SSE_RULES)
    runs: dict[str, SseRun] = {}
    for label, engine, faulted in rows:
        origin_port, times_file = free_port(), work / f"sse-origin-{engine}-{faulted}.json"
        origin = start_sse_origin(origin_port, times_file)
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
            res = asyncio.run(sse_load(px.port, px.pid, n, ramp, faulted))
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
        runs[label] = SseRun(label, faulted, n, len(good), late, per, res["cpu"])
        print(f"  SSE {label}: ok {len(good)}/{n}, lateness {lat}, {per:.1f} KB/stream, cpu {res['cpu']:.0%}",
              file=sys.stderr, flush=True)  # fmt: skip
    return Sse(n, ramp, runs)


# --------------------------------------------------------------------------------------------------
# Throttle and delay accuracy (faultproxy run)


RATES = [("64 KiB/s", 64 * 1024, "t64k"), ("1 MiB/s", 1024 * 1024, "t1m"), ("10 MiB/s", 10 * 1024 * 1024, "t10m")]
DELAY_MS = 500
DELAY_REQUESTS = 50


def accuracy_profile(work: Path) -> Path:
    rules = [
        {"name": f"throttle-{key}", "match": {"path": f"/files/{key}"}, "faults": [{"type": "throttle", "rate": f"{rate}B/s"}]}
        for _, rate, key in RATES
    ]
    rules.append({"name": "delay-500", "match": {"path": "/delayed"}, "faults": [{"type": "delay", "time": f"{DELAY_MS}ms"}]})
    return write_profile(work / "accuracy.yaml", "accuracy", rules)


@dataclass
class ThrottleRun:
    label: str
    rate: int  # bytes/s the rule sets
    bytes: int
    seconds: float  # from the first to the last body chunk
    achieved: float  # bytes/s after the first chunk

    @property
    def error(self) -> float:
        return self.achieved / self.rate - 1


@dataclass
class Accuracy:
    throttle_seconds: float
    throttle: list[ThrottleRun]  # one per RATES entry
    delay_ms: int
    requests: int  # concurrent requests, undelayed and then delayed
    base: list[float]  # sorted latencies of the undelayed requests, seconds
    added: list[float]  # sorted, ms: k-th fastest delayed latency - k-th fastest undelayed latency


def accuracy(work: Path, nginx: Nginx, confdir: Path, throttle_seconds: float) -> Accuracy:
    px = faultproxy_run("accuracy", nginx.url, confdir, accuracy_profile(work), ["--", "-q"]).start()
    throttled: list[ThrottleRun] = []
    try:
        px.ready()
        for label, rate, key in RATES:
            size = int(rate * throttle_seconds)
            achieved, secs, got = throttle_run(px.port, key, size)
            run = ThrottleRun(label, rate, got, secs, achieved)
            throttled.append(run)
            print(f"  throttle {label}: {achieved:,.0f} B/s over {secs:.2f} s ({run.error:+.2%})", file=sys.stderr, flush=True)
        n = DELAY_REQUESTS
        asyncio.run(concurrent_gets(px.port, "/plain", 5))  # warm up
        base = asyncio.run(concurrent_gets(px.port, "/plain", n))
        delayed = asyncio.run(concurrent_gets(px.port, "/delayed", n))
        # 50 requests at once queue in the proxy: the k-th fastest undelayed request is the fair
        # reference for the k-th fastest delayed one (the difference of the two latency quantiles);
        # against the median, the fastest delayed request would seem to get less than the delay.
        base.sort()
        delayed.sort()
        added = sorted((d - b) * 1000 for d, b in zip(delayed, base))
        print(f"  delay: added {added[0]:.1f}/{statistics.median(added):.1f}/{added[-1]:.1f} ms", file=sys.stderr, flush=True)
    finally:
        px.stop()
    return Accuracy(throttle_seconds, throttled, DELAY_MS, n, base, added)


# --------------------------------------------------------------------------------------------------
# Passthrough: CONNECT tunnels to a host no rule targets, regular mode

PT_TARGETED = "targeted.example"
PT_HTTPS = "HTTPS via CONNECT (keep-alive in tunnel)"
PT_HTTP = "plain HTTP, absolute-form"
PT_ON = "fault_passthrough on (default)"
PT_OFF = "--set fault_passthrough=false"


@dataclass
class PtConfig:
    configuration: str
    request: str  # PT_HTTPS or PT_HTTP
    direct: bool  # no proxy: TLS straight to the origin
    runs: list[PtRun]  # one per round
    rss_kb: int | None  # the proxy's peak RSS (None when direct)

    @property
    def tls(self) -> bool:
        """Whether the client saw a certificate (so whether the tunnel was intercepted is known)."""
        return self.request == PT_HTTPS


@dataclass
class Passthrough:
    rounds: int
    seconds: float
    targeted: str  # the host every rule of the profile targets
    conns: int  # concurrent keep-alive connections of the client
    configs: list[PtConfig]  # in table order
    off: str  # the label of the intercepted configuration: PT_OFF, or the allow_hosts fallback
    fallback: bool  # the lean engine rejected fault_passthrough=false; allow_hosts=. intercepted instead


def passthrough(work: Path, nginx: Nginx, confdir: Path, rounds: int, seconds: float) -> Passthrough:
    from faultproxy.testing.tls import self_signed_cert

    cert, key = self_signed_cert(work / "pt-tls")
    origin_der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    rules = [
        {"name": f"targeted-{i}", "match": {"host": PT_TARGETED}, "faults": [fault]}
        for i, fault in enumerate([{"type": "delay", "time": "1s"}, {"type": "abort", "status": 503}] * 2 + [{"type": "delay", "time": "2s"}])
    ]
    prof = write_profile(work / "targeted.yaml", "targeted", rules)
    relay = start_tls_relay(cert, key, nginx.http)
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

        on, off = PT_ON, PT_OFF
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
        https, http = PT_HTTPS, PT_HTTP
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

    rows = [PtConfig(cfg, kind, px is None, results[(cfg, kind)], None if px is None else rss[cfg]) for cfg, kind, px in configs]
    return Passthrough(rounds, seconds, PT_TARGETED, PT_CONNS, rows, off, off != PT_OFF)
