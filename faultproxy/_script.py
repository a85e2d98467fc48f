"""mitmdump script entry for an installed faultproxy: `mitmdump -s $(python -c ...)/_script.py`."""

from faultproxy.addon import FaultProxy

addons = [FaultProxy()]
