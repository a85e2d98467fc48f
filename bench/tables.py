"""The table printer: each scenario's measurements (bench/scenarios.py) as the markdown bench/RESULTS.md holds.

One `*_section` function per scenario returns its lines (heading, explanation, table), `targets` the
summary of the targets against the measurements, `header` the top of the document.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
from collections.abc import Sequence

from loadgen import SSE_EVENTS
from scenarios import H2_H2, Accuracy, Passthrough, Sse, Throughput


def fmt_range(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def header(args: Sequence[str]) -> list[str]:
    """The top of the document: the command (`python bench/run.py` + `args`), versions, CPUs, the time now."""
    import mitmproxy.version

    return [
        "# faultproxy benchmarks",
        "",
        f"Command: `{' '.join(['python', 'bench/run.py', *args])}` "
        f"(`make bench`). Python {sys.version.split()[0]}, mitmproxy {mitmproxy.version.VERSION}, "
        f"{os.cpu_count()} CPUs, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Load generator, proxy and "
        "origin share this machine.",
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Throughput


def throughput_table(t: Throughput) -> str:
    lines = [
        "| protocol | configuration | req/s median (min–max) | vs plain mitmdump | p50 ms | p99 ms | CPU | CPU µs/request | peak RSS | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for proto in t.protocols:
        for label in t.configs:
            runs = t.runs[(proto, label)]
            lines.append(
                f"| {proto} | {label} | {fmt_range([r.rps for r in runs])} | {t.ratios[f'{proto} | {label}']:.2f}x | "
                f"{statistics.median(r.p50 for r in runs):.2f} | {statistics.median(r.p99 for r in runs):.2f} | "
                f"{statistics.median(r.cpu for r in runs):.0%} | "
                # CPU time per request varies less between rounds than req/s on a shared machine.
                f"{statistics.median(r.cpu / r.rps * 1e6 if r.rps else float('nan') for r in runs):,.0f} | "
                f"{t.rss_kb[(proto, label)] / 1024:.0f} MB | "
                f"{sum(r.errors for r in runs)} |"
            )
    return "\n".join(lines)


def throughput_section(t: Throughput) -> list[str]:
    return [
        f"## Small GETs ({t.rounds} interleaved rounds of {t.seconds:g} s; wrk -t1 -c10; h2load -c4 -m4 over TLS)",
        "",
        throughput_table(t),
        "",
        "Per-round ratios to plain mitmdump (same round): "
        + "; ".join(f"{k}: " + ", ".join(f"{x:.2f}x" for x in v) for k, v in t.per_round.items()),
        "",
    ]


# --------------------------------------------------------------------------------------------------
# SSE streams


def sse_table(s: Sse) -> str:
    lines = [
        "| configuration | streams as expected | cut lateness p50 / p99 / max | RSS per stream | CPU |",
        "|---|---|---|---|---|",
    ]
    for r in s.runs.values():
        if r.faulted:
            lat = f"{r.lateness(0.5):.1f} / {r.lateness(0.99):.1f} / {r.late[-1]:.1f} ms" if r.late else "—"
            expect = f"{SSE_EVENTS - 1} events, then the cut"
        else:
            lat, expect = "— (no timer)", f"all {SSE_EVENTS} events"
        lines.append(f"| {r.label} | {r.ok}/{r.streams} ({expect}) | {lat} | {r.rss_per_stream_kb:.1f} KB | {r.cpu:.0%} |")
    return "\n".join(lines)


def sse_section(s: Sse) -> list[str]:
    return [
        f"## {s.streams:,} concurrent SSE streams (HTTP/1.1) with an idle-timeout (2 s, close) and a buffer (events: 1) rule",
        "",
        "Each stream (opened over 2 s): 6 events 1 s apart, then the origin goes silent; the buffer holds each "
        "event until the next arrives (the client gets 5), and the idle timeout must cut the stream 2 s after "
        "the origin's last write. Lateness = when the client sees the cut - (when the origin wrote its last event "
        "+ 2 s), both on CLOCK_MONOTONIC: the proxy's timer lateness plus its delivery of the close. RSS per "
        "stream = (peak RSS with every stream open - RSS before) / streams.",
        "",
        sse_table(s),
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Throttle and delay accuracy


def throttle_table(a: Accuracy) -> str:
    lines = ["| rate | bytes | seconds | achieved | error | within 5% |", "|---|---|---|---|---|---|"]
    for r in a.throttle:
        lines.append(
            f"| {r.label} | {r.bytes:,} | {r.seconds:.2f} | {r.achieved / 1024:,.1f} KiB/s | {r.error:+.2%} | "
            f"{'yes' if abs(r.error) <= 0.05 else 'NO'} |"
        )
    return "\n".join(lines)


def delay_table(a: Accuracy) -> str:
    base, added, n = a.base, a.added, a.requests
    within = sum(1 for x in added if abs(x - a.delay_ms) <= 30)
    return "\n".join([
        f"| requests | baseline latency min / median / max (no rule) | added latency min / median / max | within {a.delay_ms} ± 30 ms |",
        "|---|---|---|---|",
        f"| {n} concurrent | {base[0] * 1000:.1f} / {statistics.median(base) * 1000:.1f} / {base[-1] * 1000:.1f} ms "
        f"| {added[0]:.1f} / {statistics.median(added):.1f} / {added[-1]:.1f} ms | {within}/{n} |",
    ])  # fmt: skip


def accuracy_section(a: Accuracy) -> list[str]:
    return [
        f"## Throttle accuracy (faultproxy run; a body of rate x {a.throttle_seconds:g} s from nginx; rate measured "
        "from the first to the last body chunk)",
        "",
        throttle_table(a),
        "",
        f"## Delay accuracy (faultproxy run; {a.requests} concurrent requests, rule delay {a.delay_ms} ms; added = latency of the "
        f"k-th fastest delayed request - latency of the k-th fastest of {a.requests} concurrent undelayed requests)",
        "",
        delay_table(a),
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Passthrough


def passthrough_table(p: Passthrough) -> str:
    base = {c.request: statistics.median(r.rps for r in c.runs) for c in p.configs if c.configuration == p.off}
    lines = [
        "| request | configuration | tunnel intercepted | req/s median (min–max) | vs passthrough off | p50 ms | p99 ms | proxy CPU | peak RSS | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in p.configs:
        runs = c.runs
        icps = {r.intercepted for r in runs}
        icp = "—" if not c.tls else ("yes" if icps == {True} else "no" if icps == {False} else "mixed/unknown")
        med = statistics.median(r.rps for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        lines.append(
            f"| {'HTTPS, TLS straight to the origin (no CONNECT)' if c.direct else c.request} | {c.configuration} | {icp} | "
            f"{fmt_range([r.rps for r in runs])} | "
            f"{med / base[c.request] if base[c.request] else float('nan'):.2f}x | "
            f"{statistics.median(r.p50 for r in runs):.2f} | {statistics.median(r.p99 for r in runs):.2f} | "
            f"{'—' if c.direct else f'{cpu:.0%}'} | {'—' if c.direct or c.rss_kb is None else f'{c.rss_kb / 1024:.0f} MB'} | "
            f"{sum(r.errors for r in runs)} |"
        )
    if p.fallback:
        lines += [
            "",
            "Note: this lean engine rejects `--set fault_passthrough=false` as an unknown option (exit 2; it checks "
            "option names against mitmproxy's addons and the faultproxy addon's own `load()`, not the control plane's "
            "`fault_*` options), so the intercepted configuration sets mitmproxy's `allow_hosts=.` instead: every "
            "host intercepted, which is what `fault_passthrough=false` leaves in force. The run tries the real option "
            "first and uses it once the engine accepts it.",
        ]
    return "\n".join(lines)


def passthrough_section(p: Passthrough) -> list[str]:
    return [
        f"## Passthrough: HTTPS to a host no rule targets, regular mode ({p.rounds} interleaved rounds of {p.seconds:g} s)",
        "",
        f"`faultproxy run --mode regular` (lean engine) with a profile whose 5 rules all match `host: {p.targeted}`; "
        "requests go to an untargeted loopback TLS origin (faultproxy.testing.tls.TlsRelay, in its own process, "
        "in front of nginx) through `CONNECT 127.0.0.1:PORT`, with `fault_passthrough` on (the default: the "
        "tunnel is not intercepted, mitmproxy only relays bytes) and off (mitmproxy terminates TLS and parses "
        "HTTP); plain-HTTP absolute-form requests to nginx for reference. \"tunnel intercepted\" compares the "
        "certificate the client sees with the origin's. Load generator: a Python asyncio client in this process "
        f"({p.conns} concurrent keep-alive connections, one CONNECT + TLS handshake each, then back-to-back GETs "
        "inside the tunnel until the run's time is up; latency per request, handshakes not counted), because wrk "
        "and h2load cannot tunnel through CONNECT. The client is itself Python and shares the machine's "
        f"{os.cpu_count()} CPUs with the proxy, nginx and the relay: the first row is its ceiling without a proxy.",
        "",
        passthrough_table(p),
        "",
    ]


# --------------------------------------------------------------------------------------------------
# Targets


def targets(t: Throughput, s: Sse, a: Accuracy) -> str:
    def ok(b: bool) -> str:
        return "met" if b else "NOT met"

    lines = ["| target | measured | |", "|---|---|---|"]
    for proto in ("HTTP/1.1", "HTTP/2 (TLS)"):
        r = t.ratios[f"{proto} | faultproxy run, 20 rules, no match"]
        lines.append(f"| faultproxy run >= 1.8x plain mitmdump, {proto} | {r:.2f}x | {ok(r >= 1.8)} |")
    r = t.ratios[f"{H2_H2} | faultproxy run, 20 rules, no match"]
    lines.append(f"| (no target; informational) faultproxy run vs plain mitmdump, {H2_H2} | {r:.2f}x | — |")
    for proto in ("HTTP/1.1", "HTTP/2 (TLS)"):
        r = t.ratios[f"{proto} | mitmdump -s addons/faultproxy.py, 20 rules, no match"]
        lines.append(f"| mitmdump -s faultproxy, 20 non-matching rules >= 0.95x plain mitmdump, {proto} | {r:.2f}x | {ok(r >= 0.95)} |")
    lean = s.runs.get("faultproxy run")
    if lean:
        p99 = lean.lateness(0.99)
        lines.append(f"| 1,000 faulted SSE streams: timer lateness p99 <= 50 ms (faultproxy run) | {p99:.1f} ms | {ok(p99 <= 50)} |")
        lines.append(
            f"| <= 60 KB RSS per plain (non-TLS) stream (faultproxy run, faulted) | {lean.rss_per_stream_kb:.1f} KB | "
            f"{ok(lean.rss_per_stream_kb <= 60)} |"
        )
    for th in a.throttle:
        lines.append(f"| throttle {th.label} within 5% | {th.error:+.2%} | {ok(abs(th.error) <= 0.05)} |")
    added = a.added
    lines.append(
        f"| delay {a.delay_ms} ms, {a.requests} concurrent: every added latency within {a.delay_ms} ± 30 ms | "
        f"{added[0]:.1f}–{added[-1]:.1f} ms | {ok(all(abs(x - a.delay_ms) <= 30 for x in added))} |"
    )
    return "\n".join(lines)


def targets_section(t: Throughput, s: Sse, a: Accuracy) -> list[str]:
    return ["## Targets", "", targets(t, s, a), ""]
