"""faultproxy's own event, `Op`, and the wrapper on HttpLayer that routes it to one stream.

We do not use mitmproxy's `MessageInjected`: HttpLayer routes those by `flow.server_conn`, which fails
for HTTP/2 upstreams and after the stream finished (the KeyError in the facts file). An `Op` passes
every layer above the HttpLayer unchanged (tunnel/TLS/mode layers forward non-connection events to
their child) and is caught by a wrapper on the owning HttpLayer's `_handle_event` (and on outer
HttpLayers of CONNECT tunnels), which delivers it to exactly the right HttpStream object, or drops it
when that stream is gone. The operations: deliver an HTTP event, RST_STREAM, GOAWAY, abort the
upstream exchange, end the stream as if the client had given up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.errors
from hyperframe.frame import GoAwayFrame
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    RequestProtocolError,
)
from mitmproxy.proxy.layers.http._http2 import Http2Server

from .checks import Checker
from .codes import client_gone_code, h2_error_name
from .locate import client_h2, exchange_connection
from .stream import WRAPPED_ATTR, stream_state

log = logging.getLogger("faultproxy._mitm")

# --------------------------------------------------------------------------------------------------
# The injected event and the HttpLayer wrapper that routes it


class Op(events.Event):
    """An event only this module creates. Layers above the HttpLayer pass it down untouched."""

    def __init__(
        self, kind: str, owner: HttpLayer, target: HttpStream, route: dict[int, HttpStream], payload: Any = None
    ) -> None:
        self.kind = kind
        self.owner = owner  # the HttpLayer that holds the target stream
        self.target = target
        self.route = route  # outer HttpLayers (CONNECT tunnels) -> the stream to pass the op to
        self.payload = payload
        self.delivered = False
        self.result: Any = None

    def __repr__(self) -> str:
        return f"FaultproxyOp({self.kind}, stream={self.target.stream_id})"


def wrap_http_layer(hl: HttpLayer) -> None:
    """Wrap this HttpLayer instance's _handle_event once so that Op events reach the right stream."""
    if hl.__dict__.get(WRAPPED_ATTR):
        return
    orig = hl._handle_event

    def _handle_event(event: events.Event) -> mlayer.CommandGenerator[None]:
        if isinstance(event, Op):
            return _route_op(hl, event)
        return orig(event)

    hl._handle_event = _handle_event  # type: ignore[method-assign]
    setattr(hl, WRAPPED_ATTR, True)


def _route_op(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    try:
        if hl is op.owner:
            yield from OPS[op.kind](hl, op)
            return
        # An outer HttpLayer (CONNECT tunnel): pass it to the stream that carries the inner one.
        child = op.route.get(id(hl))
        if child is not None and hl.streams.get(child.stream_id) is child:
            yield from hl.event_to_child(child, op)
        # else: the tunnel is gone; drop silently (op.delivered stays False)
    except Exception:
        log.exception("faultproxy: %r failed", op)


def _target_alive(hl: HttpLayer, op: Op) -> bool:
    return hl.streams.get(op.target.stream_id) is op.target


def _op_event(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    """Deliver an HTTP event (already registered in the stream's `injected`) to the target stream."""
    ev: events.Event = op.payload
    if not _target_alive(hl, op):
        return
    op.delivered = True
    yield from hl.event_to_child(op.target, ev)


def _inject_client_error(hl: HttpLayer, stream: HttpStream, message: str) -> mlayer.CommandGenerator[None]:
    """Tell the stream the client side is over, as mitmproxy's own layers do on a client RST_STREAM:
    flow.error is set, the error hook runs, the upstream request is aborted (HTTP/1 upstream: the
    connection is closed; HTTP/2 upstream: its stream is reset with CANCEL), the stream is dropped."""
    ev = RequestProtocolError(stream.stream_id, message, client_gone_code())
    st = stream_state(stream)
    st.injected[id(ev)] = (ev, None)
    yield from hl.event_to_child(stream, ev)


def _op_client_error(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    """End the stream as if the client had given up (flow.error, error hook, upstream aborted), no frames.
    Delivered while the stream waits on a hook (the `request` hook), the event is queued behind it and
    mitmproxy's check_killed() ends the flow right after the hook, before the request goes upstream."""
    if not _target_alive(hl, op):
        return
    op.delivered = True
    yield from _inject_client_error(hl, op.target, op.payload)


def _op_reset(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    code: int = op.payload
    h2s = client_h2(hl)
    if h2s is None or not _target_alive(hl, op):
        return
    sid = op.target.stream_id
    if h2s.is_closed(sid):
        return
    try:
        h2s.h2_conn.reset_stream(sid, code)
    except Exception as e:  # h2 StreamClosedError / ProtocolError: the stream is over anyway
        log.debug("faultproxy: reset_stream(%s) refused by h2: %s", sid, e)
        return
    # Forget the stream in mitmproxy's client-side bookkeeping; later output for it is dropped
    # there (is_open_for_us is False for a closed h2 stream).
    h2s.streams.pop(sid, None)
    data = h2s.h2_conn.data_to_send()
    op.delivered = True
    if data:
        yield commands.SendData(hl.context.client, data)
    yield from _inject_client_error(hl, op.target, f"stream reset by faultproxy ({h2_error_name(code)})")


def _op_goaway(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    code, last, debug = op.payload
    h2s = client_h2(hl)
    if h2s is None:
        return
    conn = h2s.h2_conn
    if conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
        return
    if last is None:
        last = conn.highest_inbound_stream_id
    # Not h2's close_connection(): that moves h2's state machine to CLOSED, after which mitmproxy
    # drops all output (Http2Connection.is_open_for_us), so streams <= last_stream_id could not go on
    # during the grace period. A hand-built frame leaves h2's state as it is.
    frame = GoAwayFrame(0, last_stream_id=last, error_code=code, additional_data=debug)
    data = conn.data_to_send() + frame.serialize()
    op.delivered = True
    op.result = last
    yield commands.SendData(hl.context.client, data)
    # Streams above last_stream_id were "not processed" as far as the client now knows: end them on
    # our side the way a client abort ends them (flow error, upstream aborted), without frames.
    for sid, stream in list(hl.streams.items()):
        if sid > last and hl.streams.get(sid) is stream:
            yield from _inject_client_error(
                hl, stream, f"GOAWAY ({h2_error_name(code)}) by faultproxy, last_stream_id={last}"
            )


def _op_cancel_upstream(hl: HttpLayer, op: Op) -> mlayer.CommandGenerator[None]:
    """Abort this flow's upstream exchange through mitmproxy's own client-abort path: an HTTP/1
    upstream connection is closed, an HTTP/2 upstream gets RST_STREAM(CANCEL) on this flow's stream
    only (its connection is shared with other flows). Works after the client-side stream is done."""
    found = exchange_connection(hl, op.target)
    if found is None:
        return
    op.delivered = True
    sid = op.target.stream_id
    yield from hl.event_to_child(found[0], RequestProtocolError(sid, "upstream closed by faultproxy", client_gone_code()))


OPS: dict[str, Callable[[HttpLayer, Op], mlayer.CommandGenerator[None]]] = {
    "event": _op_event,
    "reset": _op_reset,
    "goaway": _op_goaway,
    "cancel_upstream": _op_cancel_upstream,
    "client_error": _op_client_error,
}



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    c.need(hasattr(Http2Server, "is_closed"), "Http2Connection.is_closed is gone")
    c.need("self.h2_conn" in c.src(mhttp._http2.Http2Connection.__init__), "Http2Connection.h2_conn is gone")
    c.need("self.streams" in c.src(mhttp._http2.Http2Connection.__init__), "Http2Connection.streams is gone")
