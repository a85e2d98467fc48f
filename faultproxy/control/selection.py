"""Per-request selection (`fault_select_header`): a request names the profiles or rules it wants.

Header syntax, comma-separated items, any mix:

    x-fault: h2-rst-stream                 a loaded profile (or, if no profile has that name, a rule)
    x-fault: profile=h2-rst-stream         a loaded profile
    x-fault: rule=read-timeout             every loaded rule of that name
    x-fault: rule=h2-rst-stream/reset      one rule, by its `profile/rule` key
    x-fault: none                          no fault at all for this request

The selection narrows the loaded rules; each selected rule still has to match the flow, be enabled
and be in its schedule window. A name that no loaded profile or rule has is an error (the proxy
answers 400), so a typo in a test never passes silently as "no fault".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..matching import CompiledRule

NONE_WORDS = frozenset({"none", "off"})


class SelectionError(ValueError):
    pass


def _known(rules: list[CompiledRule]) -> str:
    profiles = sorted({r.profile for r in rules})
    keys = [r.key for r in rules]
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"loaded profiles: {', '.join(profiles) or 'none'}; rules: {shown or 'none'}"


def resolve(header: str, value: str, rules: list[CompiledRule]) -> list[CompiledRule]:
    """The rules a header value selects, in load order. Raises SelectionError with a readable message."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise SelectionError(f"{header} is empty: name a profile, rule=NAME, or 'none'")
    profiles = {r.profile for r in rules}
    chosen: set[int] = set()
    for item in items:
        kind, sep, name = item.partition("=")
        if not sep:
            kind, name = "", item
        kind, name = kind.strip().lower(), name.strip()
        if not sep and name.lower() in NONE_WORDS:
            continue
        if kind not in ("", "profile", "rule"):
            raise SelectionError(
                f"{header}: unknown selector {kind!r} in {item!r}: use NAME, profile=NAME or rule=NAME ({_known(rules)})"
            )
        found: list[CompiledRule] = []
        if kind in ("", "profile") and name in profiles:
            found = [r for r in rules if r.profile == name]
        elif kind in ("", "rule"):
            found = [r for r in rules if r.key == name] or [r for r in rules if r.name == name]
        if not found:
            what = {"profile": "profile", "rule": "rule"}.get(kind, "profile or rule")
            raise SelectionError(f"{header}: no loaded {what} named {name!r} ({_known(rules)})")
        chosen.update(id(r) for r in found)
    return [r for r in rules if id(r) in chosen]
