"""What `check_internals()` is made of: each module of this package says, in its own `check()`, which
mitmproxy internals it relies on, by looking at the installed mitmproxy's source. A release that moves
one of them makes the check fail with a message naming it (tests/test_mitm_internals.py)."""

from __future__ import annotations

import inspect
from typing import Any


class Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def need(self, cond: bool, what: str) -> None:
        if not cond:
            self.problems.append(what)

    @staticmethod
    def src(obj: Any) -> str:
        """The source of a function, class or module; '' when there is none."""
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError):
            return ""
