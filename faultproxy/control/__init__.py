"""The control plane: hot reload, the control API, mitmproxy commands, schedules, per-request selection,
safety limits, metrics and passthrough of untargeted hosts.

Only the client is imported here (it needs nothing but the standard library); the addon side lives in
`plane` (mitmproxy hooks and commands), `api` (the HTTP listener), `reload`, `schedule`, `selection`
and `passthrough`.
"""

from __future__ import annotations

from .client import Control, ControlError

__all__ = ["Control", "ControlError"]
