"""Untargeted traffic passes through: which hosts mitmproxy need not intercept at all.

In regular and upstream proxy modes a client opens a CONNECT tunnel per host. mitmproxy decides per
connection whether to intercept it (TLS interception, HTTP parsing) or to relay the bytes untouched,
with its `ignore_hosts` / `allow_hosts` mechanism (addons/next_layer.py). It checks every name it knows
for the connection: the resolved peer address, the CONNECT target, the TLS SNI and the Host header,
each as `host:port`.

faultproxy uses the `allow_hosts` side: one pattern that matches the hosts some loaded rule could
match. `ignore_hosts` cannot express this, because a connection is ignored when *any* of its names
matches an ignore pattern, and the resolved peer address (127.0.0.1 for `localhost`) never matches a
rule's host glob, so a "not one of these hosts" pattern would ignore targeted hosts too. With
`allow_hosts` a connection is intercepted when any of its names matches.

A rule without a host condition can match every host: then everything is intercepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# A pattern that matches no host: with no rule loaded, no connection needs intercepting.
MATCH_NOTHING = "(?!)"


def glob_to_regex(glob: str) -> str | None:
    """A host glob (as rules match it: `*`, `?`, case-insensitive) as a regex; None if it uses [sets]."""
    if "[" in glob:
        return None
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def allow_patterns(rules: Iterable[Any]) -> list[str]:
    """mitmproxy `allow_hosts` for these rules: [] means intercept every host."""
    parts: list[str] = []
    any_rule = False
    for rule in rules:
        any_rule = True
        hosts = rule.model.match.host
        if not hosts:
            return []
        for glob in hosts:
            rx = glob_to_regex(glob)
            if rx is None:
                return []
            parts.append(rx)
    if not any_rule:
        return [MATCH_NOTHING]
    unique = sorted(set(parts))
    return [f"^(?:{'|'.join(unique)}):\\d+$"]


def modes_allow_passthrough(modes: Sequence[str]) -> bool:
    """Only regular and upstream modes: in reverse mode every connection goes to the one upstream,
    and there the rules' host conditions see the rewritten Host, not what a client connected to."""
    from mitmproxy.proxy import mode_specs

    if not modes:
        return False
    for spec in modes:
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError:
            return False
        if not isinstance(mode, (mode_specs.RegularMode, mode_specs.UpstreamMode)):
            return False
    return True
