"""The fault journal: one record per injected fault, in three places at once.

- the mitmproxy log (Python logging, which mitmproxy shows in mitmdump's output and mitmweb's event log)
- a JSON-lines file (`fault_log`), flushed per record so tests and tools can tail it
- the flow itself: marked and commented, so mitmweb shows which flows were hit and why

Records also go to subscribers (the control API's live stream). On shutdown, `summary()` gives a
table of how often each rule fired.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from mitmproxy import http

log = logging.getLogger("faultproxy")

Record = dict[str, Any]


def _timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def flow_fields(flow: http.HTTPFlow) -> dict[str, Any]:
    peer = flow.client_conn.peername
    return {
        "flow": flow.id,
        "client": f"{peer[0]}:{peer[1]}" if peer else None,
        "host": flow.request.pretty_host,
        "path": flow.request.path,
        "protocol": flow.request.http_version,
    }


class Journal:
    def __init__(self) -> None:
        self._file: TextIO | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()
        self.fired: Counter[tuple[str, str, str]] = Counter()  # (profile, rule, fault kind) -> records
        self.subscribers: list[Callable[[Record], None]] = []
        self.time_scale = 1.0

    def open(self, path: str | None) -> None:
        """Write records to this JSON-lines file from now on (None: to no file). Appends."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._path = Path(path) if path else None
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self._path.open("a", encoding="utf-8")

    def close(self) -> None:
        self.open(None)

    def record(
        self,
        flow: http.HTTPFlow,
        *,
        profile: str,
        rule: str,
        fault: str,
        params: dict[str, Any],
        outcome: str,
        dry_run: bool = False,
        **extra: Any,
    ) -> Record:
        """One fault injected on a flow: what it was (profile, rule, kind, parameters) and what the client saw."""
        rec: Record = {
            "time": _timestamp(),
            "ts": round(time.time(), 6),
            **flow_fields(flow),
            "profile": profile,
            "rule": rule,
            "fault": fault,
            "params": params,
            "outcome": outcome,
            "time_scale": self.time_scale,
            **({"dry_run": True} if dry_run else {}),
            **extra,
        }
        self.fired[(profile, rule, fault)] += 1
        self._mark_flow(flow, rec)
        log.info("[%s/%s] %s %s%s: %s", profile, rule, fault, rec["host"], rec["path"], outcome)
        self._emit(rec)
        return rec

    def event(self, event: str, message: str, **fields: Any) -> Record:
        """A record that is not a fault on a flow (a schedule window opening, a reload)."""
        rec: Record = {"time": _timestamp(), "ts": round(time.time(), 6), "event": event, "message": message, **fields}
        log.info("%s", message)
        self._emit(rec)
        return rec

    def _emit(self, rec: Record) -> None:
        line = json.dumps(rec, separators=(",", ":"), default=str)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        for subscriber in list(self.subscribers):
            try:
                subscriber(rec)
            except Exception:  # a broken listener must not break the traffic
                log.exception("journal subscriber failed")

    @staticmethod
    def _mark_flow(flow: http.HTTPFlow, rec: Record) -> None:
        # mitmweb shows marked flows with this emoji and the comment in the flow's details.
        flow.marked = ":warning:"
        note = f"faultproxy {rec['profile']}/{rec['rule']}: {rec['fault']} -> {rec['outcome']}"
        flow.comment = f"{flow.comment}\n{note}" if flow.comment else note

    def summary(self) -> str:
        """A table of how often each rule fired, for the end of a run."""
        if not self.fired:
            return "faultproxy: no fault fired"
        rows = [("profile", "rule", "fault", "fired")]
        rows += [(p, r, k, str(n)) for (p, r, k), n in sorted(self.fired.items())]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["faultproxy: faults fired"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) if j < 3 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
