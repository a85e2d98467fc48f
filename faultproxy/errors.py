"""The one error type that bad profiles produce: every problem at once, each with file:line:column."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileIssue:
    source: str  # file path, or '<inline>' for profiles given as dicts
    line: int  # 1-based; 0 when unknown
    column: int  # 1-based; 0 when unknown
    field: str  # e.g. 'rules[0].faults[1].after'; '' for the document itself
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ProfileError(Exception):
    """A profile (or several) failed to load. `issues` holds every problem found, in file order."""

    def __init__(self, issues: list[ProfileIssue]):
        self.issues = sorted(issues, key=lambda i: (i.source, i.line, i.column))
        super().__init__("\n".join(str(i) for i in self.issues))
