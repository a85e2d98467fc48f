"""The `faultproxy` command: run a fault proxy, validate profiles, list them, print the schema.

argparse (standard library) parses the command line: it gives subcommands, `--help`, and a `--`
pass-through for extra mitmdump arguments without another dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from .errors import ProfileError
from .profile import json_schema, load_profile, shipped_profiles


def _script_path() -> str:
    return str(Path(__file__).resolve().parent / "_script.py")


def mitmdump_command() -> list[str]:
    """mitmdump from the same environment as this Python (a venv's bin/ or the interpreter itself)."""
    exe = Path(sys.executable).parent / "mitmdump"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


def _validate_all(refs: list[str]) -> tuple[list[str], int]:
    """Load every profile; print each problem; return (lines for valid ones, number of errors)."""
    ok_lines: list[str] = []
    errors = 0
    for ref in refs:
        try:
            profile = load_profile(ref)
        except ProfileError as e:
            for issue in e.issues:
                print(issue, file=sys.stderr)
            errors += len(e.issues)
        else:
            ok_lines.append(f"ok: {profile.source} ({profile.name}, {len(profile.rules)} rules)")
    return ok_lines, errors


def cmd_validate(args: argparse.Namespace) -> int:
    ok_lines, errors = _validate_all(args.files)
    for line in ok_lines:
        print(line)
    if errors:
        print(f"{errors} error(s)", file=sys.stderr)
        return 1
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    shipped = shipped_profiles()
    if not shipped:
        print("no shipped profiles found")
        return 0
    width = max(len(n) for n in shipped)
    for name, path in shipped.items():
        try:
            profile = load_profile(path)
            desc = " ".join(profile.description.split())
        except ProfileError as e:
            desc = f"INVALID: {e.issues[0]}"
        lines = textwrap.wrap(desc, 100 - width) or [""]
        print(f"{name.ljust(width)}  {lines[0]}")
        for more in lines[1:]:
            print(f"{' ' * width}  {more}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_origin(args: argparse.Namespace) -> int:
    from .testing import origin

    return origin.main(["--host", args.host, "--port", str(args.port)]) or 0


def run_settings(args: argparse.Namespace, upstream: str | None) -> tuple[list[str], list[str]]:
    """(modes, NAME=VALUE option settings) for a `faultproxy run`, shared by both engines."""
    modes = [args.mode] if args.mode else [f"reverse:{upstream}"] if upstream else []
    specs = [f"fault_profile={p}" for p in args.profiles]
    specs.append(f"fault_time_scale={args.time_scale}")
    if args.seed is not None:
        specs.append(f"fault_seed={args.seed}")
    if args.log:
        specs.append(f"fault_log={args.log}")
    if args.dry_run:
        specs.append("fault_dry_run=true")
    if args.save:
        specs.append(f"save_stream_file={args.save}")
    if args.upstream_auth:
        specs.append(f"upstream_auth={args.upstream_auth}")
    if args.client_certs:
        specs.append(f"client_certs={args.client_certs}")
    specs += args.set
    return modes, specs


def build_mitmdump_args(args: argparse.Namespace, upstream: str | None) -> list[str]:
    """mitmdump's arguments for `faultproxy run --full` (the extra arguments after `--` not included)."""
    modes, specs = run_settings(args, upstream)
    cmd = ["-s", _script_path(), "--listen-host", args.host, "--listen-port", str(args.port)]
    for mode in modes:
        cmd += ["--mode", mode]
    for spec in specs:
        cmd += ["--set", spec]
    return cmd


def _run_full(argv: list[str]) -> int:
    """mitmdump as a child; Ctrl-C and SIGTERM are passed on to it, and it gets 10 s to finish."""
    import time

    proc = subprocess.Popen(argv)
    stop_at: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + 10)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if stop_at and time.monotonic() > stop_at[0]:
                    proc.kill()  # seen: mitmdump taking > 10 s to exit after many connections closed
                    proc.wait()
                    return 1
                continue
            return 0 if stop_at and code in (0, -signal.SIGINT, -signal.SIGTERM) else code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run_lean(args: argparse.Namespace, upstream: str | None, extra: list[str]) -> int:
    import asyncio

    from . import lean

    modes, specs = run_settings(args, upstream)
    parser = lean.build_parser()
    more, leftover = parser.parse_known_args(extra)
    if leftover:
        print(
            f"faultproxy run: the lean engine does not take the mitmdump argument(s) {' '.join(leftover)}; "
            "it takes -s, --mode, --set, -q, -v after --. Use --full to run mitmdump with everything.",
            file=sys.stderr,
        )
        return 2
    specs += more.setoptions
    if more.quiet:
        specs.append("termlog_verbosity=error")
    elif more.verbose:
        specs.append("termlog_verbosity=debug")
    return asyncio.run(
        lean.run_lean(
            specs,
            modes=more.mode or modes,
            listen_host=more.listen_host or args.host,
            listen_port=more.listen_port if more.listen_port is not None else args.port,
            scripts=more.scripts,
        )
    )


def cmd_run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not args.upstream and not args.mode and not args.builtin_origin:
        print("faultproxy run: give --upstream URL, --builtin-origin, or --mode MODE", file=sys.stderr)
        return 2
    if not args.time_scale > 0:
        print(f"faultproxy run: --time-scale: expected a number above 0, got {args.time_scale}", file=sys.stderr)
        return 2
    for spec in args.set:
        if "=" not in spec:
            print(f"faultproxy run: --set: expected NAME=VALUE, got {spec!r}", file=sys.stderr)
            return 2
    _, errors = _validate_all(args.profiles)
    if errors:
        return 1
    origin_server = None
    upstream = args.upstream
    try:
        if args.builtin_origin:
            from .testing.origin import OriginServer

            origin_server = OriginServer(host="127.0.0.1", port=0)
            origin_server.start_in_thread()
            upstream = origin_server.url
            print(
                f"built-in SSE origin on {upstream}; try: curl -N 'http://{args.host}:{args.port}/events?count=20&interval=0.5'"
            )
        engine = "mitmdump" if args.full else "lean engine"
        print(f"faultproxy ({engine}) listening on http://{args.host}:{args.port} -> {upstream or args.mode}", flush=True)
        if args.full:
            return _run_full(mitmdump_command() + build_mitmdump_args(args, upstream) + extra)
        return _run_lean(args, upstream, extra)
    finally:
        if origin_server is not None:
            origin_server.stop_in_thread()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faultproxy",
        description="A fault-injecting proxy for long-lived HTTP streams, built on mitmproxy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy with profiles (lean mitmproxy engine; --full: mitmdump)")
    run.add_argument("profiles", nargs="*", metavar="PROFILE", help="profile path or shipped name; several stack")
    run.add_argument("--upstream", help="origin URL for reverse-proxy mode, e.g. http://127.0.0.1:8080")
    run.add_argument("--builtin-origin", action="store_true", help="start the built-in SSE origin and proxy to it")
    run.add_argument("--mode", help="mitmproxy mode instead of reverse, e.g. regular or upstream:http://proxy:3128")
    run.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    run.add_argument("--time-scale", type=float, default=1.0, help="multiply every profile duration (default 1)")
    run.add_argument("--seed", type=int, help="seed for probability, first/every and jitter")
    run.add_argument("--log", help="write the fault journal as JSON lines to this file")
    run.add_argument("--dry-run", action="store_true", help="match and journal, inject nothing")
    run.add_argument(
        "--full", action="store_true", help="run mitmdump with all its addons instead of the lean engine"
    )
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a mitmproxy option; repeatable")
    run.add_argument("--save", metavar="FILE", help="save flows to FILE (mitmproxy's save_stream_file)")
    run.add_argument("--upstream-auth", metavar="USER:PASS", help="proxy auth for upstream mode (upstream_auth)")
    run.add_argument("--client-certs", metavar="PATH", help="client certificate(s) for the upstream (client_certs)")
    run.epilog = (
        "Arguments after a lone -- go to mitmdump unchanged with --full; the lean engine takes "
        "-s SCRIPT, --set NAME=VALUE, --mode, -q and -v there."
    )
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check profiles; exit 1 on any error")
    val.add_argument("files", nargs="+", metavar="FILE")
    val.set_defaults(func=cmd_validate)

    prof = sub.add_parser("profiles", help="list the shipped profiles")
    prof.set_defaults(func=cmd_profiles)

    schema = sub.add_parser("schema", help="print the JSON Schema of the profile format")
    schema.set_defaults(func=cmd_schema)

    origin = sub.add_parser("origin", help="run the built-in SSE origin")
    origin.add_argument("--host", default="127.0.0.1")
    origin.add_argument("--port", type=int, default=8000)
    origin.set_defaults(func=cmd_origin)

    from . import demo as _demo  # imports the origin and the profile loader only; the proxy starts in run()

    demo = sub.add_parser("demo", help="the browser demo: naive vs resilient SSE client through live faults")
    _demo.build_parser(demo)
    demo.set_defaults(func=lambda args: _demo.run(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split off mitmdump's arguments ourselves: argparse's REMAINDER after a variable number of
    # positionals swallows our own options too.
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `faultproxy schema | head`: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
