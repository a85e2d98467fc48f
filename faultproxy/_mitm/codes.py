"""HTTP/2 error codes as mitmproxy's protocol-error events want them, and the mitmproxy version.

12.x: protocol-error events carry a `layers.http.ErrorCode` enum and assert on it; 11.x: they carry an
HTTP status int (400 client side, 502 server side, 499 = client closed request).
"""

from __future__ import annotations

import re
from typing import Any

import h2.connection
import h2.errors
from mitmproxy import version as _mitm_version
from mitmproxy.proxy.layers import http as mhttp

from .checks import Checker

MITMPROXY_VERSION: tuple[int, ...] = tuple(int(x) for x in re.findall(r"\d+", _mitm_version.VERSION)[:3])

# 12.x: protocol-error events carry a `layers.http.ErrorCode` enum and assert on it;
# 11.x: they carry an HTTP status int (400 client side, 502 server side, 499 = client closed request).
MitmErrorCode: Any = getattr(mhttp, "ErrorCode", None)

# --------------------------------------------------------------------------------------------------
# Error codes


def h2_error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def http2_error_code(code: int) -> Any:
    """The value a mitmproxy protocol-error event wants for an HTTP/2 error code, on this version.

    12.x: an `ErrorCode` member (CANCEL, HTTP_1_1_REQUIRED, else GENERIC_CLIENT_ERROR, which its
    Http2 layers turn into INTERNAL_ERROR); 11.x: an int status (499 turns into CANCEL, 400 into
    INTERNAL_ERROR). Used for the events that tell mitmproxy a stream is over on the client side.
    """
    if MitmErrorCode is not None:
        if code == h2.errors.ErrorCodes.CANCEL:
            return MitmErrorCode.CANCEL
        if code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED:
            return MitmErrorCode.HTTP_1_1_REQUIRED
        return MitmErrorCode.GENERIC_CLIENT_ERROR
    return 499 if code == h2.errors.ErrorCodes.CANCEL else 400


def client_gone_code() -> Any:
    # What mitmproxy itself uses when a client disconnects: the upstream side then gets CANCEL.
    return MitmErrorCode.CANCEL if MitmErrorCode is not None else 499


def server_error_code() -> Any:
    return MitmErrorCode.GENERIC_SERVER_ERROR if MitmErrorCode is not None else 502



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    if MITMPROXY_VERSION >= (12,):
        c.need(MitmErrorCode is not None, "mitmproxy >= 12 without layers.http.ErrorCode")
