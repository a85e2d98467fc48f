"""What faultproxy changes in how mitmproxy manages upstream connections, for every flow.

1. Upstream sockets left open when an HTTP/2 client disconnects (a mitmproxy bug in 11.0.2 and
   12.3.1): `install_upstream_close_fix` closes a connection's socket however handle_connection exits.
2. Finished upstream connections kept and scanned before every request, and one new upstream
   connection per request of an HTTP/2 client to an HTTP/1.1 upstream:
   `install_upstream_connection_management` forgets finished entries and reuses idle HTTP/1.1
   connections (`set_upstream_reuse(False)` restores one connection per request).
The reasons and measurements are in the comments of each section below.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers.http import (
    HttpLayer,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client

from .checks import Checker
from .locate import innermost_http_conn

# --------------------------------------------------------------------------------------------------
# Upstream sockets left open after a client disconnect (a mitmproxy bug, 11.0.2 and 12.3.1)
#
# ConnectionHandler.handle_connection closes a connection's socket only at its very end, after
# `await self.server_event(ConnectionClosed(...))`. When an HTTP/2 client with several streams goes
# away, each server connection's task is cancelled twice: once by the layers (CloseConnection from
# the streams' abort) and once by handle_client ("client disconnected"). If the task is waiting for
# the server-event lock at the second cancel, the CancelledError skips writer.close(): "server
# disconnect" is logged, but the socket stays open and keeps being read; the origin never sees EOF
# and an SSE upstream runs on forever. Measured here with plain mitmdump (no addon), two SSE streams
# over one h2 connection, client closes: both upstream connections stayed ESTABLISHED.
# The fix wraps handle_connection so that the socket is closed whenever it exits without doing it.


def install_upstream_close_fix() -> None:
    """Make mitmproxy close a connection's socket however handle_connection exits. Idempotent."""
    cls = mserver.ConnectionHandler
    if getattr(cls.handle_connection, "_faultproxy_patched", False):
        return
    orig = cls.handle_connection

    @functools.wraps(orig)
    async def handle_connection(self: Any, connection: Any) -> None:
        io = self.transports.get(connection)
        try:
            await orig(self, connection)
        finally:
            if io is not None and self.transports.get(connection) is io:
                # mitmproxy's own close (writer.close(); transports.pop()) was skipped.
                connection.state = ConnectionState.CLOSED
                try:
                    if io.writer is not None:
                        io.writer.close()
                except Exception:
                    pass
                self.transports.pop(connection, None)

    handle_connection._faultproxy_patched = True  # type: ignore[attr-defined]
    cls.handle_connection = handle_connection  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# Upstream connections of HTTP/2 clients: forget the finished ones, reuse the idle ones
#
# 1. HttpLayer.connections maps every server connection a client connection ever used to its layer
#    stack, and nothing removes an entry when the connection closes (mitmproxy 11.0.2 and 12.3.1).
#    One long-lived browser connection accumulates a dead entry -- with its TLS and HTTP/1 layers and
#    buffers -- per upstream connection, and HttpLayer.get_connection scans all of them
#    (connection_spec_matches on each) before every request. Measured with h2load -c4 -m4 on the lean
#    engine: get_connection was 27 % of the proxy's CPU after 10 s, growing with the connection's age.
#    We drop finished entries before a scan, amortised (only when the dict has doubled since the last
#    pass). "Finished": mitmproxy has delivered the connection's last event (timestamp_end is set only
#    after ConnectionClosed went through the layers), no live stream's flow uses it, nothing waits for
#    it to open, and it has no error (mitmproxy answers later requests for that address with it).
# 2. An HTTP/2 client's request to an HTTP/1.1 upstream gets a fresh upstream connection that is
#    closed after the one exchange (Http1Connection.mark_done: "we only use upstream connections for
#    one request"), so every request pays a TCP connect, a server_connect hook round and a close.
#    With `reuse` on, mark_done keeps such a connection open when HTTP/1.1 itself would (framed body,
#    no Connection: close), and get_connection hands an idle one (its Http1Client waits for the next
#    response head, no exchange on it) to the next request for the same address -- what h1 clients
#    already get from mitmproxy, and what nginx/Envoy do with an upstream keep-alive pool. Only
#    connections idle for less than REUSE_IDLE_MAX are reused, the older ones are closed: an origin
#    closes idle keep-alive connections on its own timer (Node.js after 5 s), and a request sent just
#    as that close arrives would fail with a 502 that faultproxy must not invent. FlowHandle's
#    upstream operations already act only on the exchange a connection is serving now
#    (exchange_connection), as they must for h1 clients' keep-alive.

REUSE_IDLE_MAX = 2.0  # seconds
_PRUNE_MIN = 16
_upstream_reuse = True


def set_upstream_reuse(enabled: bool) -> None:
    """Reuse idle HTTP/1.1 upstream connections for HTTP/2 clients (the default), or not (mitmproxy's
    one connection per request). Applies to requests from now on."""
    global _upstream_reuse
    _upstream_reuse = bool(enabled)


def _prune_finished_connections(layer_: Any) -> None:
    conns = layer_.connections
    ctx_ = layer_.context
    in_use = {id(s.flow.server_conn) for s in layer_.streams.values() if getattr(s, "flow", None) is not None}
    waiting = layer_.waiting_for_establishment
    for conn in [
        c
        for c in conns
        if c.timestamp_end is not None
        and c.error is None
        and c is not ctx_.client
        and c is not ctx_.server
        and id(c) not in in_use
        and c not in waiting
    ]:
        del conns[conn]
    layer_._faultproxy_prune_at = max(_PRUNE_MIN, 2 * len(conns))


def _idle_http1(top: Any) -> Any:
    """The Http1Client of an upstream connection with no exchange on it, or None."""
    inner = innermost_http_conn(top)
    if (
        isinstance(inner, Http1Client)
        and inner.stream_id is None
        and getattr(inner.state, "__func__", None) is Http1Client.read_headers
        and getattr(inner, "_faultproxy_idle_since", None) is not None
        and not inner.buf
    ):
        return inner
    return None


def _reuse_or_expire(layer_: Any, event: Any) -> tuple[Any, list[Any]]:
    """(an idle upstream connection for this request or None, idle connections too old to reuse)."""
    now = time.monotonic()
    expired = []
    waiting = layer_.waiting_for_establishment
    for conn, top in layer_.connections.items():
        if conn.state is not ConnectionState.OPEN or conn.alpn == b"h2" or conn in waiting:
            continue
        inner = _idle_http1(top)
        if inner is None or not event.connection_spec_matches(conn):
            continue
        if now - inner._faultproxy_idle_since > REUSE_IDLE_MAX:
            inner._faultproxy_idle_since = None  # closing: never offered again
            expired.append(conn)
            continue
        return conn, expired
    return None, expired


def _reuse_connection(layer_: Any, event: Any, conn: Any, expired: list[Any]) -> mlayer.CommandGenerator[None]:
    for old in expired:
        yield commands.CloseConnection(old)
    if conn is None:
        yield from _orig_get_connection(layer_, event)
        return
    # The same reply mitmproxy's own reuse path gives; the stream sends its request head on it before
    # this returns (Http1Client.send takes the stream id), so no other request can pick it meanwhile.
    stream = layer_.command_sources.pop(event)
    yield from layer_.event_to_child(stream, mhttp.GetHttpConnectionCompleted(event, (conn, None)))


_orig_get_connection: Any = None
_orig_mark_done: Any = None


def _get_connection(self: Any, event: Any, *, reuse: bool = True) -> Any:
    if len(self.connections) >= getattr(self, "_faultproxy_prune_at", _PRUNE_MIN):
        _prune_finished_connections(self)
    if reuse and _upstream_reuse and self.context.client.alpn == b"h2" and self.connections:
        conn, expired = _reuse_or_expire(self, event)
        if conn is not None or expired:
            return _reuse_connection(self, event, conn, expired)
    return _orig_get_connection(self, event, reuse=reuse)  # the generator itself: no extra layer


def _http1_client_mark_done(self: Any, *, request: bool = False, response: bool = False) -> mlayer.CommandGenerator[None]:
    req = self.request
    if not (_upstream_reuse and req is not None and req.is_http2):
        yield from _orig_mark_done(self, request=request, response=response)
        return
    # mitmproxy's mark_done closes the connection for any HTTP/2 request; for everything else it
    # applies HTTP/1.1's rules (read-until-EOF body, Connection: close, upgrades). It decides before
    # its first command, so the request reads as HTTP/1.1 -- what actually went upstream -- only for
    # that synchronous first step; no other code runs in between.
    data = req.data
    data.http_version = b"HTTP/1.1"
    try:
        done = _orig_mark_done(self, request=request, response=response)
        try:
            command = next(done)
        except StopIteration:
            command = None
    finally:
        data.http_version = b"HTTP/2.0"
    if self.stream_id is None and self.state == self.read_headers:
        self._faultproxy_idle_since = time.monotonic()
    if command is None:
        return
    while True:
        reply = yield command
        try:
            command = done.send(reply)
        except StopIteration:
            return


def install_upstream_connection_management() -> None:
    """Prune finished upstream connections; reuse idle HTTP/1.1 ones for HTTP/2 clients (see above). Idempotent."""
    global _orig_get_connection, _orig_mark_done
    if getattr(HttpLayer.get_connection, "_faultproxy_patched", False):
        return
    _orig_get_connection = HttpLayer.get_connection
    _orig_mark_done = Http1Client.mark_done
    _get_connection._faultproxy_patched = True  # type: ignore[attr-defined]
    HttpLayer.get_connection = _get_connection  # type: ignore[method-assign]
    Http1Client.mark_done = _http1_client_mark_done  # type: ignore[method-assign]



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    CH = mserver.ConnectionHandler
    hc_src = c.src(getattr(CH.handle_connection, "__wrapped__", CH.handle_connection))
    c.need(
        "await self.server_event(events.ConnectionClosed(connection))" in hc_src and "writer.close()" in hc_src,
        "ConnectionHandler.handle_connection changed: re-check install_upstream_close_fix",
    )
    get_conn = _orig_get_connection or HttpLayer.get_connection
    c.need(
        "h2_to_h1" in c.src(get_conn) and "connection_spec_matches" in c.src(get_conn),
        "HttpLayer.get_connection changed: re-check install_upstream_connection_management (reuse for h2 clients)",
    )
    mark_done = _orig_mark_done or Http1Client.mark_done
    c.need(
        "request.is_http2" in c.src(mark_done) and "isinstance(self, Http1Client)" in c.src(mark_done),
        "Http1Connection.mark_done no longer closes upstream connections of HTTP/2 requests: "
        "re-check install_upstream_connection_management",
    )
    c.need(
        "self.stream_id = None" in c.src(mark_done) and "self.state = self.read_headers" in c.src(mark_done),
        "Http1Connection.mark_done no longer resets an Http1Client for the next exchange (_idle_http1)",
    )
    c.need("timestamp_end" in c.src(mserver.ConnectionHandler.open_connection), "ConnectionHandler.open_connection no longer sets timestamp_end after the last event (pruning)")
