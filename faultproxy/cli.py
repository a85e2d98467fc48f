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


def build_mitmdump_args(args: argparse.Namespace, upstream: str | None) -> list[str]:
    cmd = ["-s", _script_path(), "--listen-host", args.host, "--listen-port", str(args.port)]
    if args.mode:
        cmd += ["--mode", args.mode]
    elif upstream:
        cmd += ["--mode", f"reverse:{upstream}"]
    for p in args.profiles:
        cmd += ["--set", f"fault_profile={p}"]
    cmd += ["--set", f"fault_time_scale={args.time_scale}"]
    if args.seed is not None:
        cmd += ["--set", f"fault_seed={args.seed}"]
    if args.log:
        cmd += ["--set", f"fault_log={args.log}"]
    if args.dry_run:
        cmd += ["--set", "fault_dry_run=true"]
    return cmd


def cmd_run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    if not args.upstream and not args.mode and not args.builtin_origin:
        print("faultproxy run: give --upstream URL, --builtin-origin, or --mode MODE", file=sys.stderr)
        return 2
    if not args.time_scale > 0:
        print(f"faultproxy run: --time-scale: expected a number above 0, got {args.time_scale}", file=sys.stderr)
        return 2
    _, errors = _validate_all(args.profiles)
    if errors:
        return 1
    origin_server = None
    upstream = args.upstream
    if args.builtin_origin:
        from .testing.origin import OriginServer

        origin_server = OriginServer(host="127.0.0.1", port=0)
        origin_server.start()
        upstream = origin_server.url
        print(f"built-in SSE origin on {upstream} (try {{proxy}}/events?count=20&interval=0.5)")
    argv = mitmdump_command() + build_mitmdump_args(args, upstream) + extra
    scheme = "http"
    print(f"faultproxy listening on {scheme}://{args.host}:{args.port} -> {upstream or args.mode}", flush=True)
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return 130
    finally:
        if origin_server is not None:
            origin_server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faultproxy",
        description="A fault-injecting proxy for long-lived HTTP streams, built on mitmproxy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy with profiles (mitmdump underneath)")
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
    run.epilog = "Arguments after a lone -- go to mitmdump unchanged."
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
