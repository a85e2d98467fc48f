"""Entry for `mitmdump -s addons/faultproxy.py` from a checkout, whether faultproxy is installed or not."""

import sys
from pathlib import Path

# mitmproxy puts this script's folder first on sys.path while loading it, where this very file would
# shadow the faultproxy package. Take the folder out (mitmproxy restores sys.path afterwards) and, in
# a checkout, put the checkout first so its code is the one that runs.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
_checkout = _here.parent
if (_checkout / "faultproxy" / "__init__.py").is_file():
    sys.path.insert(0, str(_checkout))
if not hasattr(sys.modules.get("faultproxy"), "__path__"):
    sys.modules.pop("faultproxy", None)  # a stale non-package import of this file

from faultproxy.addon import FaultProxy  # noqa: E402

addons = [FaultProxy()]
