"""faultproxy: a fault-injecting proxy built on mitmproxy for long-lived HTTP streams."""

__version__ = "0.1.0"
