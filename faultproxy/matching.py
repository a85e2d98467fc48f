"""Rule matching: which loaded rules apply to a flow, compiled once per profile load.

Globs and regexes are compiled when profiles load, never per request. Conditions on the request are
checked at `requestheaders`; conditions on the response (status, response headers) when the
response headers arrive. The selection conditions (`probability`, `first`, `every`) count only the
flows that match everything else, so they are applied last, per rule, in arrival order.
"""

from __future__ import annotations

import fnmatch
import random
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from .engine import Hit
from .faults import REGISTRY, Fault
from .profile import LoadedProfile


def _glob_regex(patterns: Iterable[str], *, ignore_case: bool) -> re.Pattern[str]:
    joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)
    return re.compile(joined, re.IGNORECASE if ignore_case else 0)


_ENTROPY = random.Random()  # seeds the generators of flows when no seed is set


@dataclass
class RuleCounters:
    matched: int = 0  # flows that met every condition, selection included
    injected: int = 0  # faults actually applied (one flow may count several)
    skipped: int = 0  # matched, but passed untouched because of a safety limit or the kill switch


class RequestView:
    """The parts of a request rules look at, each read from mitmproxy at most once per request.

    `Request.pretty_host` parses the Host header (IDNA included) on every access: with several
    host-glob rules in a request's index bucket that was most of faultproxy's matching time."""

    __slots__ = ("request", "_host", "_path")

    def __init__(self, flow: http.HTTPFlow) -> None:
        self.request = flow.request
        self._host: str | None = None
        self._path: str | None = None

    @property
    def host(self) -> str:
        if self._host is None:
            self._host = self.request.pretty_host
        return self._host

    @property
    def path(self) -> str:
        """The path without the query string."""
        if self._path is None:
            self._path = self.request.path.split("?", 1)[0]
        return self._path


@dataclass
class CompiledRule:
    """One rule of one loaded profile, ready for fast matching."""

    profile: str
    name: str
    model: Any
    faults: list[Fault]
    seed: int | None
    loaded_at: float = field(default_factory=time.monotonic)
    enabled: bool = True
    counters: RuleCounters = field(default_factory=RuleCounters)
    _candidates: int = 0  # flows that matched all but the selection conditions
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        m = self.model.match
        self.enabled = self.model.enabled
        self._host = _glob_regex(m.host, ignore_case=True) if m.host else None
        self._path = _glob_regex(m.path, ignore_case=False) if m.path else None
        self._path_regex = re.compile(m.path_regex) if m.path_regex else None
        self._methods = frozenset(m.method) if m.method else None
        self._headers = [(k.lower(), _glob_regex([v], ignore_case=True)) for k, v in (m.headers or {}).items()]
        self._resp_headers = [
            (k.lower(), _glob_regex([v], ignore_case=True)) for k, v in (m.response_headers or {}).items()
        ]
        self._status = frozenset(m.status) if m.status else None
        self._versions = frozenset(m.http_version) if m.http_version else None
        self.needs_response = m.needs_response
        # Rules made only of connection-level faults (downgrade) act at the TLS handshake, never on flows.
        self.connection_only = bool(self.faults) and all(getattr(f, "connection_level", False) for f in self.faults)

    @property
    def key(self) -> str:
        return f"{self.profile}/{self.name}"

    def is_active(self, now: float | None = None) -> bool:
        if not self.enabled:
            return False
        schedule = self.model.active
        if schedule is None:
            return True
        return schedule.is_active((now if now is not None else time.monotonic()) - self.loaded_at)

    def matches_host(self, host: str | None) -> bool:
        """The rule's host condition alone (for connection-level faults: the TLS SNI)."""
        return self._host is None or (host is not None and self._host.match(host) is not None)

    def matches_request(self, flow: http.HTTPFlow, view: RequestView | None = None) -> bool:
        """`view`: share one RequestView across the rules tried on the same request."""
        req = flow.request
        if self._methods is not None and req.method.upper() not in self._methods:
            return False
        if view is None:
            view = RequestView(flow)
        if self._host is not None and not self._host.match(view.host):
            return False
        if self._path is not None or self._path_regex is not None:
            path = view.path
            if self._path is not None and not self._path.match(path):
                return False
            if self._path_regex is not None and not self._path_regex.search(path):
                return False
        if self._versions is not None and req.http_version not in self._versions:
            return False
        for name, pattern in self._headers:
            value = req.headers.get(name)
            if value is None or not pattern.match(value):
                return False
        return True

    def matches_response(self, flow: http.HTTPFlow) -> bool:
        resp = flow.response
        if resp is None:
            return False
        if self._status is not None and resp.status_code not in self._status:
            return False
        for name, pattern in self._resp_headers:
            value = resp.headers.get(name)
            if value is None or not pattern.match(value):
                return False
        return True

    def select(self, seed_override: int | None) -> random.Random | None:
        """Apply probability/first/every to a flow that matched the rest; its generator, or None."""
        m = self.model.match
        with self._lock:
            self._candidates += 1
            seq = self._candidates
        if m.first is not None and seq > m.first:
            return None
        if m.every is not None and seq % m.every != 0:
            return None
        seed = seed_override if seed_override is not None else self.seed
        # Keyed on (seed, rule, sequence): the same flow of the same rule draws the same numbers
        # whatever else runs concurrently. Without a seed, draws differ from run to run.
        # Unseeded: seeded from a process-wide generator (random.Random() would read 2.5 KB of
        # os.urandom for every flow).
        rng = random.Random(f"{seed}:{self.key}:{seq}") if seed is not None else random.Random(_ENTROPY.getrandbits(128))
        if m.probability is not None and rng.random() >= m.probability:
            return None
        self.counters.matched += 1
        return rng


@dataclass
class RuleHit:
    """A rule selected for a flow, with one Hit per fault of the rule."""

    rule: CompiledRule
    hits: list[Hit]


def compile_profiles(profiles: list[LoadedProfile]) -> list[CompiledRule]:
    rules: list[CompiledRule] = []
    now = time.monotonic()
    for profile in profiles:
        for rule in profile.rules:
            faults = [REGISTRY[cfg.type](cfg) for cfg in rule.faults]
            rules.append(CompiledRule(profile.name, rule.name, rule, faults, profile.seed, loaded_at=now))
    return rules


# --- the rule index ------------------------------------------------------------------------------
#
# Most requests through a fault proxy match no rule. Instead of trying every rule's conditions on
# every request, rules are bucketed when the profiles load by something a request states cheaply:
# the first segment of its path (`/v1/stream/*` can only match paths in `/v1/...`) or else the last
# label of its host (`*.example.com` only hosts ending in `.com`). A request then tries only the rules
# of its two buckets and the rules that could not be bucketed (no path or host condition, or one
# that starts with a wildcard). Bucketing is conservative: a rule goes in a bucket only when every
# request it can match has that key, so the candidates always include every rule that matches.

_GLOB_SPECIAL = frozenset("*?[]")
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_FIRST_SEGMENT = re.compile(r"/([^/?]*)")


def _glob_first_segment(glob: str) -> str | None:
    """The first path segment of every path this glob matches, or None if it can vary."""
    cut = next((i for i, ch in enumerate(glob) if ch in _GLOB_SPECIAL), len(glob))
    literal, whole = glob[:cut], cut == len(glob)
    if not literal.startswith("/"):
        return None
    end = literal.find("/", 1)
    if end != -1:
        return literal[1:end]
    return literal[1:] if whole else None


def _regex_first_segment(rx: str) -> str | None:
    """Same for a `path_regex` (searched, so only a `^`-anchored one without alternation has one)."""
    if not rx.startswith("^") or "|" in rx:
        return None
    out: list[str] = []
    i = 1
    while i < len(rx):
        ch = rx[i]
        if ch == "\\":
            nxt = rx[i + 1 : i + 2]
            if not nxt or nxt.isalnum():  # \d, \w, \b, ...: not a literal character
                break
            out.append(nxt)
            i += 2
            continue
        if ch in _REGEX_SPECIAL:
            if ch in "*?{" and out:
                out.pop()  # the character before is optional or repeated: not a sure prefix
            break
        out.append(ch)
        i += 1
    literal = "".join(out)
    if not literal.startswith("/"):
        return None
    end = literal.find("/", 1)
    return literal[1:end] if end != -1 else None


def _host_last_label(glob: str) -> str | None:
    label = glob.rsplit(".", 1)[-1]
    if any(ch in _GLOB_SPECIAL for ch in label):
        return None
    return label.lower()


def _bucket_keys(rule: CompiledRule) -> tuple[str, list[str]] | None:
    """("segment" | "label", keys) for a rule, or None if it must be tried on every request."""
    m = rule.model.match
    if m.path:
        segs = [_glob_first_segment(g) for g in m.path]
        if all(s is not None for s in segs):
            return "segment", [s for s in segs if s is not None]
    if m.path_regex:
        seg = _regex_first_segment(m.path_regex)
        if seg is not None:
            return "segment", [seg]
    if m.host:
        labels = [_host_last_label(g) for g in m.host]
        if all(lb is not None for lb in labels):
            return "label", [lb for lb in labels if lb is not None]
    return None


class RuleIndex:
    """Which rules a request can possibly match, in rule order; built once per rule set."""

    __slots__ = ("rules", "_by_segment", "_by_label", "_always", "indexed")

    def __init__(self, rules: list[CompiledRule]):
        self.rules = rules
        self._by_segment: dict[str, list[int]] = {}
        self._by_label: dict[str, list[int]] = {}
        self._always: list[int] = []
        for i, rule in enumerate(rules):
            keys = _bucket_keys(rule)
            if keys is None:
                self._always.append(i)
                continue
            table = self._by_segment if keys[0] == "segment" else self._by_label
            for key in dict.fromkeys(keys[1]):
                table.setdefault(key, []).append(i)
        self.indexed = len(rules) - len(self._always)

    def candidates(self, flow: http.HTTPFlow, view: RequestView | None = None) -> list[CompiledRule]:
        if not self.indexed:
            return self.rules
        if view is None:
            view = RequestView(flow)
        seg = _FIRST_SEGMENT.match(view.path)
        by_seg = self._by_segment.get(seg.group(1), ()) if seg is not None and self._by_segment else ()
        by_label = self._by_label.get(view.host.rsplit(".", 1)[-1].lower(), ()) if self._by_label else ()
        always = self._always
        if not by_seg and not by_label:
            if not always:
                return []
            picked: Iterable[int] = always
        elif not always and not by_label:
            picked = by_seg
        elif not always and not by_seg:
            picked = by_label
        else:
            picked = sorted({*by_seg, *by_label, *always})
        rules = self.rules
        return [rules[i] for i in picked]
