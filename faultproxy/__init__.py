"""faultproxy: a fault-injecting proxy built on mitmproxy for long-lived HTTP streams."""

from .control.client import Control, ControlError

__version__ = "0.1.0"

__all__ = ["Control", "ControlError", "__version__"]
