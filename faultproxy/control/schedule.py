"""Schedule windows (`active: {after, for, every}`): journal each window opening and closing.

Whether a rule is active is decided per flow by `CompiledRule.is_active` from the clock; this module
only *reports* the windows. It sleeps until the next boundary of any scheduled rule (computed
exactly, not polled) and journals a `window_open` / `window_close` record for each change, with the
window's number and where in the schedule it fell, so a run's journal shows when each fault was on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..journal import Journal
    from ..matching import CompiledRule

log = logging.getLogger("faultproxy")

_EPS = 1e-6


def window_index(schedule: Any, elapsed: float) -> int:
    if elapsed < schedule.after or not schedule.every:
        return 0
    return int((elapsed - schedule.after) // schedule.every)


def next_boundary(schedule: Any, elapsed: float) -> float | None:
    """The first time (seconds since load) after `elapsed` at which the window state can change."""
    after, length, every = schedule.after, schedule.for_, schedule.every
    if elapsed < after - _EPS:
        return after
    since = elapsed - after
    if every:
        if length is None or length >= every:
            return None  # once open, always open
        k = math.floor(since / every)
        start = after + k * every
        close = start + length
        return close if close > elapsed + _EPS else start + every
    if length is not None and after + length > elapsed + _EPS:
        return after + length
    return None


def describe(schedule: Any) -> str:
    parts = [f"after {schedule.after:g}s"]
    if schedule.for_ is not None:
        parts.append(f"for {schedule.for_:g}s")
    if schedule.every:
        parts.append(f"every {schedule.every:g}s")
    return ", ".join(parts)


class WindowReporter:
    """One task on the proxy's loop; `reset()` when the rule set changes."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.rules: list[CompiledRule] = []
        self.open: dict[int, int] = {}  # id(rule) -> window number, for windows open now
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def reset(self, rules: list[CompiledRule]) -> None:
        """A new rule set: the windows of the old one close (reported), the new ones start at their load."""
        for rule in self.rules:
            if id(rule) in self.open:
                self._emit(rule, False, self.open.pop(id(rule)), time.monotonic() - rule.loaded_at, reason="unloaded")
        self.rules = [r for r in rules if r.model.active is not None]
        self.open = {}
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="faultproxy schedule windows")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def state(self, rule: CompiledRule) -> str | None:
        """'open' / 'closed' for a scheduled rule, None for one without a schedule."""
        if rule.model.active is None:
            return None
        return "open" if rule.model.active.is_active(time.monotonic() - rule.loaded_at) else "closed"

    def check(self, now: float | None = None) -> float | None:
        """Report changes up to now; the monotonic time of the next boundary, if any."""
        now = time.monotonic() if now is None else now
        upcoming: float | None = None
        for rule in self.rules:
            schedule = rule.model.active
            elapsed = now - rule.loaded_at
            is_open = schedule.is_active(elapsed)
            was_open = id(rule) in self.open
            if is_open and not was_open:
                self.open[id(rule)] = window_index(schedule, elapsed)
                self._emit(rule, True, self.open[id(rule)], elapsed)
            elif was_open and not is_open:
                self._emit(rule, False, self.open.pop(id(rule)), elapsed)
            nxt = next_boundary(schedule, elapsed)
            if nxt is not None:
                at = rule.loaded_at + nxt
                upcoming = at if upcoming is None else min(upcoming, at)
        return upcoming

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                upcoming = self.check()
            except Exception:  # never let a reporting bug stop the proxy
                log.exception("faultproxy: schedule reporting failed")
                upcoming = time.monotonic() + 1.0
            self._wake.clear()
            timeout = None if upcoming is None else max(0.0, upcoming - time.monotonic()) + 0.0005
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _emit(self, rule: CompiledRule, opened: bool, window: int, elapsed: float, **extra: Any) -> None:
        schedule = rule.model.active
        start = schedule.after + window * (schedule.every or 0)
        boundary = start if opened else start + (schedule.for_ or 0)
        verb = "opened" if opened else "closed"
        self.journal.event(
            "window_open" if opened else "window_close",
            f"faultproxy: [{rule.key}] schedule window {window} {verb} ({describe(schedule)})",
            profile=rule.profile,
            rule=rule.name,
            window=window,
            at=round(elapsed, 6),  # seconds since the rule was loaded
            scheduled_at=round(boundary, 6) if not extra else None,
            **extra,
        )
