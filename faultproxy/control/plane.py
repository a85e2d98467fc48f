"""The control plane addon: the state an operator steers, and the hooks the fault addon asks.

`ControlPlane` has an addon's shape (load/configure/running/done, options, commands) but is driven
by `addon.FaultProxy`, which calls those hooks and registers the commands, instead of being its
child addon: mitmproxy walks every addon's children, one nested generator per level, for each hook
event of each flow, and under `mitmdump -s` that walk was a measurable share of faultproxy's cost
(bench/PROFILE.md). It owns:

- the profile set (what was loaded and from where), hot reload (`reload.ProfileWatcher`) and
  replacement through the API, each validated before anything changes: a bad set is rejected with
  the loader's `file:line:column` errors and the last good set stays in force;
- per-rule enable/disable overrides and the kill switch;
- per-request selection (`selection`), the `fault_max_active` limit and the marker header;
- schedule window reporting (`schedule`), passthrough of untargeted hosts (`passthrough`);
- the control API listener (`api`) and the `faults.*` mitmproxy commands;
- status and metrics.

Every method runs on mitmproxy's event loop (hooks, commands, the API's handlers, the watcher), so
the state needs no locks. Swapping `FaultProxy.rules` is safe for flows in progress: a flow keeps the
`CompiledRule` objects it matched in its own `FlowFaults`, and nothing per-flow reads the rule list
after `requestheaders`.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

from mitmproxy import command, ctx, exceptions, http

from ..errors import ProfileError
from ..matching import CompiledRule, RequestView, compile_profiles
from ..profile import LoadedProfile, load_profile, load_text, shipped_profiles
from . import passthrough, schedule, selection
from .reload import ProfileWatcher

if TYPE_CHECKING:
    from ..engine import Hit
    from ..journal import Journal
    from ..matching import RuleHit

log = logging.getLogger("faultproxy")

_REJECT = "faultproxy.select_error"  # flow.metadata: why the selection header was refused
_HEADER_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
TOKEN_ENV = "FAULTPROXY_API_TOKEN"
RECENT_RECORDS = 512  # journal records kept for SSE clients that ask for a backlog


class ControlRequestError(Exception):
    """A request the control plane refuses: an HTTP status for the API, a CommandError for commands."""

    def __init__(self, status: int, message: str, **details: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


@dataclass(frozen=True)
class SetEntry:
    """One profile of the loaded set: a reference (path or shipped name; watched) or uploaded YAML."""

    ref: str | None = None
    text: str | None = None
    source: str = ""
    default_name: str = "uploaded"

    def to_json(self) -> dict[str, Any]:
        if self.ref is not None:
            return {"ref": self.ref}
        return {"yaml": self.text, "source": self.source}


@dataclass
class _Active:
    flow: http.HTTPFlow
    keys: set[str]


def parse_listen(text: str) -> tuple[str, int]:
    """`fault_api` value: PORT, HOST:PORT or [IPV6]:PORT."""
    value = text.strip()
    host, port_text = "127.0.0.1", value
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not value[end + 1 :].startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        host, port_text = value[1:end], value[end + 2 :]
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:8089, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or '' (all interfaces): not provably loopback


def split_yaml_documents(text: str) -> list[tuple[int, str]]:
    """YAML documents of a body, each padded with blank lines so its line numbers are the body's."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"^---(\s|$)", line)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    docs = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        chunk = "".join(lines[start:end])
        body = re.sub(r"^---", "", chunk, count=1) if n or chunk.startswith("---") else chunk
        if not re.sub(r"(?m)^\s*#.*$", "", body).strip() or body.strip() == "...":
            continue  # an empty document (a leading '---', comments only)
        docs.append((start, "\n" * start + chunk))
    return docs


class RuleHost(Protocol):
    """What the plane steers: the rule set in force and the journal (addon.FaultProxy is the host).
    A protocol, not an import: the addon sits above the control plane and drives it."""

    journal: Journal
    profiles: list[LoadedProfile]
    rules: list[CompiledRule]
    time_scale: float


class ApiServer(Protocol):
    """The control API's server (api.ControlServer), built by `server_factory`."""

    url: str

    def start(self) -> None: ...

    def close(self) -> None: ...


class ControlPlane:
    def __init__(self, addon: RuleHost, server_factory: Callable[..., ApiServer] | None = None):
        self.addon = addon
        # api.ControlServer(plane, host, port, token=...): passed in by the addon, because the API sits
        # above the plane (it calls the plane's methods) and the plane must not import it.
        self.server_factory = server_factory
        self.killed = False
        self.overrides: dict[str, bool] = {}  # rule key -> enabled, set by the API/commands
        self.entries: list[SetEntry] = []
        self.active: dict[str, _Active] = {}  # flow id -> faulted flow in progress
        self.generation = 0
        self.reload_counts = collections.Counter({"ok": 0, "rejected": 0})
        self.last_reload: dict[str, Any] | None = None
        self.selection_rejected = 0
        self.select_header: str | None = None
        self.select_only = False
        self.max_active = 0
        self.marker_header: str | None = None
        self.api_listen: tuple[str, int] | None = None
        self.api_token: str | None = None
        self.api: ApiServer | None = None
        self.api_url: str | None = None
        self.watcher = ProfileWatcher(self.reload)
        self.windows = schedule.WindowReporter(addon.journal)
        self.passthrough_applies = False
        self._managed_allow: list[str] | None = None  # the allow_hosts we set last
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.records_seen = 0
        self.recent: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=RECENT_RECORDS)
        self.listeners: list[Any] = []  # callables (seq, record) on the loop: the API's SSE streams
        addon.journal.subscribers.append(self._on_record)

    # --- mitmproxy lifecycle -------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        add = loader.add_option
        add("fault_api", Optional[str], None, "Serve the control API here, e.g. 127.0.0.1:8089 (port 0: any free port). Off by default.")
        add("fault_api_token", Optional[str], None, f"Bearer token the control API requires (required off loopback; or set ${TOKEN_ENV}).")
        add("fault_select_header", Optional[str], None, "Request header naming the profiles/rules a request wants (e.g. x-fault); removed before upstream.")
        add("fault_select_only", bool, False, "With fault_select_header: requests without the header get no fault.")
        add("fault_max_active", int, 0, "At most this many flows faulted at once (0: no limit); further matches pass untouched.")
        add("fault_marker_header", Optional[str], None, "Response header naming the rules applied to a flow, where headers have not yet been sent.")
        add("fault_reload", bool, True, "Reload profile files when they change (rejected edits keep the last good profiles).")
        add("fault_passthrough", bool, True, "Regular/upstream modes: do not intercept hosts no loaded rule can match (sets allow_hosts).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        # Bad values are logged as errors, not raised, like the fault addon's options: during startup
        # that makes mitmdump exit with status 1; later the previous setting stays in force.
        if "fault_max_active" in updated:
            if opts.fault_max_active < 0:
                log.error("fault_max_active: expected 0 (no limit) or more, got %s", opts.fault_max_active)
            else:
                self.max_active = opts.fault_max_active
        for name in ("fault_select_header", "fault_marker_header"):
            if name in updated:
                value = (getattr(opts, name) or "").strip() or None
                if value is not None and not _HEADER_TOKEN.match(value):
                    log.error("%s: expected a header name like x-fault, got %r", name, value)
                    continue
                setattr(self, name.removeprefix("fault_"), value.lower() if value else None)
        if "fault_select_only" in updated:
            self.select_only = opts.fault_select_only
        if "fault_reload" in updated:
            self.watcher.enabled = opts.fault_reload
        if updated & {"fault_api", "fault_api_token"}:
            self._configure_api(opts.fault_api, opts.fault_api_token)
        if "fault_passthrough" in updated and self._running:
            self._soon(self.apply_passthrough)

    def _configure_api(self, listen: str | None, token: str | None) -> None:
        token = token or os.environ.get(TOKEN_ENV) or None
        address = None
        if listen and listen.strip():
            try:
                address = parse_listen(listen)
            except ValueError as e:
                log.error("fault_api: %s; the control API stays %s", e, self.api_url or "off")
                return
            if not is_loopback(address[0]) and not token:
                log.error(
                    "fault_api: %s is not a loopback address; serving the control API there requires "
                    "fault_api_token (or $%s), which every request must then carry as a bearer token. "
                    "The control API stays %s.",
                    address[0] or "every interface",
                    TOKEN_ENV,
                    self.api_url or "off",
                )
                return
        changed = (address, token) != (self.api_listen, self.api_token)
        self.api_listen, self.api_token = address, token
        if changed and self._running:
            self._stop_api()
            self._start_api()

    def running(self) -> None:
        # Synchronous on purpose: a script loaded after startup gets `running` from a sync call.
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Schedules count from when the proxy starts serving, not from option parsing at startup:
        # no flow can arrive before this, and a short `after` must not elapse unseen.
        now = time.monotonic()
        for rule in self.addon.rules:
            rule.loaded_at = now
        self.windows.reset(self.addon.rules)
        self._start_api()
        self.watcher.start()
        self.windows.start()
        self.apply_passthrough()

    def done(self) -> None:
        self._running = False
        self.watcher.stop()
        self.windows.stop()
        self._stop_api()

    def _start_api(self) -> None:
        if self.api_listen is None:
            return
        if self.server_factory is None:
            log.error("faultproxy: no control API server was given to the control plane; fault_api ignored")
            return
        server = self.server_factory(self, *self.api_listen, token=self.api_token)
        try:
            server.start()
        except OSError as e:
            log.error("faultproxy: cannot serve the control API on %s:%s: %s", *self.api_listen, e)
            return
        self.api, self.api_url = server, server.url
        log.info("faultproxy: control API on %s%s", server.url, " (bearer token required)" if self.api_token else "")

    def _stop_api(self) -> None:
        if self.api is not None:
            self.api.close()
        self.api, self.api_url = None, None

    def _soon(self, fn: Any, *args: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon(fn, *args)

    # --- the profile set -----------------------------------------------------------------------

    def adopt(self, profiles: list[LoadedProfile], rules: list[CompiledRule], entries: Sequence[str | SetEntry]) -> list[CompiledRule]:
        """A validated set is about to replace the rules in force: carry state over, watch its files.

        Counters carry over by rule key (metrics stay monotonic); an enable/disable override carries
        over unless the new file itself changed that rule's `enabled`.
        """
        old = {r.key: r for r in self.addon.rules}
        for rule in rules:
            prev = old.get(rule.key)
            if prev is not None:
                rule.counters = prev.counters
                if prev.model.enabled != rule.model.enabled:
                    self.overrides.pop(rule.key, None)
            if rule.key in self.overrides:
                rule.enabled = self.overrides[rule.key]
        self.entries = [e if isinstance(e, SetEntry) else SetEntry(ref=str(e)) for e in entries]
        self.generation += 1
        self.watcher.track([e.ref for e in self.entries if e.ref is not None])
        self.windows.reset(rules)
        if self._running:
            self._soon(self.apply_passthrough)
            self._soon(self.windows.check)
        return rules

    def try_load(self, entries: list[SetEntry]) -> tuple[list[LoadedProfile], list[str]]:
        """Load and validate a set; (profiles, []) or ([], every issue as `file:line:col: field: msg`)."""
        profiles: list[LoadedProfile] = []
        errors: list[str] = []
        for entry in entries:
            try:
                if entry.ref is not None:
                    profile = load_profile(entry.ref)
                else:
                    profile = load_text(entry.text or "", entry.source)
                    if profile.model.name is None:
                        profile.name = entry.default_name
                profiles.append(profile.scaled(self.addon.time_scale))
            except ProfileError as e:
                errors.extend(str(issue) for issue in e.issues)
            except Exception as e:  # whatever happens, a bad profile is an error report, not a crash
                errors.append(f"{entry.ref or entry.source}: cannot load: {type(e).__name__}: {e}")
        return (profiles, []) if not errors else ([], errors)

    def _prepare(self, entries: list[SetEntry]) -> tuple[list[LoadedProfile], list[CompiledRule], list[str]]:
        """Load, validate and compile a set without touching the one in force."""
        profiles, errors = self.try_load(entries)
        if errors:
            return [], [], errors
        try:
            return profiles, compile_profiles(profiles), []
        except Exception as e:  # a kind that fails to build from a valid config: reported, not raised
            log.exception("faultproxy: compiling the profiles failed")
            return [], [], [f"cannot compile the profiles: {type(e).__name__}: {e}"]

    def install(self, profiles: list[LoadedProfile], rules: list[CompiledRule], entries: list[SetEntry]) -> None:
        rules = self.adopt(profiles, rules, entries)
        self.addon.profiles = profiles
        self.addon.rules = rules
        self.addon.journal.time_scale = self.addon.time_scale

    def _set_summary(self) -> str:
        return ", ".join(f"{p.name} ({len(p.rules)} rules)" for p in self.addon.profiles) or "no profile"

    def reload(self) -> dict[str, Any]:
        """Re-read the set's files (the watcher calls this on a change). Never raises for a bad edit."""
        started = time.monotonic()
        files = [str(f) for f in self.watcher.files]
        profiles, rules, errors = self._prepare(self.entries)
        if errors:
            self.reload_counts["rejected"] += 1
            self.last_reload = {"ok": False, "errors": errors, "files": files, "ts": time.time()}
            log.error(
                "faultproxy: profile reload rejected; the last good profiles stay in force (%s):\n%s",
                self._set_summary(),
                "\n".join(f"  {e}" for e in errors),
            )
            self.addon.journal.event(
                "reload_rejected", "faultproxy: profile reload rejected, the last good profiles stay", errors=errors, files=files
            )
            return self.last_reload
        self.install(profiles, rules, self.entries)
        self.reload_counts["ok"] += 1
        took = time.monotonic() - started
        self.last_reload = {"ok": True, "errors": [], "files": files, "ts": time.time(), "seconds": round(took, 4)}
        self.addon.journal.event(
            "reload", f"faultproxy: profiles reloaded: {self._set_summary()}", generation=self.generation, files=files
        )
        return self.last_reload

    def replace(self, entries: list[SetEntry]) -> None:
        """Replace the whole set (API). Raises ControlRequestError (403/422) and changes nothing on error."""
        allowed = set(shipped_profiles()) | {str(r) for r in ctx.options.fault_profile} | {
            e.ref for e in self.entries if e.ref is not None
        }
        for entry in entries:
            if entry.ref is not None and entry.ref not in allowed:
                raise ControlRequestError(
                    403,
                    f"profile reference {entry.ref!r} is not allowed: name a shipped profile or one given with "
                    "fault_profile, or send the profile's YAML",
                    allowed=sorted(allowed),
                )
        profiles, rules, errors = self._prepare(entries)
        if not errors:
            names = collections.Counter(p.name for p in profiles)
            errors = [f"two profiles in the set are named {n!r}: give each a distinct name" for n, c in names.items() if c > 1]
        if errors:
            raise ControlRequestError(422, "invalid profile set; the profiles in force stay", errors=errors)
        self.overrides.clear()
        self.install(profiles, rules, entries)
        self.addon.journal.event(
            "profiles_replaced", f"faultproxy: profiles replaced: {self._set_summary()}", generation=self.generation
        )

    # --- rules, kill switch --------------------------------------------------------------------

    def find(self, ident: str) -> list[CompiledRule]:
        """`profile/rule`, `profile/*`, or a rule name that only one profile uses."""
        rules = self.addon.rules
        ident = ident.strip()
        if "/" in ident:
            profile, _, name = ident.partition("/")
            found = [r for r in rules if r.profile == profile and (name == "*" or r.name == name)]
        else:
            found = [r for r in rules if r.name == ident]
            keys = sorted({r.key for r in found})
            if len(keys) > 1:
                raise ControlRequestError(409, f"rule name {ident!r} is used by several profiles; name one of: {', '.join(keys)}")
        if not found:
            known = ", ".join(r.key for r in rules) or "none"
            raise ControlRequestError(404, f"no loaded rule {ident!r} (rules: {known})")
        return found

    def set_enabled(self, ident: str, enabled: bool) -> list[CompiledRule]:
        found = self.find(ident)
        for rule in found:
            rule.enabled = enabled
            self.overrides[rule.key] = enabled
        keys = sorted({r.key for r in found})
        word = "enabled" if enabled else "disabled"
        self.addon.journal.event(f"rule_{word}", f"faultproxy: {word} {', '.join(keys)}", rules=keys)
        return found

    def set_killed(self, killed: bool) -> None:
        changed = killed != self.killed
        self.killed = killed
        if changed:
            if killed:
                self.addon.journal.event("kill", "faultproxy: kill switch ON: no new fault is applied until resumed")
            else:
                self.addon.journal.event("resume", "faultproxy: kill switch off: faults resume")

    # --- called by the fault addon, per flow ---------------------------------------------------

    def rules_for(self, flow: http.HTTPFlow, rules: list[CompiledRule]) -> list[CompiledRule]:
        """The rules a new flow may be matched against (selection header, kill switch)."""
        try:
            return self._rules_for(flow, rules)
        except Exception:
            log.exception("faultproxy: rule selection failed for %s; the flow passes untouched", flow.request.pretty_url)
            return []

    def _rules_for(self, flow: http.HTTPFlow, rules: list[CompiledRule]) -> list[CompiledRule]:
        if self.select_header is not None:
            headers = flow.request.headers
            values = headers.get_all(self.select_header)
            if values:
                del headers[self.select_header]  # never goes upstream
                try:
                    rules = selection.resolve(self.select_header, ", ".join(values), rules)
                except selection.SelectionError as e:
                    flow.metadata[_REJECT] = str(e)
                    return []
            elif self.select_only:
                return []
        if self.killed and rules:
            view = RequestView(flow)
            for rule in rules:  # counted: a flow the kill switch let through
                if rule.is_active() and rule.matches_request(flow, view):
                    rule.counters.skipped += 1
            return []
        return rules

    def answer_rejected(self, flow: http.HTTPFlow) -> bool:
        """From the `request` hook: answer 400 to a request whose selection header named nothing loaded."""
        message = flow.metadata.pop(_REJECT, None)
        if message is None:
            return False
        self.selection_rejected += 1
        flow.response = http.Response.make(
            400, f"faultproxy: {message}\n".encode(), {"content-type": "text/plain; charset=utf-8"}
        )
        log.info("faultproxy: 400 for %s: %s", flow.request.pretty_url, message)
        return True

    def admit(self, flow: http.HTTPFlow, matched: list[RuleHit]) -> bool:
        """May this flow be faulted now (fault_max_active)? False: it passes untouched, counted as skipped."""
        if not matched or ctx.options.fault_dry_run:
            return True
        entry = self.active.get(flow.id)
        if entry is None and self.max_active and len(self.active) >= self.max_active:
            self._prune()
            if len(self.active) >= self.max_active:
                for rh in matched:
                    rh.rule.counters.skipped += 1
                return False
        if entry is None:
            entry = self.active[flow.id] = _Active(flow, set())
        entry.keys.update(rh.rule.key for rh in matched)
        return True

    def release(self, flow: http.HTTPFlow) -> None:
        self.active.pop(flow.id, None)

    def _prune(self) -> None:
        for fid in [fid for fid, a in self.active.items() if not a.flow.live]:
            del self.active[fid]

    def mark(self, flow: http.HTTPFlow, hits: list[Hit]) -> None:
        """Name the rules applied to this flow in a response header (where headers have not gone out)."""
        if self.marker_header is None or flow.response is None or not hits or ctx.options.fault_dry_run:
            return
        keys = list(dict.fromkeys(f"{h.profile}/{h.rule}" for h in hits))
        flow.response.headers[self.marker_header] = ", ".join(keys)

    # --- passthrough of untargeted hosts -------------------------------------------------------

    def apply_passthrough(self) -> None:
        opts = ctx.options
        self.passthrough_applies = bool(opts.fault_passthrough) and passthrough.modes_allow_passthrough(list(opts.mode))
        current = list(opts.allow_hosts)
        if self._managed_allow is None and current:
            if self.passthrough_applies:
                log.info("faultproxy: allow_hosts is set by the user; untargeted-host passthrough left to it")
            self.passthrough_applies = False
            return
        if self._managed_allow is not None and current != self._managed_allow:
            log.info("faultproxy: allow_hosts was changed by the user; faultproxy stops managing it")
            self.passthrough_applies = False
            return
        wanted = passthrough.allow_patterns(self.addon.rules) if self.passthrough_applies else []
        self._managed_allow = wanted
        if wanted != current:
            opts.update(allow_hosts=wanted)
            log.info("faultproxy: intercepting %s", f"only hosts matching {wanted}" if wanted else "every host")

    # --- journal fan-out -----------------------------------------------------------------------

    def _on_record(self, record: dict[str, Any]) -> None:
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._on_record, record)
            return
        self.records_seen += 1
        seq = self.records_seen
        self.recent.append((seq, record))
        for listener in list(self.listeners):
            listener(seq, record)

    # --- status and metrics --------------------------------------------------------------------

    def active_by_rule(self) -> collections.Counter[str]:
        self._prune()
        counts: collections.Counter[str] = collections.Counter()
        for entry in self.active.values():
            counts.update(entry.keys)
        return counts

    def rule_info(self, rule: CompiledRule, active: collections.Counter[str] | None = None) -> dict[str, Any]:
        active = self.active_by_rule() if active is None else active
        sched = rule.model.active
        c = rule.counters
        return {
            "key": rule.key,
            "profile": rule.profile,
            "name": rule.name,
            "description": rule.model.description,
            "enabled": rule.enabled,
            "schedule": schedule.describe(sched) if sched is not None else None,
            "window": self.windows.state(rule),
            "live": rule.is_active() and not self.killed,  # would a new matching flow be faulted now
            "faults": [f.kind for f in rule.faults],
            "counters": {"matched": c.matched, "injected": c.injected, "skipped": c.skipped},
            "active_flows": active.get(rule.key, 0),
        }

    def rules_info(self) -> list[dict[str, Any]]:
        active = self.active_by_rule()
        return [self.rule_info(r, active) for r in self.addon.rules]

    def profiles_info(self) -> list[dict[str, Any]]:
        active = self.active_by_rule()
        out = []
        rules = iter(self.addon.rules)  # compile_profiles keeps profile order and rule order
        for profile in self.addon.profiles:
            mine = [r for r in (next(rules, None) for _ in profile.rules) if r is not None]
            out.append(
                {
                    "name": profile.name,
                    "source": profile.source,
                    "description": profile.description,
                    "rules": [self.rule_info(r, active) for r in mine],
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        opts = ctx.options
        self._prune()
        return {
            "killed": self.killed,
            "active_faults": len(self.active),
            "max_active": self.max_active,
            "select_header": self.select_header,
            "select_only": self.select_only,
            "marker_header": self.marker_header,
            "dry_run": opts.fault_dry_run,
            "time_scale": self.addon.time_scale,
            "generation": self.generation,
            "profiles": self.profiles_info(),
            "set": [e.to_json() for e in self.entries],
            "reload": {
                "enabled": self.watcher.enabled,
                "watching": [str(f) for f in self.watcher.files],
                "ok": self.reload_counts["ok"],
                "rejected": self.reload_counts["rejected"],
                "last": self.last_reload,
            },
            "passthrough": {"applies": self.passthrough_applies, "allow_hosts": list(opts.allow_hosts)},
            "selection_rejected": self.selection_rejected,
            "api": self.api_url,
        }

    def metrics_text(self) -> str:
        active = self.active_by_rule()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")

        per_rule = [({"profile": r.profile, "rule": r.name}, r) for r in self.addon.rules]
        family("faultproxy_rule_matched_total", "counter", "Flows that met every condition of the rule, selection included.",
               [(lb, r.counters.matched) for lb, r in per_rule])
        family("faultproxy_rule_injected_total", "counter", "Faults of the rule that acted on a flow.",
               [(lb, r.counters.injected) for lb, r in per_rule])
        family("faultproxy_rule_skipped_total", "counter", "Matching flows let through by fault_max_active or the kill switch.",
               [(lb, r.counters.skipped) for lb, r in per_rule])
        family("faultproxy_rule_active_faults", "gauge", "Flows this rule is faulting now.",
               [(lb, active.get(r.key, 0)) for lb, r in per_rule])
        family("faultproxy_rule_enabled", "gauge", "1 if the rule is enabled.", [(lb, int(r.enabled)) for lb, r in per_rule])
        family("faultproxy_rule_live", "gauge", "1 if a new matching flow would be faulted now (enabled, in its window, no kill switch).",
               [(lb, int(r.is_active() and not self.killed)) for lb, r in per_rule])
        family("faultproxy_active_faults", "gauge", "Flows being faulted now.", [({}, len(self.active))])
        family("faultproxy_max_active", "gauge", "fault_max_active (0: no limit).", [({}, self.max_active)])
        family("faultproxy_kill_switch", "gauge", "1 while the kill switch is on.", [({}, int(self.killed))])
        family("faultproxy_profile_generation", "gauge", "Increments each time a profile set is installed.", [({}, self.generation)])
        family("faultproxy_reloads_total", "counter", "Profile reloads from files, by result.",
               [({"result": k}, v) for k, v in sorted(self.reload_counts.items())])
        family("faultproxy_selection_rejected_total", "counter", "Requests answered 400 for naming no loaded profile or rule.",
               [({}, self.selection_rejected)])
        family("faultproxy_journal_records_total", "counter", "Journal records written (faults and events).", [({}, self.records_seen)])
        return "\n".join(lines) + "\n"

    def status_text(self) -> str:
        rows = [("rule", "state", "matched", "injected", "skipped", "active")]
        for info in self.rules_info():
            state = "live" if info["live"] else "disabled" if not info["enabled"] else "killed" if self.killed else "off-window"
            c = info["counters"]
            rows.append((info["key"], state, str(c["matched"]), str(c["injected"]), str(c["skipped"]), str(info["active_flows"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        head = [
            f"kill switch: {'ON' if self.killed else 'off'}; active faults: {len(self.active)}"
            + (f" (max {self.max_active})" if self.max_active else "")
            + f"; profiles: {self._set_summary()}"
        ]
        table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        return "\n".join(head + table)

    # --- mitmproxy commands (mitmweb / console) ------------------------------------------------

    @command.command("faults.status")
    def cmd_status(self) -> str:
        """Loaded rules with their state and counters, and the kill switch."""
        text = self.status_text()
        log.info("%s", text)
        return text

    @command.command("faults.enable")
    def cmd_enable(self, rule: str) -> None:
        """Enable a rule: profile/rule, profile/*, or a rule name."""
        self._command(lambda: self.set_enabled(rule, True))

    @command.command("faults.disable")
    def cmd_disable(self, rule: str) -> None:
        """Disable a rule: profile/rule, profile/*, or a rule name."""
        self._command(lambda: self.set_enabled(rule, False))

    @command.command("faults.off")
    def cmd_off(self) -> None:
        """Kill switch: no new fault is applied until faults.on."""
        self.set_killed(True)

    @command.command("faults.on")
    def cmd_on(self) -> None:
        """Resume faults after faults.off."""
        self.set_killed(False)

    @command.command("faults.reload")
    def cmd_reload(self) -> None:
        """Re-read the loaded profile files now (a bad edit is rejected; the profiles in force stay)."""
        result = self.reload()
        if not result["ok"]:
            raise exceptions.CommandError("reload rejected:\n" + "\n".join(result["errors"]))

    @staticmethod
    def _command(fn: Any) -> None:
        try:
            fn()
        except ControlRequestError as e:
            raise exceptions.CommandError(e.message) from None


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
