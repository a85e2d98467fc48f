"""Entry for `mitmdump -s addons/faultproxy.py` from a checkout, whether faultproxy is installed or not."""

import sys
from pathlib import Path

# From a checkout, the package sits next to this folder; put it first so the checkout's code runs.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "faultproxy" / "__init__.py").is_file() and str(_checkout) not in sys.path:
    sys.path.insert(0, str(_checkout))

from faultproxy.addon import FaultProxy  # noqa: E402

addons = [FaultProxy()]
