"""The one place in faultproxy that reaches into mitmproxy internals.

mitmproxy has no API for driving a response on an addon's own clock (stream callables run only when
upstream data arrives and are synchronous, mitmproxy issue 8103), for ending a stream in transit
(`flow.kill()` does nothing there, issue 4711), or for RST_STREAM / GOAWAY with a chosen code; and a
few of its behaviours cost a fault proxy dearly. Everything faultproxy does inside mitmproxy lives in
this package, one module per seam, each saying which mitmproxy behaviour it changes and why:

    handle       FlowHandle: a live flow's place in the connection machinery -- divert the upstream's
                 events, inject events, RST_STREAM, GOAWAY, close, pause the upstream socket
      stream       per-stream state and the wrapper on one HttpStream's event entry point
      ops          faultproxy's own event (`Op`) and the HttpLayer wrapper that routes it
      locate       finding a flow's stream and an exchange's upstream connection in the layer stack
      transport    pausing an upstream socket against asyncio's own resume
      messages     what a diverted stream's sink receives (faultproxy's types, no mitmproxy classes)
      codes        error codes and the differences between mitmproxy 11 and 12
    connections  upstream sockets closed when an HTTP/2 client leaves; finished upstream connections
                 forgotten; idle HTTP/1.1 upstream connections reused for HTTP/2 clients
    limits       more than 5 concurrent upstream connections per client connection
    typecheck    the per-message type check, same outcome at a fraction of the cost
    alpn         negotiating only http/1.1 with one client (downgrade)
    options      a `--set` value for a script's option that does not parse
    dispatch     hook dispatch for the lean engine
    internals    check_internals(): every internal above, checked against the installed mitmproxy

Everything here is guarded: a handle whose stream or connection is gone answers False / None and
never raises into the caller. The same internal names hold in mitmproxy 11.0.2 and 12.3.1.
"""

from __future__ import annotations

from typing import Any

from .alpn import set_client_alpn
from .codes import MITMPROXY_VERSION, client_gone_code, h2_error_name, http2_error_code, server_error_code
from .connections import (
    REUSE_IDLE_MAX,
    install_upstream_close_fix,
    install_upstream_connection_management,
    set_upstream_reuse,
)
from .dispatch import cache_hook_dispatch, install_lean_hook_handler, stop_legacy_log_events
from .handle import RST_AFTER_DATA_GAP, FlowHandle
from .internals import check_internals
from .limits import MITM_DEFAULT_UPSTREAM_CONNS, raise_stream_limits
from .messages import (
    ClientData,
    ClientEnd,
    ClientEvent,
    ClientTrailers,
    UpstreamData,
    UpstreamEnd,
    UpstreamError,
    UpstreamEvent,
    UpstreamHeaders,
    UpstreamTrailers,
)
from .options import drop_unparsable_deferred
from .typecheck import install_fast_message_typecheck

__all__ = [
    "MITMPROXY_VERSION",
    "MITM_DEFAULT_UPSTREAM_CONNS",
    "REUSE_IDLE_MAX",
    "RST_AFTER_DATA_GAP",
    "ClientData",
    "ClientEnd",
    "ClientEvent",
    "ClientTrailers",
    "FlowHandle",
    "UpstreamData",
    "UpstreamEnd",
    "UpstreamError",
    "UpstreamEvent",
    "UpstreamHeaders",
    "UpstreamTrailers",
    "cache_hook_dispatch",
    "check_internals",
    "client_gone_code",
    "drop_unparsable_deferred",
    "h2_error_name",
    "http2_error_code",
    "install",
    "install_fast_message_typecheck",
    "install_lean_hook_handler",
    "install_upstream_close_fix",
    "install_upstream_connection_management",
    "raise_stream_limits",
    "server_error_code",
    "set_client_alpn",
    "set_upstream_reuse",
    "stop_legacy_log_events",
]


def install(master_or_options: Any = None) -> None:
    """Every patch faultproxy makes to mitmproxy for all flows (both engines): the upstream close fix,
    upstream connection management, the cheap type check, and the raised stream limits. Idempotent."""
    install_upstream_close_fix()
    install_upstream_connection_management()
    install_fast_message_typecheck()
    raise_stream_limits(master_or_options)
