"""`--set` values for a script's options that do not parse.

mitmdump keeps a `--set` value for an option no addon has declared yet and parses it when a script
declares it (OptManager.process_deferred). A value that does not parse raises out of the script's
loading, which mitmproxy swallows: the script is not loaded, nothing is printed, and the proxy serves on
without faults. `drop_unparsable_deferred` turns that into an error message the addon logs.
"""

from __future__ import annotations

from typing import Any

from .checks import Checker

# --------------------------------------------------------------------------------------------------
# --set values for a script's options
#
# mitmdump keeps a --set value for an option no addon has declared yet and parses it when a script
# declares it (OptManager.process_deferred, from AddonManager.register). A value that does not parse
# raises OptionsError out of Script.loadscript, which safecall re-raises: the script is not loaded,
# nothing is printed, and the proxy serves on without it.


def drop_unparsable_deferred(options: Any, prefix: str) -> list[str]:
    """For declared options named `prefix*` with a deferred --set value that does not parse: drop the
    value (the option keeps its default) and return one message each. Call from an addon's load()."""
    from mitmproxy import exceptions

    messages = []
    deferred = getattr(options, "deferred", None) or {}
    for name in [n for n in deferred if n.startswith(prefix) and n in options._options]:
        raw = getattr(deferred[name], "val", None)
        if raw is None:
            continue  # a typed value set from code, not a string from the command line
        try:
            options._parse_setval(options._options[name], raw)
        except exceptions.OptionsError as e:
            del deferred[name]
            messages.append(f"--set {name}={' '.join(raw)}: {e}")
    return messages



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    from mitmproxy import optmanager

    c.need(
        "_parse_setval" in c.src(optmanager.OptManager.process_deferred) and "_UnconvertedStrings" in c.src(optmanager),
        "OptManager.process_deferred changed: re-check drop_unparsable_deferred",
    )
