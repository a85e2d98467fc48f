"""Start and stop a real faultproxy (a ``mitmdump`` subprocess) for tests.

A subprocess, not an in-process master, because mitmproxy allows one master per process (connection handlers
read the global ``ctx.master``) and because what a user runs is ``mitmdump -s ...``: the test exercises the
same startup, option parsing and shutdown.

How the port is learned: ``--listen-port 0`` lets the kernel pick a free port atomically at bind time, and a
tiny readiness addon (generated into the work dir, loaded after the fault addon) prints the addresses the
proxyserver really bound, from its ``running`` hook. That is more robust than either alternative:

* picking a free port ourselves and passing it has a window in which another process (a parallel test
  worker) can take the port, and "it accepts connections" is not "it started": the kernel completes a TCP
  handshake on a listening socket before mitmproxy's loop has done anything;
* parsing mitmproxy's ``... listening at HOST:PORT.`` log line depends on its wording and on termlog
  verbosity, and the line is printed *before* mitmproxy checks for startup errors — a script that failed to
  load still prints it, then exits with "Error logged during startup".

The ``running`` hook fires only after mitmproxy's startup error checks passed, so the marker means "serving".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from faultproxy.control.client import Control

__all__ = [
    "DEFAULT_SCRIPT",
    "ProfileSpec",
    "ProxyCrashed",
    "ProxyProcess",
    "ProxyStartError",
    "mitmdump_command",
]

# The fault addon entry script. Computed from this file's location rather than ``faultproxy.__file__`` so it
# works before the package has an ``__init__`` and without importing the package's heavier modules.
DEFAULT_SCRIPT = Path(__file__).resolve().parent.parent / "_script.py"

ProfileSpec: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any]"
"""A profile: a file path, a shipped profile name, or an inline profile dict (written to a YAML file)."""

_READY_MARKER = "FAULTPROXY-HARNESS-READY "
_FAILED_MARKER = "FAULTPROXY-HARNESS-FAILED "

# Loaded last with -s. Prints the really bound addresses once mitmproxy is running. It also reports what
# mitmproxy would let pass silently: a `--set` of an option that no addon declared is parked in
# `options.deferred` and ignored (so a missing or broken fault addon, or a typo, would go unnoticed), and
# errors logged by earlier addons' running hooks (mitmproxy exits on those right after).
_READY_SCRIPT = f"""\
import json
from mitmproxy import ctx


class HarnessReady:
    def running(self):
        problems = []
        unknown = sorted(getattr(ctx.options, "deferred", {{}}))
        if unknown:
            problems.append("options set but declared by no addon: " + ", ".join(unknown))
        errorcheck = ctx.master.addons.get("errorcheck")
        handler = getattr(errorcheck, "logger", None)
        problems += [str(r.getMessage()) for r in getattr(handler, "has_errored", None) or []]
        if problems:
            print({_FAILED_MARKER!r} + json.dumps(problems), flush=True)
            return
        addrs = [list(a[:2]) for a in ctx.master.addons.get("proxyserver").listen_addrs()]
        control = getattr(ctx.master.addons.get("faultproxy"), "control", None)
        api = getattr(control, "api_url", None)  # faultproxy's control API
        print({_READY_MARKER!r} + json.dumps({{"listen": addrs, "api": api}}), flush=True)


addons = [HarnessReady()]
"""

# Lines that mean an addon raised: mitmproxy logs them and carries on, which would hide a broken addon.
_ADDON_ERROR_PATTERNS = (
    re.compile(r"^Traceback \(most recent call last\):", re.M),
    re.compile(r"Addon error", re.M),
    re.compile(r"mitmproxy has crashed", re.M),
)


class ProxyStartError(RuntimeError):
    """mitmdump did not come up; the message carries its output."""


class ProxyCrashed(RuntimeError):
    """mitmdump exited on its own, or logged an addon error; the message carries its output."""

    def __init__(self, message: str, output: str, returncode: int | None) -> None:
        super().__init__(message)
        self.output = output
        self.returncode = returncode


def mitmdump_command() -> list[str]:
    """The ``mitmdump`` of the running interpreter's environment (a venv's bin/), else the same via -c."""
    script = Path(sys.executable).parent / "mitmdump"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]


def _as_profile_list(profiles: ProfileSpec | Sequence[ProfileSpec] | None) -> list[ProfileSpec]:
    if profiles is None:
        return []
    if isinstance(profiles, (str, os.PathLike, Mapping)):
        return [profiles]
    return list(profiles)


class _OutputCollector:
    """Reads the child's merged stdout/stderr on a thread (so the pipe never fills and blocks mitmdump)."""

    def __init__(self, stream: Iterable[str]) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.listen: list[tuple[str, int]] = []
        self.api: str | None = None
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, args=(stream,), name="mitmdump-output", daemon=True)
        self._thread.start()

    def _run(self, stream: Iterable[str]) -> None:
        for line in stream:
            if line.startswith(_READY_MARKER):
                ready = json.loads(line[len(_READY_MARKER) :])
                self.listen = [(h, int(p)) for h, p in ready["listen"]]
                self.api = ready.get("api")
                self.ready.set()
                continue
            if line.startswith(_FAILED_MARKER):
                self.failure = line[len(_FAILED_MARKER) :].strip()
                self.ready.set()
            with self._lock:
                self._lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class ProxyProcess:
    """A running ``mitmdump -s <fault addon> --mode reverse:<upstream>`` on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. On a clean exit from the ``with``
    block, a proxy that crashed (exited on its own, or logged an addon traceback while
    ``fail_on_addon_error``) raises :class:`ProxyCrashed` with its output; when the block is already failing,
    the output is printed to stderr instead so the original error stays the one reported.
    """

    def __init__(
        self,
        profiles: ProfileSpec | Sequence[ProfileSpec] | None = (),
        *,
        upstream: str,
        script: str | os.PathLike[str] | None = None,
        confdir: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        time_scale: float = 1.0,
        seed: int | None = None,
        dry_run: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        fail_on_addon_error: bool = True,
        engine: str = "mitmdump",
        control_api: bool = False,
        api_token: str | None = None,
        mode: str | None = None,
    ) -> None:
        if engine not in ("mitmdump", "lean"):
            raise ValueError(f"engine: expected 'mitmdump' or 'lean', got {engine!r}")
        # "mitmdump": `mitmdump -s <script>`; "lean": `python -m faultproxy.lean` (faultproxy's lean master
        # with the fault addon built in; `script` is not used).
        self.engine = engine
        # control_api: serve faultproxy's control API on 127.0.0.1:<ephemeral> (see `control`, `faults`);
        # api_token: require it as a bearer token. mode: a mitmproxy mode instead of reverse:<upstream>.
        self.control_api = control_api
        self.api_token = api_token
        self.mode = mode
        self.upstream = upstream
        self.profiles = _as_profile_list(profiles)
        self.script = Path(script) if script is not None else DEFAULT_SCRIPT
        self.time_scale = time_scale
        self.seed = seed
        self.dry_run = dry_run
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.fail_on_addon_error = fail_on_addon_error
        self._env_overrides = dict(env or {})
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="faultproxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Default confdir lives in the work dir: private, but pays CA generation each time. The pytest
        # plugin passes one session-wide confdir so the CA is generated once.
        self.confdir = Path(confdir) if confdir is not None else self.workdir / "confdir"
        self.journal_path = self.workdir / "journal.jsonl"
        self.command: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._output: _OutputCollector | None = None
        self._port: int | None = None
        self._stopped_by_us = False
        self._final_output: str | None = None
        self._final_journal: str | None = None
        self.killed = False  # True when SIGTERM was not enough within stop_timeout
        self.returncode: int | None = None

    # -- addresses --
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        """Same port: mitmproxy's reverse mode detects a TLS ClientHello and terminates TLS itself."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        """mitmproxy's CA certificate (PEM), to verify :attr:`https_url` instead of turning checks off."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def api_url(self) -> str:
        """The control API's URL (the proxy must be started with ``control_api=True``)."""
        api = self._output.api if self._output is not None else None
        if api is None:
            raise RuntimeError("the control API is off: start the proxy with control_api=True")
        return api

    @property
    def control(self) -> Control:
        """A :class:`faultproxy.Control` client for this proxy's control API."""
        from faultproxy.control.client import Control

        return Control(self.api_url, self.api_token)

    def faults(self, *profiles: ProfileSpec) -> AbstractContextManager[Control]:
        """``with proxy.faults("aws-alb"): ...``: these profiles inside the block (names, paths, dicts), the
        previous set after it. Needs ``control_api=True``."""
        return self.control.faults(*profiles)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- command line --
    def _profile_args(self) -> list[str]:
        args: list[str] = []
        for index, profile in enumerate(self.profiles):
            if isinstance(profile, Mapping):
                path = self.workdir / f"profile-{index}.yaml"
                path.write_text(_dump_yaml(profile), encoding="utf-8")
                value = str(path)
            else:
                value = os.fspath(profile)
            args += ["--set", f"fault_profile={value}"]
        return args

    def build_command(self) -> list[str]:
        ready_script = self.workdir / "_harness_ready.py"
        ready_script.write_text(_READY_SCRIPT, encoding="utf-8")
        if self.engine == "lean":
            head = [sys.executable, "-m", "faultproxy.lean"]
        else:
            head = [*mitmdump_command(), "-s", str(self.script)]
        command = [
            *head,
            "-s", str(ready_script),
            "--mode", self.mode or f"reverse:{self.upstream}",
            "--listen-host", "127.0.0.1",
            "--listen-port", "0",
            "--set", f"confdir={self.confdir}",
            "--set", f"fault_log={self.journal_path}",
            *self._profile_args(),
        ]  # fmt: skip
        if self.time_scale != 1.0:
            # Only when it matters: mitmproxy's --set cannot parse an option declared as float (only str,
            # int, bool, their Optionals and Sequence[str]), so the addon must declare it as str to take it.
            command += ["--set", f"fault_time_scale={self.time_scale}"]
        if self.seed is not None:
            command += ["--set", f"fault_seed={self.seed}"]
        if self.dry_run:
            command += ["--set", "fault_dry_run=true"]
        if self.control_api:
            command += ["--set", "fault_api=127.0.0.1:0"]
        if self.api_token:
            command += ["--set", f"fault_api_token={self.api_token}"]
        return command + self.extra_args

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The addon script imports faultproxy; make the package importable in the child even when the tests
        # found it through the rootdir rather than an install.
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._env_overrides)
        return env

    # -- lifecycle --
    def start(self) -> ProxyProcess:
        if self._proc is not None:
            raise RuntimeError("proxy already started")
        self.command = self.build_command()
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=self._child_env(),  # cwd inherited: relative profile paths mean what the caller meant
            # Own session: a Ctrl-C in the terminal reaches pytest, whose teardown stops the proxy, instead of
            # killing mitmdump behind the harness's back (which would then be reported as a crash).
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        self._output = _OutputCollector(self._proc.stdout)
        deadline = time.monotonic() + self.startup_timeout
        while not self._output.ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() >= deadline:
                break
        if not self._output.ready.is_set() or self._output.failure is not None:
            reason = (
                f"reported startup problems: {self._output.failure}"
                if self._output.failure is not None
                else f"exited with code {self._proc.returncode}"
                if self._proc.poll() is not None
                else f"not ready within {self.startup_timeout} s"
            )
            self._terminate()
            raise ProxyStartError(f"mitmdump {reason}\ncommand: {self.command}\n{self._banner()}")
        ports = {port for host, port in self._output.listen}
        if len(ports) != 1:
            self._terminate()
            raise ProxyStartError(f"expected one listening port, got {self._output.listen}\n{self._banner()}")
        self._port = ports.pop()
        return self

    def stop(self) -> int | None:
        """Stop mitmdump (SIGTERM, then SIGKILL after ``stop_timeout``); returns its exit code.

        Raises :class:`ProxyCrashed` if it had crashed (see the class docstring).
        """
        crash = self._stop_and_check()
        if crash is not None:
            raise crash
        return self.returncode

    def _stop_and_check(self) -> ProxyCrashed | None:
        if self._proc is None or self._stopped_by_us:
            return None
        exited_on_its_own = self._proc.poll() is not None
        # What was logged before we asked it to stop: asyncio on Python 3.12.1 may print a
        # CancelledError traceback while tearing down connections that are still open, which is
        # shutdown noise, not an addon failing on traffic.
        before_stop = self.output()
        self._terminate()
        output = self.output()
        # mitmdump exits 0 on SIGTERM (-SIGTERM if the signal beats its handler). Any other code means it was
        # already dying when we signalled it: poll() can miss a process whose sockets the kernel has closed
        # but which is not yet reaped.
        if not self.killed and self.returncode not in (0, -signal.SIGTERM):
            exited_on_its_own = True
        if exited_on_its_own:
            return ProxyCrashed(
                f"mitmdump exited on its own with code {self.returncode}\n{self._banner()}",
                output,
                self.returncode,
            )
        if self.fail_on_addon_error and any(p.search(before_stop) for p in _ADDON_ERROR_PATTERNS):
            return ProxyCrashed(f"mitmdump logged an addon error\n{self._banner()}", output, self.returncode)
        return None

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._stopped_by_us = True
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                # Seen: mitmdump taking > 10 s to exit on SIGTERM after many connections closed.
                self.killed = True
                proc.kill()
                proc.wait(5.0)
        self.returncode = proc.returncode
        if self._output is not None:
            self._output.join(5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        self._final_output = self._output.text() if self._output is not None else ""
        self._final_journal = self._read_journal_text()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        crash = self._stop_and_check()
        if crash is None:
            return
        if exc_type is None:
            raise crash
        print(f"faultproxy harness: {crash}", file=sys.stderr)

    # -- observation --
    def output(self) -> str:
        """Everything mitmdump printed so far (stdout and stderr merged)."""
        if self._final_output is not None:
            return self._final_output
        return self._output.text() if self._output is not None else ""

    def _banner(self) -> str:
        return f"--- mitmdump output ---\n{self.output()}--- end of mitmdump output ---"

    def _read_journal_text(self) -> str:
        if self._final_journal is not None:
            return self._final_journal
        try:
            return self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def journal(self) -> list[dict[str, Any]]:
        """The JSON-lines journal as parsed so far. A last line without its newline may still be being
        written: it is skipped if it does not parse. Any other bad line raises ValueError."""
        text = self._read_journal_text()
        lines = text.split("\n")
        entries: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise ValueError(f"{self.journal_path}:{number}: not JSON: {line[:200]!r}") from None
        return entries

    def wait_for_journal(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """First journal entry satisfying ``predicate``, polling until ``timeout`` seconds have passed.

        Fails fast with :class:`ProxyCrashed` if mitmdump dies meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.journal()
            for entry in entries:
                if predicate(entry):
                    return entry
            if self._proc is not None and not self._stopped_by_us and self._proc.poll() is not None:
                raise ProxyCrashed(
                    f"mitmdump exited (code {self._proc.returncode}) while waiting for the journal\n{self._banner()}",
                    self.output(),
                    self._proc.returncode,
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no journal entry matched within {timeout} s; journal has {len(entries)} entries: "
                    f"{entries[-20:]}\n{self._banner()}"
                )
            time.sleep(0.02)  # poll interval of a deadline-bounded wait


def _dump_yaml(profile: Mapping[str, Any]) -> str:
    try:
        import yaml  # imported here: the plugin imports this module, and most runs never write a profile
    except ImportError:  # pragma: no cover - PyYAML is a dependency; JSON is valid YAML anyway
        return json.dumps(profile, indent=2)
    return str(yaml.safe_dump(dict(profile), sort_keys=False))
