"""`check_internals()`: every mitmproxy internal this package relies on, checked against the installed
mitmproxy. Each module owns its part (its `check()`); tests/test_mitm_internals.py fails with the
messages, naming what moved, when a mitmproxy release changes any of them."""

from __future__ import annotations

from . import alpn, codes, connections, dispatch, handle, limits, locate, ops, options, stream, transport, typecheck
from .checks import Checker

_MODULES = (codes, locate, stream, ops, handle, limits, connections, alpn, options, typecheck, dispatch, transport)


def check_internals() -> list[str]:
    """One message per mitmproxy internal that moved; empty when everything is where it was."""
    checker = Checker()
    for module in _MODULES:
        module.check(checker)
    return checker.problems
