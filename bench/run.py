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

This file is the command line: it runs the scenarios, prints their tables and writes bench/RESULTS.md.
The rest is in its sibling modules:

    procs.py      process and port utilities, the nginx origin, the proxies under test and their profiles
    loadgen.py    the load generators (wrk, h2load, SSE, throttle/delay and CONNECT clients) and the
                  servers that run in processes of their own (the SSE origin, the TLS relay)
    scenarios.py  each scenario: starts what it needs, measures, returns the numbers
    tables.py     the markdown tables and text for each scenario's numbers, and the targets summary
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import loadgen
import scenarios
import tables
from procs import ROOT, Nginx


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] in (["--sse-origin"], ["--tls-relay"]):
        return loadgen.main(args_in)  # the servers used to be started as `run.py --sse-origin ...`
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

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="faultproxy-bench-"))
    confdir = work / "confdir"
    out: list[str] = []
    nginx: Nginx | None = None
    try:
        nginx = scenarios.prepare(work, confdir, throttle_seconds)
        out += tables.header(argv if argv is not None else sys.argv[1:])
        throughput: scenarios.Throughput | None = None
        sse: scenarios.Sse | None = None
        accuracy: scenarios.Accuracy | None = None
        if "throughput" in parts:
            throughput = scenarios.throughput(work, nginx, confdir, rounds, seconds)
            out += tables.throughput_section(throughput)
        if "sse" in parts:
            sse = scenarios.sse(work, confdir, streams, ramp=2.0)
            out += tables.sse_section(sse)
        if "accuracy" in parts:
            accuracy = scenarios.accuracy(work, nginx, confdir, throttle_seconds)
            out += tables.accuracy_section(accuracy)
        if "passthrough" in parts:
            out += tables.passthrough_section(scenarios.passthrough(work, nginx, confdir, rounds, pt_seconds))
        if throughput is not None and sse is not None and accuracy is not None:
            out += tables.targets_section(throughput, sse, accuracy)
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
