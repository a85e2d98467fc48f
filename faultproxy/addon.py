"""The mitmproxy addon: loads profiles, matches flows to rules, and lets each matched fault act.

Options (settable with `--set`):
  fault_profile     a profile path or shipped name; repeat to stack several
  fault_seed        seed for probability/first/every/jitter (overrides the profiles' own seeds)
  fault_log         path of a JSON-lines fault journal
  fault_time_scale  multiplies every duration in the loaded profiles (0.01: a 60 s timeout takes 0.6 s)
  fault_dry_run     match and journal, inject nothing
  fault_api, fault_select_header, fault_max_active, ...: the control plane's (control/plane.py)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mitmproxy import ctx, http

from . import _mitm
from .control.api import ControlServer
from .control.plane import ControlPlane
from .engine import INJECTED_HEADERS, Hit, Stage, StreamSession, stream_request_body, wants_streaming
from .errors import ProfileError
from .faults.downgrade import on_tls_clienthello
from .journal import Journal
from .matching import CompiledRule, RequestView, RuleHit, RuleIndex, compile_profiles
from .profile import LoadedProfile, load_profile

log = logging.getLogger("faultproxy")



@dataclass
class FlowFaults:
    """What faultproxy is doing to one flow."""

    matched: list[RuleHit] = field(default_factory=list)
    pending: list[CompiledRule] = field(default_factory=list)  # need response conditions
    session: StreamSession | None = None

    def hits(self) -> list[Hit]:
        return [h for rh in self.matched for h in rh.hits]


def parse_time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"fault_time_scale: expected a number above 0 like 0.01, got {text!r}")
    return value


class FaultProxy:
    def __init__(self) -> None:
        self.journal = Journal()
        self.profiles: list[LoadedProfile] = []
        self.rules: list[CompiledRule] = []
        # Per-flow state lives here, not in flow.metadata: mitmproxy deep-copies metadata when it
        # saves flows, and sessions hold tasks and locks.
        self.states: dict[str, FlowFaults] = {}
        self.sessions: dict[str, StreamSession] = {}  # live engine sessions by flow id
        self._index: RuleIndex | None = None  # rebuilt whenever self.rules is replaced
        # fault_dry_run and fault_seed as of the last configure: reading ctx.options costs a deepcopy of
        # the default for every read of an option left unset, several times per flow.
        self._dry_run = False
        self._seed: int | None = None
        self.time_scale = 1.0
        # Hot reload, control API, commands, selection, limits. Driven from this addon's own lifecycle
        # hooks rather than being a child addon: mitmproxy walks every addon's children, with one more
        # nested generator per level, for every hook event of every flow.
        self.control = ControlPlane(self, server_factory=ControlServer)

    # --- options -------------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        # mitmproxy's option types are typing.Optional/Sequence (not `X | None`), and `--set` cannot
        # parse floats, so the time scale is a string checked in configure().
        loader.add_option("fault_profile", Sequence[str], [], "Fault profile: a YAML path or a shipped name. Repeatable.")
        loader.add_option("fault_seed", Optional[int], None, "Seed for probability, first/every and jitter.")
        loader.add_option("fault_log", Optional[str], None, "Write the fault journal as JSON lines to this file.")
        loader.add_option("fault_time_scale", str, "1", "Multiply every profile duration by this factor (e.g. 0.01).")
        loader.add_option("fault_dry_run", bool, False, "Match and journal, but inject nothing.")
        loader.add_option(
            "fault_upstream_reuse",
            bool,
            True,
            "Reuse idle HTTP/1.1 upstream connections for HTTP/2 clients (mitmproxy opens one per request).",
        )
        self.control.load(loader)
        for attr in dir(type(self.control)):  # its faults.* commands (mitmproxy collects a child's itself)
            name = getattr(getattr(type(self.control), attr), "command_name", None)
            if isinstance(name, str):
                loader.add_command(name, getattr(self.control, attr))
        # Under `mitmdump -s`, a --set value that does not parse would make mitmproxy abort loading
        # this script without a word (traffic then flows with no faults): say what is wrong instead.
        master = getattr(loader, "master", None)  # None: lean.py's option recorder
        for message in _mitm.drop_unparsable_deferred(master.options, prefix="fault_") if master else ():
            log.error("%s", message)

    def configure(self, updated: set[str]) -> None:
        self._configure(updated)
        self.control.configure(updated)

    def _configure(self, updated: set[str]) -> None:
        # Bad options are logged as errors, not raised: mitmproxy prints a raised error from a script
        # with a traceback, while an error logged during startup makes mitmdump exit with status 1
        # ("Error logged during startup, exiting..."). Later on, the proxy keeps serving with the
        # last good rules.
        opts = ctx.options
        if "fault_dry_run" in updated:
            self._dry_run = bool(opts.fault_dry_run)
        if "fault_seed" in updated:
            self._seed = opts.fault_seed
        if "fault_upstream_reuse" in updated:
            _mitm.set_upstream_reuse(opts.fault_upstream_reuse)
        if "fault_time_scale" in updated:
            try:
                self.time_scale = parse_time_scale(opts.fault_time_scale)
            except ValueError as e:
                log.error("%s", e)
                return
        if "fault_log" in updated:
            try:
                self.journal.open(opts.fault_log)
            except OSError as e:
                log.error("fault_log: cannot open %r: %s", opts.fault_log, e)
        if updated & {"fault_profile", "fault_time_scale"}:
            self.load_profiles(list(opts.fault_profile), self.time_scale)

    def load_profiles(self, refs: list[str], time_scale: float) -> bool:
        """Load, validate and compile. On any error log every problem and keep the rules in force."""
        profiles: list[LoadedProfile] = []
        errors: list[str] = []
        for ref in refs:
            try:
                profiles.append(load_profile(ref).scaled(time_scale))
            except ProfileError as e:
                errors.append(str(e))
        if errors:
            log.error("faultproxy: invalid fault profile, %s:\n%s", "keeping the rules in force" if self.rules else "no rules loaded", "\n".join(errors))
            return False
        self.profiles = profiles
        self.rules = self.control.adopt(profiles, compile_profiles(profiles), refs)
        self.journal.time_scale = time_scale
        if profiles:
            names = ", ".join(f"{p.name} ({len(p.rules)} rules)" for p in profiles)
            scale = f", time scale {time_scale:g}" if time_scale != 1 else ""
            log.info("faultproxy: loaded %s%s", names, scale)
        return True

    def running(self) -> None:
        _mitm.install(ctx.options)
        self.control.running()

    def done(self) -> None:
        for line in self.journal.summary().splitlines():
            log.info("%s", line)
        self.journal.close()
        self.control.done()

    # --- per-flow state ------------------------------------------------------------------------

    def _hits_for(self, flow: http.HTTPFlow, rule: CompiledRule, rng: Any) -> RuleHit:
        state = self.states[flow.id]
        dry = self._dry_run

        def session() -> StreamSession:
            return self._session(flow, state)

        return RuleHit(
            rule,
            [
                Hit(
                    flow=flow,
                    rule=rule.name,
                    profile=rule.profile,
                    fault=f,
                    rng=rng,
                    journal=self.journal,
                    session_factory=session,
                    dry_run=dry,
                    counters=rule.counters,
                )
                for f in rule.faults
            ],
        )

    def _session(self, flow: http.HTTPFlow, state: FlowFaults) -> StreamSession:
        if state.session is None:
            state.session = StreamSession(flow, _mitm.FlowHandle.find(flow))
            self.sessions[flow.id] = state.session
        return state.session

    def _select(self, flow: http.HTTPFlow, rules: list[CompiledRule]) -> list[RuleHit]:
        seed = self._seed
        out = []
        for rule in rules:
            rng = rule.select(seed)
            if rng is not None:
                out.append(self._hits_for(flow, rule, rng))
        return out

    # --- hooks ---------------------------------------------------------------------------------

    def tls_clienthello(self, data: Any) -> None:
        # Connection-level faults (downgrade: offer only http/1.1 in ALPN to matching SNIs).
        try:
            on_tls_clienthello(data, () if self.control.killed else self.rules, journal=self.journal, dry_run=self._dry_run)
        except Exception:
            log.exception("faultproxy: downgrade check failed; the connection goes on untouched")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rules = self.control.rules_for(flow, self.rules)  # per-request selection, kill switch
        if not rules:
            return
        try:
            view = RequestView(flow)
            if rules is self.rules:
                # Only the rules whose path/host bucket this request is in can match (matching.RuleIndex).
                index = self._index
                if index is None or index.rules is not rules:
                    index = self._index = RuleIndex(rules)
                rules = index.candidates(flow, view)
            now_rules: list[CompiledRule] = []
            pending: list[CompiledRule] = []
            for rule in rules:
                if not rule.connection_only and rule.is_active() and rule.matches_request(flow, view):
                    (pending if rule.needs_response else now_rules).append(rule)
            if not now_rules and not pending:
                return  # nothing can apply to this flow: it keeps no state, later hooks return at once
            state = FlowFaults(pending=pending)
            self.states[flow.id] = state
            state.matched = self._select(flow, now_rules)
            if not self.control.admit(flow, state.matched):  # fault_max_active: passes untouched
                self.states.pop(flow.id, None)
                return
            if any(h.fault.streams_request for h in state.hits()) and not self._dry_run:
                stream_request_body(flow)
                # Now, not in `request`: with a streamed body mitmproxy runs that hook only after the
                # body has gone upstream (start_request_pipeline).
                request_stages = [s for h in state.hits() if (s := h.fault.request_stage(h)) is not None]
                if request_stages:
                    self._session(flow, state).start_request_pipeline(request_stages)
        except Exception:
            log.exception("faultproxy: matching failed for %s; the flow passes untouched", flow.request.pretty_url)
            self.states.pop(flow.id, None)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # A plain function on the common path (mitmproxy awaits what a hook returns): a flow with
        # nothing to do costs no coroutine. The same for responseheaders.
        if self.control.answer_rejected(flow):
            return None  # 400: the selection header named nothing loaded
        state = self.states.get(flow.id)
        if state is None or not state.matched or self.control.killed:
            return None
        return self._request(flow, state)

    async def _request(self, flow: http.HTTPFlow, state: FlowFaults) -> None:
        try:
            for hit in state.hits():
                if flow.response is not None or flow.error is not None:
                    break  # an earlier fault answered or refused the request
                if hit.dry_run:
                    if hit.fault.acts_on_request:
                        hit.record(f"would apply {hit.fault.kind}", phase="request")
                    continue
                await hit.fault.on_request(hit)
            if flow.response is not None:
                self.control.mark(flow, state.hits())
            if flow.response is not None or flow.error is not None or self._dry_run:
                return
            request_stages = [s for h in state.hits() if (s := h.fault.request_stage(h)) is not None]
            watches = [(h, w) for h in state.hits() if (w := h.fault.before_headers_watch(h)) is not None]
            if request_stages or watches:
                session = self._session(flow, state)
                session.note_request_sent()
                if request_stages:
                    session.start_request_pipeline(request_stages)
                for hit, (delay, fire) in watches:
                    session.watch_before_headers(delay, fire, f"{hit.fault.kind} watch")
        except Exception:
            log.exception("faultproxy: a fault failed on %s; the flow goes on", flow.request.pretty_url)

    def responseheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.metadata.pop(INJECTED_HEADERS, False):
            if (injected := self.states.get(flow.id)) is not None:
                self.control.mark(flow, injected.hits())
            return None  # headers the engine made up itself (a timeout's status answer)
        if wants_streaming(flow.response):
            flow.response.stream = True  # every live stream, faulted or not (engine.wants_streaming)
        state = self.states.get(flow.id)
        if state is None:
            return None
        return self._responseheaders(flow, state)

    async def _responseheaders(self, flow: http.HTTPFlow, state: FlowFaults) -> None:
        try:
            if state.session is not None:
                state.session.note_headers()
                if state.session.finished:
                    return
            if state.pending:
                late = [r for r in state.pending if r.matches_response(flow)]
                state.pending = []
                late_hits = self._select(flow, late)
                if self.control.admit(flow, late_hits):
                    state.matched.extend(late_hits)
            hits = [h for h in state.hits() if h.fault.applies_to_response(flow)]
            if self.control.killed and state.session is None:
                return  # kill switch: faults not acting yet stay off
            if self._dry_run:
                for h in hits:
                    if not h.fault.acts_on_request:
                        h.record(f"would apply {h.fault.kind}", phase="response")
                return
            self.control.mark(flow, hits)
            stages: list[Stage] = []
            for hit in hits:
                await hit.fault.on_response_headers(hit)
                if state.session is not None and state.session.finished:
                    self.control.mark(flow, hits)  # on the replacement
                    return  # the response was replaced
                if hit.fault.streams_response and (stage := hit.fault.body_stage(hit)) is not None:
                    stages.append(stage)
            if state.session is not None or stages:
                session = self._session(flow, state)
                if session.handle is None:
                    log.warning("faultproxy: %s is not a live stream; streaming faults skipped", flow.request.pretty_url)
                    return
                # Before the pipeline starts: mitmproxy 12 runs new tasks eagerly (up to their first
                # await), so a stage whose trigger has already fired would act as if no headers went out.
                session.mark_headers_sent()
                if stages:
                    flow.response.stream = True
                    session.start_pipeline(stages)
        except Exception:
            log.exception("faultproxy: a fault failed on %s; the flow goes on", flow.request.pretty_url)

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow, cancel=False)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow, cancel=True)

    def _forget(self, flow: http.HTTPFlow, cancel: bool) -> None:
        self.states.pop(flow.id, None)
        self.control.release(flow)
        session = self.sessions.pop(flow.id, None)
        if session is not None and cancel:
            session.cancel()

