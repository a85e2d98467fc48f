"""The lean engine: a mitmproxy master with only what a fault proxy needs.

`mitmdump` loads about 40 addons, and mitmproxy calls every one of them for every hook of every flow
(plus an `update` hook after each flow hook, and an `add_log` hook for every log record, debug ones
included). For a fault proxy that is most of the cost of a request. This master loads:

  always   core (option checks), block (refuses non-local clients when listening on all
           interfaces, as mitmdump does), proxyserver (the servers), next_layer (protocol
           detection), tlsconfig (TLS and the CA), disable_h2c (strips h2c upgrades, which
           mitmproxy cannot proxy), errorcheck (startup errors end the run), termlog (the log),
           and faultproxy's own addon
  reverse  update_alt_svc (keeps Alt-Svc pointing at the proxy)
  on use   any other built-in addon whose option is given (`--set NAME=VALUE`): save_stream_file
           loads flow saving, upstream_auth upstream authentication, proxyauth proxy
           authentication, modify_headers header rewriting, scripts (-s) the script loader, and so
           on (see `option_addons()`); client certificates (`client_certs`) are handled by
           tlsconfig, which is always there.

Besides loading less, it (1) looks each hook's methods up once instead of walking every addon for
every event (`cache_hook_dispatch`), (2) does not forward log records to the deprecated `add_log`
hook (no addon here uses it), (3) keeps the root logger at the terminal's verbosity so debug records
are not even built, and (4) freezes the start-up heap and collects garbage less often, so a full
collection does not stall a thousand streams' timers for a quarter of a second. The dispatch cache and
the hook handler touch mitmproxy internals (AddonManager._iter_hooks/chain/lookup,
ProxyConnectionHandler.handle_hook, Master._legacy_log_events), so they live in
faultproxy._mitm.dispatch with the other internals.

Left out unless asked for: printing every flow (mitmdump's dumper: `--set flow_detail=1`), the
mitm.it onboarding page (`--set onboarding=true`), DNS mode, and mitmproxy's interactive commands.
`faultproxy run --full` runs mitmdump itself with everything.

Run it with `faultproxy run` (in-process), or `python -m faultproxy.lean` with a mitmdump-like
subset of arguments (-s, --mode, --listen-host, --listen-port, --set, -q, -v), which is what the
test harness uses for `engine="lean"`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mitmproxy import addons as mitm_addons
from mitmproxy import exceptions, master, options
from mitmproxy.addons import dumper, errorcheck, keepserving, readfile

from . import _mitm
from .addon import FaultProxy

log = logging.getLogger("faultproxy")

# Names (addon `name` or lower-case class name) of the built-in addons always loaded, in mitmdump's order.
ALWAYS = ("core", "block", "proxyserver", "nextlayer", "tlsconfig", "disableh2c")
REVERSE_ONLY = ("updatealtsvc",)
# The fault addon goes where mitmdump's script loader sits (scripts run before mapremote, save, ...).
_SCRIPT_SLOT = "scriptloader"

# Garbage collector thresholds of the lean engine (see run_lean).
GC_THRESHOLDS = (50_000, 20, 100)

# mitmdump's own logger levels (mitmproxy.tools.main.run), so the lean engine logs what mitmdump logs.
_QUIET_LOGGERS = {"tornado": logging.WARNING, "asyncio": logging.WARNING, "hpack": logging.WARNING, "quic": logging.WARNING}


def _addon_name(addon: Any) -> str:
    return getattr(addon, "name", type(addon).__name__.lower())


def _all_builtin_addons() -> list[Any]:
    """Fresh instances of every addon mitmdump loads, in mitmdump's order (errorcheck aside)."""
    return [*mitm_addons.default_addons(), dumper.Dumper(), keepserving.KeepServing(), readfile.ReadFileStdin()]


class _OptionRecorder:
    """Stands in for mitmproxy's addon Loader: records the options an addon declares, nothing else."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add_option(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.names.append(name)

    def add_command(self, *args: Any, **kwargs: Any) -> None:
        pass


def _declared_by(addon: Any) -> list[str]:
    """Options an addon declares (FaultProxy's include its control plane's: its load() adds them)."""
    rec = _OptionRecorder()
    try:
        if hasattr(addon, "load"):
            addon.load(rec)
    except Exception:  # an addon whose load needs a master: it cannot be added on use
        return []
    return rec.names


def option_addons() -> dict[str, str]:
    """Option name -> name of the built-in addon that declares it (every addon mitmdump loads)."""
    found: dict[str, str] = {}
    for addon in _all_builtin_addons():
        if hasattr(addon, "load"):
            for opt in _declared_by(addon):
                found.setdefault(opt, _addon_name(addon))
    return found


def _spec_name(spec: str) -> str:
    return spec.split("=", 1)[0]


class LeanMaster(master.Master):
    """A mitmproxy Master with the lean addon set (see the module docstring). Create it inside a running loop."""

    def __init__(
        self,
        opts: options.Options,
        *,
        fault_addon: Any = None,
        extra: Iterable[str] = (),
        reverse: bool = True,
        with_termlog: bool = True,
    ) -> None:
        super().__init__(opts, with_termlog=with_termlog)
        # mitmproxy re-emits every log record as a deprecated `add_log` hook across all addons; nothing
        # here implements it, and it costs a formatted record plus a chain walk per log line.
        _mitm.stop_legacy_log_events(self)
        _mitm.cache_hook_dispatch(self.addons)
        _mitm.install_lean_hook_handler()
        wanted = set(ALWAYS) | set(extra) | (set(REVERSE_ONLY) if reverse else set())
        self.fault_addon = fault_addon if fault_addon is not None else FaultProxy()
        chain: list[Any] = []
        for addon in _all_builtin_addons():
            name = _addon_name(addon)
            if name == _SCRIPT_SLOT:
                chain.append(self.fault_addon)
            if name in wanted:
                chain.append(addon)
        self.addons.add(*chain)
        self.addons.add(errorcheck.ErrorCheck())

    @property
    def loaded(self) -> list[str]:
        return [_addon_name(a) for a in self.addons.chain]


def addons_for(specs: Sequence[str], modes: Sequence[str]) -> tuple[set[str], list[str]]:
    """Which optional addons the `NAME=VALUE` specs need, and the names that no addon declares."""
    declared = option_addons()
    known = set(options.Options().keys()) | set(_declared_by(FaultProxy())) | {"termlog_verbosity"}
    extra: set[str] = set()
    unknown: list[str] = []
    for spec in specs:
        name = _spec_name(spec)
        if name in declared:
            extra.add(declared[name])
        elif name not in known:
            unknown.append(name)
    if any(m.startswith("dns") for m in modes):
        extra.update({"dnsresolver", "stripdnshttpsrecords"})
    return extra - set(ALWAYS), unknown


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _configure_logging(verbosity: str) -> None:
    root = logging.getLogger()
    # mitmdump sets the root logger to DEBUG and lets termlog filter; building every debug record costs
    # per connection, so the lean engine builds only what the terminal shows.
    root.setLevel(logging.DEBUG if verbosity == "debug" else logging.INFO)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


async def run_lean(
    settings: Sequence[str],
    *,
    modes: Sequence[str] = (),
    listen_host: str | None = None,
    listen_port: int | None = None,
    scripts: Sequence[str] = (),
    on_master: Callable[[LeanMaster], None] | None = None,
) -> int:
    """Run the lean engine until SIGINT/SIGTERM (or `master.shutdown()`); returns an exit code.

    `settings` are `NAME=VALUE` strings as for mitmdump's `--set`. Option errors are printed as one
    line on stderr (exit 2); errors while starting (port in use, bad mode) exit 1, as in mitmdump.
    """
    specs = list(settings)
    if scripts:
        specs += [f"scripts={s}" for s in scripts]
    extra, unknown = addons_for(specs, modes)
    if unknown and not scripts:  # options of a script are declared only when it loads
        print(
            f"faultproxy: unknown mitmproxy option(s): {', '.join(unknown)} (see `mitmdump --options`)",
            file=sys.stderr,
        )
        return 2
    verbosity = "info"
    for spec in specs:
        if _spec_name(spec) == "termlog_verbosity":
            verbosity = spec.split("=", 1)[1] if "=" in spec else verbosity
    _configure_logging(verbosity)

    opts = options.Options()
    reverse = not modes or any(m.startswith("reverse") for m in modes)
    # Addons report bad option values either by raising OptionsError or (faultproxy's addon, so that
    # mitmdump shows no traceback) by logging an error; both are option errors here.
    errors = _ErrorRecords()
    logging.getLogger().addHandler(errors)
    try:
        m = LeanMaster(opts, extra=extra, reverse=reverse)
        update: dict[str, Any] = {}
        if modes:
            update["mode"] = list(modes)
        if listen_host is not None:
            update["listen_host"] = listen_host
        if listen_port is not None:
            update["listen_port"] = listen_port
        opts.update(**update)
        opts.set(*specs, defer=bool(scripts))
    except exceptions.OptionsError as e:
        errors.messages.append(str(e))
    finally:
        logging.getLogger().removeHandler(errors)
    if errors.messages:
        for message in errors.messages:
            print(f"faultproxy: {message}", file=sys.stderr)
        return 2
    log.info("faultproxy: lean engine; addons: %s", ", ".join(m.loaded))
    if on_master is not None:
        on_master(m)

    loop = asyncio.get_running_loop()
    stops = 0

    def _stop(*_: Any) -> None:
        nonlocal stops
        stops += 1
        if stops == 1:
            m.shutdown()
        else:  # a second Ctrl-C: the user does not want to wait for connections to wind down
            os._exit(130)

    installed: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, _stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    if installed and hasattr(signal, "SIGPIPE"):  # a closed client socket must not kill us
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Python 3.12.1's asyncio logs "Exception in callback ... CancelledError" for every client
    # connection still open when asyncio.run cancels the remaining tasks at exit; they are just
    # connections being closed. (Master.run swaps in its own handler while it runs.)
    loop.set_exception_handler(_ignore_cancelled)
    # Everything made so far (modules, mitmproxy's and pydantic's tables, the compiled profiles) lives
    # as long as the process: keep it out of the garbage collector's full collections, which otherwise
    # walk it again and again while connections are being opened, stalling every stream's timers.
    # Then collect less often: with a thousand live streams a full collection walks every object of
    # every connection (0.2-0.4 s here, measured), during which no stream's timer fires. Young
    # collections still reclaim short-lived cycles; the default (700, 10, 10) is tuned for small heaps.
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        await m.run()
    except SystemExit as e:  # errorcheck: "Error logged during startup, exiting..."
        return e.code if isinstance(e.code, int) else 1
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return 0


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m faultproxy.lean",
        description="faultproxy's lean engine with a mitmdump-like subset of arguments.",
    )
    p.add_argument("-s", "--scripts", action="append", default=[], metavar="SCRIPT", help="an extra addon script")
    p.add_argument("--mode", "-m", action="append", default=[], help="mitmproxy mode, e.g. reverse:http://host:port")
    p.add_argument("--listen-host", default=None)
    p.add_argument("--listen-port", "-p", type=int, default=None)
    p.add_argument("--set", dest="setoptions", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specs = list(args.setoptions)
    if args.quiet:
        specs.append("termlog_verbosity=error")
    elif args.verbose:
        specs.append("termlog_verbosity=debug")
    try:
        return asyncio.run(
            run_lean(
                specs,
                modes=args.mode,
                listen_host=args.listen_host,
                listen_port=args.listen_port,
                scripts=args.scripts,
            )
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
