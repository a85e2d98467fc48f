"""Fault kinds: one module per kind (a Config model and a Fault class, Toxiproxy-style), registered by
name in `REGISTRY` (registry.py). Importing this package imports every kind, so the registry is full.

A new kind: add its module here and to the independence contract in pyproject.toml (kinds never
import each other; what they share lives in base.py).
"""

from __future__ import annotations

from . import abort, buffer, compress, cut, delay, downgrade, refuse, slice, stall, throttle, timeout  # noqa: F401  (they register)
from .base import Fault, FaultConfig, Hit
from .registry import REGISTRY, register

__all__ = ["Fault", "FaultConfig", "Hit", "REGISTRY", "register", "kinds"]


def kinds() -> dict[str, type[Fault]]:
    """Every registered kind, by name."""
    return REGISTRY
