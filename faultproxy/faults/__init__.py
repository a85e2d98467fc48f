"""The registry of fault kinds, by name. A kind joins by decorating its class with `@register`."""

from __future__ import annotations

import importlib
from typing import TypeVar

from .base import Fault, FaultConfig, Hit

__all__ = ["Fault", "FaultConfig", "Hit", "REGISTRY", "register", "kinds"]

REGISTRY: dict[str, type[Fault]] = {}

F = TypeVar("F", bound=type[Fault])

# One module per kind; importing them fills the registry.
_KIND_MODULES = (
    "delay",
    "abort",
    "buffer",
    "compress",
    "throttle",
    "slice",
    "stall",
    "timeout",
    "cut",
    "refuse",
    "downgrade",
)


def register(cls: F) -> F:
    kind = cls.Config.model_fields["type"].annotation.__args__[0]  # Literal["delay"] -> "delay"
    if kind in REGISTRY:
        raise RuntimeError(f"fault kind {kind!r} registered twice")
    cls.kind = kind
    REGISTRY[kind] = cls
    return cls


_imported = False


def kinds() -> dict[str, type[Fault]]:
    """Every registered kind (importing the kind modules on first use)."""
    global _imported
    if not _imported:
        # A flag, not `if not REGISTRY`: a kind module imported directly (the addon imports downgrade
        # for its TLS hook) registers itself early and must not stop the others from loading.
        _imported = True
        for name in _KIND_MODULES:
            importlib.import_module(f"{__name__}.{name}")
    return REGISTRY
