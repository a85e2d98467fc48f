"""The registry of fault kinds, by name. A kind joins by decorating its class with `@register`."""

from __future__ import annotations

from typing import TypeVar

from .base import Fault

REGISTRY: dict[str, type[Fault]] = {}

F = TypeVar("F", bound=type[Fault])


def register(cls: F) -> F:
    kind = cls.Config.model_fields["type"].annotation.__args__[0]  # Literal["delay"] -> "delay"
    if kind in REGISTRY:
        raise RuntimeError(f"fault kind {kind!r} registered twice")
    cls.kind = kind
    REGISTRY[kind] = cls
    return cls
