"""Finding things in mitmproxy's layer stack: a flow's HttpStream and the HttpLayer that owns it, the
route through outer HttpLayers of CONNECT tunnels, the client-side h2 connection, and the upstream
connection that carries a stream's exchange right now.

    proxyserver.connections[client.id]          -> ConnectionHandler (server.py): transports, server_event()
      .layer  NextLayer -> ... -> HttpLayer     -> .streams {stream id: HttpStream}, .connections {conn: layer}
                                   HttpStream   -> .flow, ._handle_event (per-event entry point)
"""

from __future__ import annotations

import collections
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client
from mitmproxy.proxy.layers.http._http2 import Http2Client, Http2Server

from .checks import Checker

# --------------------------------------------------------------------------------------------------
# Finding a flow's stream


def _children(node: Any) -> list[Any]:
    out = []
    for attr in ("layer", "child_layer"):  # NextLayer.layer, tunnel/mode layers' child_layer
        child = getattr(node, attr, None)
        if isinstance(child, mlayer.Layer):
            out.append(child)
    # Layers that delegate by rebinding `_handle_event = child.handle_event` without keeping the
    # child in an attribute (modes.HttpProxy, HttpUpstreamProxy): the bound method's __self__.
    bound = node.__dict__.get("_handle_event") if hasattr(node, "__dict__") else None
    owner = getattr(bound, "__self__", None)
    if isinstance(owner, mlayer.Layer) and owner is not node:
        out.append(owner)
    return out


def find_stream(top: mlayer.Layer, flow: http.HTTPFlow) -> tuple[HttpLayer, HttpStream] | None:
    todo: collections.deque[Any] = collections.deque([top])
    seen: set[int] = set()
    while todo and len(seen) < 10_000:
        node = todo.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, HttpLayer):
            for stream in list(node.streams.values()):
                if getattr(stream, "flow", None) is flow:
                    return node, stream
                # CONNECT tunnels: the inner stack hangs below the tunnel's stream.
                child = getattr(stream, "child_layer", None)
                if isinstance(child, mlayer.Layer):
                    todo.append(child)
        todo.extend(_children(node))
    return None


def route_for(stream: HttpStream) -> dict[int, HttpStream]:
    """For every HttpLayer on the path from the top of the stack to `stream`: the stream to pass to."""
    route: dict[int, HttpStream] = {}
    chain = stream.context.layers
    for i, lay in enumerate(chain[:-1]):
        nxt = chain[i + 1]
        if isinstance(lay, HttpLayer) and isinstance(nxt, HttpStream):
            route[id(lay)] = nxt
    return route


def parent_layer(stream: HttpStream) -> HttpLayer | None:
    layers = stream.context.layers
    try:
        parent = layers[layers.index(stream) - 1]
    except (ValueError, IndexError):
        return None
    return parent if isinstance(parent, HttpLayer) else None


def client_h2(hl: HttpLayer) -> Http2Server | None:
    conn = hl.connections.get(hl.context.client)
    return conn if isinstance(conn, Http2Server) else None


def innermost_http_conn(layer_: Any) -> Any:
    # HttpLayer.connections[server] is the top of that connection's stack: HttpClient, or a
    # ServerTLSLayer / upstream-proxy layer above it. Their child_layer chains end at Http1Client/Http2Client.
    for _ in range(8):
        if isinstance(layer_, (Http1Client, Http2Client)) or layer_ is None:
            return layer_
        layer_ = getattr(layer_, "child_layer", None)
    return None


def exchange_connection(hl: HttpLayer, stream: HttpStream) -> tuple[Any, Any] | None:
    """(top layer, server connection) of the upstream connection that carries this stream's exchange
    right now, or None (not sent yet, finished, or the connection now serves another exchange).

    flow.server_conn alone is not enough: before make_server_connection() it is the HttpLayer's
    context server, which in reverse mode is the eagerly opened connection another stream may use."""
    server = stream.flow.server_conn
    top = hl.connections.get(server)
    if top is None or not server.connected or server in hl.waiting_for_establishment:
        return None
    inner = innermost_http_conn(top)
    if isinstance(inner, Http1Client) and inner.stream_id == stream.stream_id:
        return top, server
    if isinstance(inner, Http2Client) and stream.stream_id in inner.our_stream_id:
        return top, server
    return None



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    from mitmproxy.addons import proxyserver as ps_mod

    c.need(
        "self.connections" in c.src(ps_mod.Proxyserver) or hasattr(ps_mod.Proxyserver, "connections"),
        "addons.proxyserver.Proxyserver.connections (live handlers by client id) is gone",
    )
    CH = mserver.ConnectionHandler
    for name in ("server_event", "close_connection", "handle_connection"):
        c.need(hasattr(CH, name), f"proxy.server.ConnectionHandler.{name} is gone")
    c.need(hasattr(mlayer.NextLayer, "__init__") and "self.layer" in c.src(mlayer.NextLayer.__init__), "NextLayer.layer is gone")
    for name in ("streams", "connections", "waiting_for_establishment"):
        c.need(name in c.src(HttpLayer.__init__), f"HttpLayer.{name} is gone")
    c.need(hasattr(HttpLayer, "event_to_child"), "HttpLayer.event_to_child is gone")
