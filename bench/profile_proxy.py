"""Profile a proxy under load: where each request's CPU time goes (cProfile), and faultproxy's hot paths.

    python bench/profile_proxy.py                  # lean engine and mitmdump -s, 20 non-matching rules
    python bench/profile_proxy.py --engine lean --profile delay0 --seconds 8

For each engine it starts nginx and the proxy under cProfile, drives it with wrk (HTTP/1.1) for a fixed
time, stops it with SIGINT and prints: requests served, profiled CPU per request, the share spent in
mitmproxy's hook dispatch (AddonManager.trigger_event and below) and in faultproxy's own code, and the
top functions by own time. cProfile slows everything down several times, so read shares and per-request
costs relative to each other, not as throughput.

`--micro` also times faultproxy's per-request matching directly (FaultProxy.requestheaders on a flow no
rule matches / one that matches a delay: 0 rule), without mitmproxy around it.

`--dispatch` measures what `mitmdump -s addons/faultproxy.py` adds to mitmdump's hook dispatch, without
sockets (so without most of the machine's noise): mitmdump's addon set (DumpMaster) in this process,
the four hooks of a request (requestheaders, request, responseheaders, response, each followed by
mitmproxy's `update`) on 3,000 test flows, CPU time per request, best of 5 -- plain, with an empty
script, with faultproxy and no profile, with faultproxy and the 20 non-matching rules.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs as bench

ROOT = bench.ROOT


# cProfile on CPU time (process_time), not wall time: on a busy machine wall time charges other
# processes' turns to whatever function was running.
_WRAPPER = """
import cProfile, runpy, signal, sys, time
out, target = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
prof = cProfile.Profile(time.process_time)
signal.signal(signal.SIGRTMIN + 3, lambda *_: prof.enable())  # only the loaded phase, not start-up (mitmproxy takes SIGUSR1/2)
signal.signal(signal.SIGRTMIN + 4, lambda *_: (prof.disable(), prof.dump_stats(out)))
try:
    if target.endswith("mitmdump"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
"""


def profile_engine(
    engine: str, profile: Path, nginx: bench.Nginx, confdir: Path, work: Path, seconds: float, h2: bool = False
) -> str:
    port = bench.free_port()
    out = work / f"{engine}.prof"
    common = ["--mode", f"reverse:{nginx.url}", "--listen-host", "127.0.0.1", "--listen-port", str(port),
              "--set", f"confdir={confdir}", "--set", f"fault_profile={profile}"]  # fmt: skip
    if engine == "lean":
        cmd = [bench.PY, "-c", _WRAPPER, str(out), "faultproxy.lean", *common]
    else:
        cmd = [bench.PY, "-c", _WRAPPER, str(out), bench.MITMDUMP[0], "-s", str(bench.ADDON_SCRIPT), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    try:
        bench.wait_http(f"http://127.0.0.1:{port}/", proc=proc)
        subprocess.run(["wrk", "-t1", "-c10", "-d1s", f"http://127.0.0.1:{port}/"], capture_output=True)  # warm up
        proc.send_signal(signal.SIGRTMIN + 3)
        time.sleep(0.2)
        if h2:
            res = subprocess.run(["h2load", "-c4", "-m4", "-D", str(round(seconds)), f"https://127.0.0.1:{port}/"],
                                 capture_output=True, text=True).stdout  # fmt: skip
            total = int(res.split("requests: ")[1].split(" total")[0])
        else:
            res = subprocess.run(["wrk", "-t1", "-c10", f"-d{round(seconds)}s", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True).stdout  # fmt: skip
            total = int(res.split(" requests in ")[0].split()[-1])
        proc.send_signal(signal.SIGRTMIN + 4)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    st = pstats.Stats(str(out))
    raw = st.stats  # type: ignore[attr-defined]
    total_tt = sum(v[2] for v in raw.values())

    def cum(pred) -> float:  # type: ignore[no-untyped-def]
        return max((v[3] for k, v in raw.items() if pred(k)), default=0.0)

    dispatch = cum(lambda k: k[0].endswith("addonmanager.py") and k[2] == "handle_lifecycle")
    own = sum(
        v[2] for k, v in raw.items() if "/faultproxy/" in k[0] and "/testing/" not in k[0] and not k[0].endswith(("lean.py", "_mitm/dispatch.py"))
    )
    buf = io.StringIO()
    pstats.Stats(str(out), stream=buf).sort_stats("tottime").print_stats(12)
    top = "\n".join(line for line in buf.getvalue().splitlines() if line.strip() and ("{" in line or "/" in line))
    return (
        f"### {engine}, {'HTTP/2 over TLS (h2load -c4 -m4)' if h2 else 'HTTP/1.1 (wrk -c10)'}: "
        f"{total} requests in {seconds:g} s under cProfile\n\n"
        f"- profiled CPU per request: {total_tt / total * 1e6:,.0f} µs\n"
        f"- hook dispatch (AddonManager.handle_lifecycle, cumulative): {dispatch / total * 1e6:,.0f} µs/request "
        f"({dispatch / total_tt:.0%} of all)\n"
        f"- faultproxy's own code (own time, the lean master's dispatch not counted): "
        f"{own / total * 1e6:,.1f} µs/request ({own / total_tt:.1%})\n\n"
        f"```\n{top}\n```\n"
    )


def micro(profiles: list[Path], n: int = 20000) -> str:
    """Time FaultProxy.requestheaders (+ request + responseheaders + response) per flow, outside mitmproxy."""
    from mitmproxy.test import taddons, tflow

    from faultproxy.addon import FaultProxy

    lines = []

    async def go() -> None:
        for profile in profiles:
            addon = FaultProxy()
            with taddons.context(addon) as tctx:
                tctx.configure(addon, fault_profile=[str(profile)])
                flows = [tflow.tflow(resp=True) for _ in range(n)]
                t0 = time.process_time()
                for f in flows:
                    addon.requestheaders(f)
                t1 = time.process_time()
                for f in flows:
                    for hook in (addon.request, addon.responseheaders):
                        if (pending := hook(f)) is not None:  # plain functions that may return a coroutine
                            await pending
                    addon.response(f)
                t2 = time.process_time()
            lines.append(
                f"- {profile.stem}: requestheaders {(t1 - t0) / n * 1e6:.2f} µs/flow; "
                f"request+responseheaders+response {(t2 - t1) / n * 1e6:.2f} µs/flow"
            )

    asyncio.run(go())
    return "\n".join(lines)


def dispatch(profile: Path, work: Path, n: int = 3000, reps: int = 5) -> str:
    from mitmproxy import options
    from mitmproxy.proxy.layers import http as layers_http
    from mitmproxy.test import tflow
    from mitmproxy.tools.dump import DumpMaster

    empty = work / "empty_script.py"
    empty.write_text("")
    per_request = [layers_http.HttpRequestHeadersHook, layers_http.HttpRequestHook,
                   layers_http.HttpResponseHeadersHook, layers_http.HttpResponseHook]  # fmt: skip

    async def measure(script: Path | None, fault_profile: Path | None) -> list[float]:
        m = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        if script is not None:
            m.options.update(scripts=[str(script)])
            deadline = time.monotonic() + 10
            while script == bench.ADDON_SCRIPT and "fault_profile" not in m.options and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # mitmproxy loads scripts in a task
            if fault_profile is not None:
                m.options.update(fault_profile=[str(fault_profile)])
        flows = [tflow.tflow(resp=True) for _ in range(n)]
        runs = []
        for _ in range(reps):
            t0 = time.process_time()
            for f in flows:
                for hook in per_request:
                    await m.addons.handle_lifecycle(hook(f))
            runs.append((time.process_time() - t0) / n * 1e6)
        m.shutdown()
        return runs

    async def go() -> list[str]:
        rows = []
        base = None
        for label, script, prof in [
            ("plain mitmdump", None, None),
            ("mitmdump -s <empty script>", empty, None),
            ("mitmdump -s addons/faultproxy.py, no profile", bench.ADDON_SCRIPT, None),
            ("mitmdump -s addons/faultproxy.py, 20 rules, no match", bench.ADDON_SCRIPT, profile),
        ]:
            best = min(await measure(script, prof))
            base = base if base is not None else best
            rows.append(f"| {label} | {best:,.1f} | +{best - base:,.1f} |")
        return rows

    head = ["| addon set | hook dispatch, CPU µs per request (best of 5) | added |", "|---|---|---|"]
    return "\n".join(head + asyncio.run(go()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["lean", "mitmdump"], action="append")
    ap.add_argument("--profile", choices=["nomatch20", "delay0"], default="nomatch20")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--h2", action="store_true", help="load with h2load over TLS instead of wrk")
    ap.add_argument("--micro-only", action="store_true")
    ap.add_argument("--dispatch", action="store_true", help="only the hook-dispatch table (no sockets)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="faultproxy-prof-"))
    rules = bench.nomatch_rules()
    if args.profile == "delay0":
        rules.append({"name": "all-delay-0", "faults": [{"type": "delay", "time": "0s"}]})
    profile = bench.write_profile(work / f"{args.profile}.yaml", args.profile, rules)
    if args.dispatch:
        print(dispatch(profile, work))
        return 0
    nginx = bench.Nginx(work, {})
    try:
        confdir = work / "confdir"
        for engine in [] if args.micro_only else args.engine or ["lean", "mitmdump"]:
            print(profile_engine(engine, profile, nginx, confdir, work, args.seconds, args.h2), flush=True)
        if args.micro or args.micro_only:
            d0 = bench.write_profile(work / "delay0.yaml", "delay0",
                                     [*bench.nomatch_rules(), {"name": "all-delay-0", "faults": [{"type": "delay", "time": "0s"}]}])
            print(micro([work / "nomatch20.yaml" if args.profile == "nomatch20" else profile, d0]))
    finally:
        nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
