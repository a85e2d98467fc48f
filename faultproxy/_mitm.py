"""The one place in faultproxy that reaches into mitmproxy internals.

mitmproxy has no API for driving a response on an addon's own clock (stream callables run only when
upstream data arrives and are synchronous, mitmproxy issue 8103), for ending a stream in transit
(`flow.kill()` does nothing there, issue 4711), or for RST_STREAM / GOAWAY with a chosen code. This
module gets all of that from the sans-IO layer machinery, which has the same shape in 11.0.2 and 12.x:

    proxyserver.connections[client.id]          -> ConnectionHandler (server.py): transports, server_event()
      .layer  NextLayer -> ... -> HttpLayer     -> .streams {stream id: HttpStream}, .connections {conn: layer}
                                   HttpStream   -> .flow, ._handle_event (per-event entry point)

How it works, and why this way:

* Diverting: `Layer.handle_event` calls `self._handle_event(event)` through the instance, so an
  instance attribute on one `HttpStream` sees every event of that stream, including events replayed
  after a blocking hook. The wrapper hands upstream response events to a sink instead of mitmproxy.
* Injecting: we do not use `MessageInjected`: `HttpLayer` routes those by `flow.server_conn`, which
  fails for HTTP/2 upstreams and after the stream finished (the KeyError in the facts file). Our own
  event class (`_Op`) passes every layer above the `HttpLayer` unchanged (tunnel/TLS/mode layers
  forward non-connection events to their child) and is caught by a wrapper on the owning
  `HttpLayer._handle_event` (and on outer HttpLayers of CONNECT tunnels), which delivers it to
  exactly the right `HttpStream` object, or drops it when that stream is gone. We await
  `handler.server_event(op)` ourselves: it runs the layer stack synchronously under mitmproxy's
  event lock and writes the resulting bytes to the transports before it returns.
* RST_STREAM / GOAWAY: written with the client-side `Http2Server.h2_conn` (the h2 library) from
  inside that HttpLayer wrapper, so the frames go up through the TLS layer like any other output.

Everything here is guarded: a handle whose stream or connection is gone answers False / None and
never raises into the caller. `check_internals()` lists what moved when a mitmproxy release changes
any of this (tests/test_mitm_internals.py fails with those messages).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import re
import socket
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import h2.connection
import h2.errors
from hyperframe.frame import GoAwayFrame
from mitmproxy import ctx, http
from mitmproxy import flow as mflow
from mitmproxy import version as _mitm_version
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client
from mitmproxy.proxy.layers.http._http2 import Http2Client, Http2Server
from mitmproxy.utils import typecheck

log = logging.getLogger(__name__)

MITMPROXY_VERSION: tuple[int, ...] = tuple(int(x) for x in re.findall(r"\d+", _mitm_version.VERSION)[:3])

# 12.x: protocol-error events carry a `layers.http.ErrorCode` enum and assert on it;
# 11.x: they carry an HTTP status int (400 client side, 502 server side, 499 = client closed request).
_ErrorCode: Any = getattr(mhttp, "ErrorCode", None)

# Chromium sometimes drops the last DATA frame of a stream when RST_STREAM follows in the same
# moment (2 of 3 runs on 11.0.2, facts file); "a few tens of milliseconds" between the last data and
# the reset made every run deliver every event. reset_stream() therefore (1) waits until everything
# injected before it has been processed, (2) waits until the client socket's write buffer is empty
# (handed to the kernel), and (3) keeps at least this gap after the last DATA of the stream.
RST_AFTER_DATA_GAP = 0.05
# Upper bound for (1)+(2): if the stream stays paused on a slow hook, reset anyway after this long.
SETTLE_TIMEOUT = 2.0

# mitmproxy.proxy.server.ConnectionHandler: `max_conns = defaultdict(lambda: asyncio.Semaphore(5))`.
MITM_DEFAULT_UPSTREAM_CONNS = 5


# --------------------------------------------------------------------------------------------------
# What a sink receives (faultproxy's own types, so no mitmproxy event class leaks out of this module)


@dataclass
class UpstreamHeaders:
    response: http.Response
    end_stream: bool = False  # the upstream said there is no body; an UpstreamEnd still follows


@dataclass
class UpstreamData:
    data: bytes


@dataclass
class UpstreamTrailers:
    trailers: http.Headers


@dataclass
class UpstreamEnd:
    pass


@dataclass
class UpstreamError:
    message: str


UpstreamEvent = Union[UpstreamHeaders, UpstreamData, UpstreamTrailers, UpstreamEnd, UpstreamError]


@dataclass
class ClientData:
    data: bytes


@dataclass
class ClientTrailers:
    trailers: http.Headers


@dataclass
class ClientEnd:
    pass


ClientEvent = Union[ClientData, ClientTrailers, ClientEnd]


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
    if _ErrorCode is not None:
        if code == h2.errors.ErrorCodes.CANCEL:
            return _ErrorCode.CANCEL
        if code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED:
            return _ErrorCode.HTTP_1_1_REQUIRED
        return _ErrorCode.GENERIC_CLIENT_ERROR
    return 499 if code == h2.errors.ErrorCodes.CANCEL else 400


def _client_gone_code() -> Any:
    # What mitmproxy itself uses when a client disconnects: the upstream side then gets CANCEL.
    return _ErrorCode.CANCEL if _ErrorCode is not None else 499


def _server_error_code() -> Any:
    return _ErrorCode.GENERIC_SERVER_ERROR if _ErrorCode is not None else 502


# --------------------------------------------------------------------------------------------------
# Per-stream state, kept on the HttpStream object itself (dies with it)

_STATE_ATTR = "_faultproxy_state"
_WRAPPED_ATTR = "_faultproxy_wrapped"

_UPSTREAM_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage, ResponseProtocolError)
_CLIENT_BODY_EVENTS = (RequestData, RequestTrailers, RequestEndOfMessage)

# Responses whose headers this module injected (see FlowHandle.injecting). Identity-hashed, weak.
_INJECTED_RESPONSES: weakref.WeakSet[http.Response] = weakref.WeakSet()


class _StreamState:
    def __init__(self) -> None:
        self.upstream_sink: Callable[[UpstreamEvent], None] | None = None
        self.request_sink: Callable[[ClientEvent], None] | None = None
        self.upstream_muted = False  # after close_upstream(): the sink hears nothing more
        self.upstream_done = False  # UpstreamEnd or UpstreamError was seen (diverted flows only)
        self.held_headers: http.Response | None = None
        # id(event) -> (event, future or None): events this module injected; they pass the wrapper.
        self.injected: dict[int, tuple[events.Event, asyncio.Future[bool] | None]] = {}
        self.pending: set[asyncio.Future[bool]] = set()
        self.last_data_at = 0.0  # time.monotonic() of the last ResponseData processed for the client
        self.pause_wanted = False
        self.paused_transport: asyncio.Transport | None = None
        self.pauser: Callable[[], None] | None = None  # FlowHandle._apply_pause, for a deferred pause
        self.client_gave_up: asyncio.Future[None] | None = None
        self.goaway_last_stream_id: int | None = None
        self.last_frame: dict[str, Any] | None = None  # what reset_stream/goaway/refuse put on the wire


def _resolve(fut: asyncio.Future[Any] | None, value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)


def _state_name(fn: Any) -> str:
    # HttpStream states are bound methods; @expect keeps __name__ through functools.wraps.
    return getattr(fn, "__name__", "")


def _accepts(stream: HttpStream, event: events.Event) -> bool:
    """Would the stream's current state take this injected event? (Else its @expect raises.)"""
    if isinstance(event, ResponseHeaders):
        return _state_name(stream.server_state) == "state_wait_for_response_headers"
    if isinstance(event, (ResponseData, ResponseTrailers, ResponseEndOfMessage)):
        return _state_name(stream.server_state) in ("state_stream_response_body", "state_consume_response_body")
    if isinstance(event, _CLIENT_BODY_EVENTS):
        return _state_name(stream.client_state) in ("state_stream_request_body", "state_consume_request_body")
    return True  # protocol errors are handled in every state


def _stream_state(stream: HttpStream) -> _StreamState:
    """Install (once) the wrapper on this HttpStream instance's _handle_event and return its state."""
    st: _StreamState | None = stream.__dict__.get(_STATE_ATTR)
    if st is not None:
        return st
    st = _StreamState()
    orig = stream._handle_event  # the class's bound method (or whatever mitmproxy set on the instance)

    def _handle_event(event: events.Event) -> mlayer.CommandGenerator[None]:
        entry = st.injected.pop(id(event), None)
        if entry is not None:
            return _run_injected(stream, st, orig, event, entry[1])
        if isinstance(event, _UPSTREAM_EVENTS):
            if st.pause_wanted and st.paused_transport is None and st.pauser is not None:
                st.pauser()  # asked before the request went upstream: the connection is known now
            if st.upstream_sink is not None or st.upstream_muted:
                return _divert_upstream_event(stream, st, event)
        if isinstance(event, _CLIENT_BODY_EVENTS) and st.request_sink is not None:
            return _divert_client_event(st, event)
        if isinstance(event, RequestProtocolError):
            # The client reset the stream or went away: "the client gave up" for wait_client_closed().
            if st.client_gave_up is not None:
                _resolve(st.client_gave_up, None)
        elif isinstance(event, ResponseData):
            st.last_data_at = time.monotonic()
        return orig(event)

    stream._handle_event = _handle_event  # type: ignore[method-assign]
    setattr(stream, _STATE_ATTR, st)
    return st


def _run_injected(
    stream: HttpStream,
    st: _StreamState,
    orig: Callable[[events.Event], mlayer.CommandGenerator[None]],
    event: events.Event,
    fut: asyncio.Future[bool] | None,
) -> mlayer.CommandGenerator[None]:
    ok = False
    try:
        if _accepts(stream, event):
            # May suspend here on a blocking hook (responseheaders for injected headers); the
            # future resolves once the hook is done and the event fully processed.
            yield from orig(event)
            ok = True
            if isinstance(event, ResponseData):
                st.last_data_at = time.monotonic()
            elif isinstance(event, _ENDING_EVENTS) and st.upstream_sink is not None and not st.upstream_done:
                # We ended the client side of a diverted flow whose upstream response is still
                # running: nobody reads it any more, abort it. Done here, after the end has really
                # been processed, because when the injection was queued behind a hook the request
                # may only have gone upstream in the meantime.
                yield from _abort_upstream(stream, st)
        else:
            log.debug("faultproxy: dropped injected %s in state %s", type(event).__name__, stream)
    except Exception:
        log.exception("faultproxy: injected %s failed on stream %s", type(event).__name__, stream.stream_id)
    finally:
        _resolve(fut, ok)


def _inside_hook_of(stream: HttpStream) -> bool:
    """Is the current task the hook task the stream is paused on?

    mitmproxy runs each blocking hook in a task named "handle_hook(<hook name>)" (server.py,
    ConnectionHandler.server_event; under pytest a suffix is added). If the stream waits for such a
    hook and we are running in a task of that name, an addon is calling us from inside the hook.
    """
    paused = getattr(stream, "_paused", None)
    command = getattr(paused, "command", None)
    if not isinstance(command, commands.StartHook):
        return False
    task = asyncio.current_task()
    return task is not None and task.get_name().startswith(f"handle_hook({command.name})")


_ENDING_EVENTS = (ResponseEndOfMessage, ResponseProtocolError, RequestProtocolError)


def _parent_layer(stream: HttpStream) -> HttpLayer | None:
    layers = stream.context.layers
    try:
        parent = layers[layers.index(stream) - 1]
    except (ValueError, IndexError):
        return None
    return parent if isinstance(parent, HttpLayer) else None


def _abort_upstream(stream: HttpStream, st: _StreamState) -> mlayer.CommandGenerator[None]:
    """From inside the stream: abort its upstream exchange the way mitmproxy does on a client abort
    (SendHttp(RequestProtocolError) to the server connection: HTTP/1 closes it, HTTP/2 resets the stream)."""
    hl = _parent_layer(stream)
    found = _exchange_connection(hl, stream) if hl is not None else None
    st.upstream_muted = True
    if found is not None:
        yield mhttp.SendHttp(
            RequestProtocolError(stream.stream_id, "upstream closed by faultproxy", _client_gone_code()), found[1]
        )


def _divert_upstream_event(stream: HttpStream, st: _StreamState, event: events.Event) -> mlayer.CommandGenerator[None]:
    if st.upstream_muted or st.upstream_sink is None:
        return
    out: UpstreamEvent
    if isinstance(event, ResponseHeaders):
        st.held_headers = event.response
        out = UpstreamHeaders(event.response, bool(event.end_stream))
    elif isinstance(event, ResponseData):
        out = UpstreamData(event.data)
    elif isinstance(event, ResponseTrailers):
        out = UpstreamTrailers(event.trailers)
    elif isinstance(event, ResponseEndOfMessage):
        st.upstream_done = True
        out = UpstreamEnd()
    else:
        assert isinstance(event, ResponseProtocolError)
        st.upstream_done = True
        out = UpstreamError(event.message)
    try:
        st.upstream_sink(out)
    except Exception:
        log.exception("faultproxy: upstream sink failed on stream %s", stream.stream_id)
    yield from ()


def _divert_client_event(st: _StreamState, event: events.Event) -> mlayer.CommandGenerator[None]:
    out: ClientEvent
    if isinstance(event, RequestData):
        out = ClientData(event.data)
    elif isinstance(event, RequestTrailers):
        out = ClientTrailers(event.trailers)
    else:
        out = ClientEnd()
    try:
        assert st.request_sink is not None
        st.request_sink(out)
    except Exception:
        log.exception("faultproxy: request sink failed")
    yield from ()


# --------------------------------------------------------------------------------------------------
# The injected event and the HttpLayer wrapper that routes it


class _Op(events.Event):
    """An event only this module creates. Layers above the HttpLayer pass it down untouched."""

    def __init__(self, kind: str, handle: FlowHandle, payload: Any = None) -> None:
        self.kind = kind
        self.owner = handle._layer
        self.target = handle._stream
        self.route = handle._route
        self.handle = handle
        self.payload = payload
        self.delivered = False
        self.result: Any = None

    def __repr__(self) -> str:
        return f"FaultproxyOp({self.kind}, stream={self.target.stream_id})"


def _wrap_http_layer(hl: HttpLayer) -> None:
    """Wrap this HttpLayer instance's _handle_event once so that _Op events reach the right stream."""
    if hl.__dict__.get(_WRAPPED_ATTR):
        return
    orig = hl._handle_event

    def _handle_event(event: events.Event) -> mlayer.CommandGenerator[None]:
        if isinstance(event, _Op):
            return _route_op(hl, event)
        return orig(event)

    hl._handle_event = _handle_event  # type: ignore[method-assign]
    setattr(hl, _WRAPPED_ATTR, True)


def _route_op(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
    try:
        if hl is op.owner:
            yield from _OPS[op.kind](hl, op)
            return
        # An outer HttpLayer (CONNECT tunnel): pass it to the stream that carries the inner one.
        child = op.route.get(id(hl))
        if child is not None and hl.streams.get(child.stream_id) is child:
            yield from hl.event_to_child(child, op)
        # else: the tunnel is gone; drop silently (op.delivered stays False)
    except Exception:
        log.exception("faultproxy: %r failed", op)


def _target_alive(hl: HttpLayer, op: _Op) -> bool:
    return hl.streams.get(op.target.stream_id) is op.target


def _op_event(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
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
    ev = RequestProtocolError(stream.stream_id, message, _client_gone_code())
    st = _stream_state(stream)
    st.injected[id(ev)] = (ev, None)
    yield from hl.event_to_child(stream, ev)


def _op_client_error(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
    """End the stream as if the client had given up (flow.error, error hook, upstream aborted), no frames.
    Delivered while the stream waits on a hook (the `request` hook), the event is queued behind it and
    mitmproxy's check_killed() ends the flow right after the hook, before the request goes upstream."""
    if not _target_alive(hl, op):
        return
    op.delivered = True
    yield from _inject_client_error(hl, op.target, op.payload)


def _client_h2(hl: HttpLayer) -> Http2Server | None:
    conn = hl.connections.get(hl.context.client)
    return conn if isinstance(conn, Http2Server) else None


def _op_reset(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
    code: int = op.payload
    h2s = _client_h2(hl)
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


def _op_goaway(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
    code, last, debug = op.payload
    h2s = _client_h2(hl)
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


def _innermost_http_conn(layer_: Any) -> Any:
    # HttpLayer.connections[server] is the top of that connection's stack: HttpClient, or a
    # ServerTLSLayer / upstream-proxy layer above it. Their child_layer chains end at Http1Client/Http2Client.
    for _ in range(8):
        if isinstance(layer_, (Http1Client, Http2Client)) or layer_ is None:
            return layer_
        layer_ = getattr(layer_, "child_layer", None)
    return None


def _exchange_connection(hl: HttpLayer, stream: HttpStream) -> tuple[Any, Any] | None:
    """(top layer, server connection) of the upstream connection that carries this stream's exchange
    right now, or None (not sent yet, finished, or the connection now serves another exchange).

    flow.server_conn alone is not enough: before make_server_connection() it is the HttpLayer's
    context server, which in reverse mode is the eagerly opened connection another stream may use."""
    server = stream.flow.server_conn
    top = hl.connections.get(server)
    if top is None or not server.connected or server in hl.waiting_for_establishment:
        return None
    inner = _innermost_http_conn(top)
    if isinstance(inner, Http1Client) and inner.stream_id == stream.stream_id:
        return top, server
    if isinstance(inner, Http2Client) and stream.stream_id in inner.our_stream_id:
        return top, server
    return None


def _op_cancel_upstream(hl: HttpLayer, op: _Op) -> mlayer.CommandGenerator[None]:
    """Abort this flow's upstream exchange through mitmproxy's own client-abort path: an HTTP/1
    upstream connection is closed, an HTTP/2 upstream gets RST_STREAM(CANCEL) on this flow's stream
    only (its connection is shared with other flows). Works after the client-side stream is done."""
    found = _exchange_connection(hl, op.target)
    if found is None:
        return
    op.delivered = True
    sid = op.target.stream_id
    yield from hl.event_to_child(found[0], RequestProtocolError(sid, "upstream closed by faultproxy", _client_gone_code()))


_OPS: dict[str, Callable[[HttpLayer, _Op], mlayer.CommandGenerator[None]]] = {
    "event": _op_event,
    "reset": _op_reset,
    "goaway": _op_goaway,
    "cancel_upstream": _op_cancel_upstream,
    "client_error": _op_client_error,
}


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


def _find_stream(top: mlayer.Layer, flow: http.HTTPFlow) -> tuple[HttpLayer, HttpStream] | None:
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


def _route_for(stream: HttpStream) -> dict[int, HttpStream]:
    """For every HttpLayer on the path from the top of the stack to `stream`: the stream to pass to."""
    route: dict[int, HttpStream] = {}
    chain = stream.context.layers
    for i, lay in enumerate(chain[:-1]):
        nxt = chain[i + 1]
        if isinstance(lay, HttpLayer) and isinstance(nxt, HttpStream):
            route[id(lay)] = nxt
    return route


# --------------------------------------------------------------------------------------------------
# Server transport pausing


def _conn_transport(handler: Any, conn: Any) -> asyncio.Transport | None:
    io = handler.transports.get(conn)
    writer = getattr(io, "writer", None)
    transport = getattr(writer, "transport", None)
    if isinstance(transport, asyncio.Transport) and not transport.is_closing():
        return transport
    return None


def _transport_holds(transport: asyncio.Transport) -> set[int]:
    """Make resume_reading a no-op while anyone holds the pause.

    asyncio's StreamReader resumes the transport itself when its buffer drains
    (_maybe_resume_transport / _wait_for_data), which would undo our pause_reading(). Wrapping the
    transport instance's resume_reading keeps the pause until the last holder lets go.
    """
    holds: set[int] | None = transport.__dict__.get("_faultproxy_holds")
    if holds is None:
        holds = set()
        orig = transport.resume_reading

        def resume_reading() -> None:
            if not holds:
                orig()

        transport._faultproxy_resume = orig  # type: ignore[attr-defined]
        transport._faultproxy_holds = holds  # type: ignore[attr-defined]
        transport.resume_reading = resume_reading  # type: ignore[method-assign]
    return holds


# --------------------------------------------------------------------------------------------------


class FlowHandle:
    """A live flow's place in mitmproxy's connection machinery: lets an addon drive a response on its own clock."""

    stream_id: int
    client_is_http2: bool

    def __init__(self, flow: http.HTTPFlow, handler: Any, proxyserver: Any, layer_: HttpLayer, stream: HttpStream):
        self.flow = flow
        self._handler = handler
        self._ps = proxyserver
        self._conn_id = flow.client_conn.id
        self._client = handler.client
        self._layer = layer_
        self._stream = stream
        self._route = _route_for(stream)
        self._st = _stream_state(stream)
        self._st.pauser = self._apply_pause
        self.stream_id = stream.stream_id
        self.client_is_http2 = _client_h2(layer_) is not None
        for lay in stream.context.layers:
            if isinstance(lay, HttpLayer):
                _wrap_http_layer(lay)

    def __repr__(self) -> str:
        return f"FlowHandle(stream={self.stream_id}, h2={self.client_is_http2}, alive={self.alive})"

    # --- finding ----------------------------------------------------------------------------------

    @classmethod
    def find(cls, flow: http.HTTPFlow, master: Any = None) -> FlowHandle | None:
        """The handle for a live flow, or None. Call from requestheaders/request/responseheaders hooks."""
        try:
            install_upstream_close_fix()
            master = master or ctx.master
            ps = master.addons.get("proxyserver")
            handler = ps.connections.get(flow.client_conn.id)
            if handler is None:
                return None
            found = _find_stream(handler.layer, flow)
            if found is None:
                return None
            return cls(flow, handler, ps, *found)
        except Exception:
            log.exception("faultproxy: cannot find mitmproxy's stream for %s", getattr(flow, "id", flow))
            return None

    @staticmethod
    def injecting(flow: http.HTTPFlow) -> bool:
        """True while flow.response is headers this module injected (from responseheaders: don't divert them again)."""
        return flow.response is not None and flow.response in _INJECTED_RESPONSES

    # --- state --------------------------------------------------------------------------------------

    def _handler_live(self) -> bool:
        try:
            return self._ps.connections.get(self._conn_id) is self._handler
        except Exception:
            return False

    @property
    def alive(self) -> bool:
        """The stream still exists in mitmproxy and the client connection is open."""
        try:
            return (
                self._handler_live()
                and self._client.state is ConnectionState.OPEN
                and self._layer.streams.get(self.stream_id) is self._stream
            )
        except Exception:
            return False

    @property
    def goaway_last_stream_id(self) -> int | None:
        """The last_stream_id of the GOAWAY this handle sent, if any."""
        return self._st.goaway_last_stream_id

    @property
    def last_frame(self) -> dict[str, Any] | None:
        """What this handle last put on the wire to end the stream, for the journal:
        {"frame": "RST_STREAM"|"GOAWAY", "code": int, "code_name": str, "stream_id": int, ["last_stream_id": int]}."""
        return self._st.last_frame

    def _note_frame(self, frame: str, code: int, **extra: Any) -> None:
        self._st.last_frame = {
            "frame": frame, "code": int(code), "code_name": h2_error_name(int(code)), "stream_id": self.stream_id, **extra
        }

    async def _dispatch(self, op: _Op) -> bool:
        if not self._handler_live():
            return False
        try:
            # Runs the whole layer stack synchronously under mitmproxy's event lock and writes the
            # produced bytes to the transports (no drain) before returning.
            await self._handler.server_event(op)
        except Exception:
            log.exception("faultproxy: %r failed", op)
            return False
        return op.delivered

    async def _inject(self, event: events.Event) -> bool:
        """Deliver an HTTP event to the stream through mitmproxy's normal path.

        Returns once the stream has processed it (bytes written to the transport): True, or False
        when the stream is gone or its state no longer takes the event. If the stream is paused on a
        blocking hook (responseheaders of injected headers, response after the end, error...), the
        event is queued and this waits for the hook, except when called from inside that very hook
        (waiting would deadlock): then True means "queued, processed in order after the hook".
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._st.injected[id(event)] = (event, fut)
        self._st.pending.add(fut)
        fut.add_done_callback(self._st.pending.discard)
        delivered = await self._dispatch(_Op("event", self, event))
        if not delivered:
            self._st.injected.pop(id(event), None)
            _resolve(fut, False)
            return False
        while not fut.done():
            if _inside_hook_of(self._stream):
                return True
            if not self.alive:
                return False
            await asyncio.wait([fut], timeout=0.25)
        return fut.result()

    async def _settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until the stream is not paused on a hook (what mitmproxy will send when the hook returns,
        e.g. the response headers after `responseheaders`, goes out first), until everything injected
        so far was processed by the stream, then until the client socket's write buffer is empty.
        Bounded: a stream stuck on a slow hook does not block us; from inside that hook we do not wait."""
        deadline = time.monotonic() + timeout
        while (
            getattr(self._stream, "_paused", None) is not None
            and not _inside_hook_of(self._stream)
            and time.monotonic() < deadline
            and self.alive
        ):
            await asyncio.sleep(0.005)
        pending = [f for f in self._st.pending if not f.done()]
        if pending and not _inside_hook_of(self._stream):  # from inside the hook they wait for: no use
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        await self._flush_client(max(0.0, deadline - time.monotonic()))

    # --- response side ------------------------------------------------------------------------------

    def divert_upstream(self, sink: Callable[[UpstreamEvent], None]) -> None:
        """From now on the upstream's response events for this stream go to `sink`, not to mitmproxy.

        `sink` is called synchronously inside mitmproxy's event processing: it must not block (queue
        and return). Events injected by this handle still go through mitmproxy. Called from the
        responseheaders hook, the headers already went mitmproxy's way and only the body is diverted.
        """
        self._st.upstream_sink = sink

    async def send_headers(self, response: http.Response | None = None, *, stream: bool | None = None) -> bool:
        """Inject response headers: `response`, or the upstream's held ones (UpstreamHeaders).

        They go through mitmproxy's normal path: the responseheaders hook runs (FlowHandle.injecting
        is True there), then the headers go to the client if the response is streamed, else with the
        body at send_end(). `stream` sets response.stream before injecting (the hook may change it).
        """
        response = response if response is not None else self._st.held_headers
        if response is None:
            return False
        if stream is not None:
            response.stream = stream
        _INJECTED_RESPONSES.add(response)
        return await self._inject(ResponseHeaders(self.stream_id, response, end_stream=False))

    async def send_data(self, data: bytes) -> bool:
        """Inject response body data (to the client for a streamed response). False if the stream is gone."""
        if not data:
            return True  # an empty data event would be an HTTP/1 terminating chunk (facts file)
        return await self._inject(ResponseData(self.stream_id, data))

    async def send_end(self, trailers: http.Headers | None = None) -> bool:
        """Inject trailers (optional; HTTP/2 clients only, dropped for HTTP/1) and the end of the
        response: mitmproxy runs the response hook and ends the body (terminating chunk / END_STREAM).
        If the upstream's response is diverted and not finished, the upstream exchange is aborted
        (nobody would read it any more)."""
        if trailers is not None and self.client_is_http2:
            # (HTTP/1 clients: mitmproxy's Http1Server cannot send trailers, it raises on them.)
            if not await self._inject(ResponseTrailers(self.stream_id, trailers)):
                return False
        return await self._inject(ResponseEndOfMessage(self.stream_id))

    async def send_error(self, message: str) -> bool:
        """End the stream the way mitmproxy ends it when the upstream fails: flow.error, error hook;
        before headers a 502, after them RST_STREAM(INTERNAL_ERROR) on HTTP/2 or a closed HTTP/1 connection."""
        return await self._inject(ResponseProtocolError(self.stream_id, message, _server_error_code()))

    async def reset_stream(self, code: int) -> bool:
        """HTTP/2 client: RST_STREAM(code) on this stream only; other streams go on.

        Data injected before is processed and flushed first, and the reset keeps RST_AFTER_DATA_GAP
        after the stream's last DATA (Chromium). The flow gets flow.error and the error hook, as on a
        client reset; the upstream exchange is aborted (HTTP/1 upstream: connection closed). HTTP/1
        client: False (the caller falls back to close_client)."""
        if not self.client_is_http2 or not self.alive:
            return False
        await self._settle()
        gap = self._st.last_data_at + RST_AFTER_DATA_GAP - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)
        self._st.upstream_muted = True
        ok = await self._dispatch(_Op("reset", self, int(code)))
        if ok:
            self._note_frame("RST_STREAM", code)
            # mitmproxy's abort path closes/resets the upstream only while it is mid-response; make sure.
            await self._dispatch(_Op("cancel_upstream", self))
        return ok

    async def goaway(
        self, code: int, last_stream_id: int | None = None, debug_data: bytes = b"", grace: float = 0.0
    ) -> bool:
        """HTTP/2 client: GOAWAY(code, last_stream_id), flushed at once; then, after `grace` seconds (or
        as soon as no stream <= last_stream_id is left), the client connection closes (FIN).

        last_stream_id defaults to the highest client stream id the proxy has seen on the connection
        (afterwards in `goaway_last_stream_id`). Streams above it are ended on the proxy side (flow
        error, upstream aborted) without further frames. An error GOAWAY without the close leaves
        Chromium hanging (facts file), hence the close."""
        if not self.client_is_http2 or not self._handler_live():
            return False
        await self._settle()
        op = _Op("goaway", self, (int(code), last_stream_id, bytes(debug_data)))
        if not await self._dispatch(op):
            return False
        last = op.result
        self._st.goaway_last_stream_id = last
        self._note_frame("GOAWAY", code, last_stream_id=last)
        await self._flush_client()
        deadline = time.monotonic() + max(0.0, grace)
        while time.monotonic() < deadline and self._handler_live():
            if not any(sid <= last for sid in list(self._layer.streams)):
                break
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        await self.close_client()
        return True

    async def refuse(self, code: int = h2.errors.ErrorCodes.REFUSED_STREAM, *, reset: bool = False) -> str | None:
        """End the exchange before the request goes upstream. Call from the `request` hook.

        HTTP/2 client: RST_STREAM(code) on this stream only (no HEADERS sent); the connection and its
        other streams go on. HTTP/1.x client: the connection closes before any response byte (FIN, or a
        TCP RST with `reset`). Either way flow.error is set, mitmproxy runs the error hook and never
        sends the request upstream: the protocol error injected here waits behind the hook, and
        mitmproxy's HttpStream.check_killed() finds it right after the hook returns. (In reverse mode
        with the default connection_strategy=eager, the upstream *connection* was opened when the
        client connected; no request is written to it.)

        Returns "rst_stream", "close" or "reset" (what happened), or None when the flow is gone.
        """
        if not self.alive:
            return None
        message = (
            f"refused by faultproxy (RST_STREAM {h2_error_name(int(code))})"
            if self.client_is_http2
            else "refused by faultproxy (connection closed before any response byte)"
        )
        if self.flow.error is None:
            self.flow.error = mflow.Error(message)  # the addon skips the flow's other faults
        if self.client_is_http2:
            return "rst_stream" if await self.reset_stream(code) else None
        self._st.upstream_muted = True
        if not await self._dispatch(_Op("client_error", self, message)):
            return None
        await self.close_client(reset=reset)
        return "reset" if reset else "close"

    async def _flush_client(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        transport = _conn_transport(self._handler, self._client)
        while transport is not None and transport.get_write_buffer_size() > 0:
            if time.monotonic() >= deadline or transport.is_closing():
                return
            await asyncio.sleep(0.005)

    async def close_client(self, reset: bool = False) -> None:
        """Close the client connection: FIN (an HTTP/1.1 client sees a truncated chunked body), or a
        TCP RST with `reset` (SO_LINGER on, 0). Data sent before is flushed first. The flow's upstream
        exchange is aborted too (mitmproxy also closes all upstream connections of the client)."""
        try:
            await self._settle()
            self._st.upstream_muted = True
            await self._dispatch(_Op("cancel_upstream", self))
            if not self._handler_live():
                return
            io = self._handler.transports.get(self._client)
            if io is None or io.handler is None:
                return
            if reset:
                sock = io.writer.get_extra_info("socket") if io.writer is not None else None
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # mitmproxy's own close: cancels the client's reader task, which delivers
            # ConnectionClosed to the layers (all flows of the connection end) and closes the socket.
            self._handler.close_connection(self._client)
        except Exception:
            log.exception("faultproxy: close_client failed")

    async def close_upstream(self) -> None:
        """Abort this flow's upstream exchange: HTTP/1 upstream connection closed (the origin sees EOF);
        HTTP/2 upstream: RST_STREAM(CANCEL) on this flow's upstream stream only. The sink gets no more events."""
        self._st.upstream_muted = True
        await self._dispatch(_Op("cancel_upstream", self))

    def pause_upstream(self) -> None:
        """Stop reading from this flow's server connection socket (real TCP backpressure).

        Asked before the request went upstream, it applies as soon as the upstream answers. On an
        HTTP/2 upstream connection this pauses every stream sharing it."""
        self._st.pause_wanted = True
        self._apply_pause()

    def resume_upstream(self) -> None:
        self._st.pause_wanted = False
        transport, self._st.paused_transport = self._st.paused_transport, None
        if transport is None:
            return
        try:
            holds = _transport_holds(transport)
            holds.discard(id(self._st))
            if not holds and not transport.is_closing():
                transport._faultproxy_resume()  # type: ignore[attr-defined]
        except Exception:
            log.exception("faultproxy: resume_upstream failed")

    def _apply_pause(self) -> None:
        if self._st.paused_transport is not None or not self._st.pause_wanted:
            return
        try:
            found = _exchange_connection(self._layer, self._stream)
            transport = _conn_transport(self._handler, found[1]) if found else None
            if transport is None:
                return
            _transport_holds(transport).add(id(self._st))
            transport.pause_reading()
            self._st.paused_transport = transport
        except Exception:
            log.exception("faultproxy: pause_upstream failed")

    @property
    def upstream_paused(self) -> bool:
        return self._st.pause_wanted

    async def wait_client_closed(self) -> None:
        """Resolve when the client gives up: its connection closes, or (HTTP/2) it resets this stream,
        or the stream is otherwise gone from mitmproxy. For "stall until the client gives up"."""
        loop = asyncio.get_running_loop()
        if self._st.client_gave_up is None or self._st.client_gave_up.done():
            self._st.client_gave_up = loop.create_future()
        gave_up = self._st.client_gave_up
        while self.alive:
            io = self._handler.transports.get(self._client)
            waiters: list[asyncio.Future[Any]] = [gave_up]
            if io is not None and io.handler is not None:
                waiters.append(io.handler)
            await asyncio.wait(waiters, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if gave_up.done():
                return

    # --- request side -------------------------------------------------------------------------------

    def divert_request(self, sink: Callable[[ClientEvent], None]) -> None:
        """The client's request body events (after the headers) go to `sink` instead of upstream.

        Meant for flows whose request is streamed (flow.request.stream = True in requestheaders);
        feed them on with send_request_data / send_request_end."""
        self._st.request_sink = sink

    async def send_request_data(self, data: bytes) -> bool:
        if not data:
            return True
        return await self._inject(RequestData(self.stream_id, data))

    async def send_request_end(self, trailers: http.Headers | None = None) -> bool:
        if trailers is not None:
            if not await self._inject(RequestTrailers(self.stream_id, trailers)):
                return False
        return await self._inject(RequestEndOfMessage(self.stream_id))


# --------------------------------------------------------------------------------------------------
# Client ALPN


def set_client_alpn(data: Any, alpn: bytes = b"http/1.1") -> bool:
    """Negotiate only `alpn` with this client connection. Call from tls_clienthello or tls_start_client.

    mitmproxy's tlsconfig addon builds the client-side SSL.Connection on a cached SSL.Context that is
    shared between connections; its ALPN select callback takes the per-connection choice from the
    connection's app data (`AppData`: client_alpn, server_alpn, http2). With client_alpn set, the
    callback selects it if the client offers it, else negotiates no ALPN at all, and clients then
    speak HTTP/1.1. Two orders are possible:

    * our hook runs before TlsConfig.tls_start_client (script addons: ScriptLoader sits before
      TlsConfig in mitmproxy's default addon list): data.ssl_conn does not exist yet, so we set
      client.alpn, which TlsConfig copies into AppData.client_alpn (ClientTLSLayer overwrites
      client.alpn with the negotiated value once the handshake is done);
    * it runs after (an addon added after the defaults): we edit the AppData of data.ssl_conn.

    Not done: editing client.alpn_offers in tls_clienthello (OpenSSL sees the offers of the
    ClientHello itself), or replacing the context's select callback (it is shared by every connection).
    Returns False when neither is possible.
    """
    conn = getattr(data, "ssl_conn", None)
    if conn is not None:
        try:
            app = conn.get_app_data()
        except Exception:
            app = None
        if isinstance(app, dict) and "client_alpn" in app:
            app["client_alpn"] = alpn
            app["http2"] = alpn == b"h2"
            return True
        return False
    context = getattr(data, "context", None)
    client = getattr(context, "client", None)
    if client is None or getattr(client, "tls_established", False):
        return False
    client.alpn = alpn
    return True


# --------------------------------------------------------------------------------------------------
# Stream limits
#
# What stops the 6th same-origin EventSource on one HTTP/2 client connection: not an option.
# mitmproxy.proxy.server.ConnectionHandler.__init__ (11.0.2 and 12.x alike) creates
#     self.max_conns = collections.defaultdict(lambda: asyncio.Semaphore(5))
# and open_connection() holds `async with self.max_conns[address]` for the *whole life* of each
# upstream connection. When an HTTP/2 client talks to an HTTP/1 upstream, every stream gets its own
# upstream connection (HttpLayer.get_connection never reuses one for h2 -> h1, and Http1Client closes
# it after one exchange), so per client connection at most 5 upstream exchanges to one address can be
# in flight; the 6th OpenConnection waits on the semaphore until one of the first five ends, which
# for SSE is never. The other limits are far away: the proxy advertises
# SETTINGS_MAX_CONCURRENT_STREAMS = 100 to the client (h2's default local setting), and an HTTP/2
# upstream gets up to 10 streams before its SETTINGS arrive (Http2Client.provisional_max_concurrency),
# then whatever it advertises, with excess streams queued rather than refused.

_upstream_limit: int = MITM_DEFAULT_UPSTREAM_CONNS


def _apply_limit(handler: Any) -> None:
    max_conns = getattr(handler, "max_conns", None)
    if not isinstance(max_conns, collections.defaultdict):
        return
    limit = _upstream_limit
    max_conns.default_factory = functools.partial(_limited_semaphore, limit)
    for sem in list(max_conns.values()):
        have = getattr(sem, "_faultproxy_capacity", MITM_DEFAULT_UPSTREAM_CONNS)
        for _ in range(limit - have):
            sem.release()  # an asyncio.Semaphore is unbounded: each release adds one slot
        if limit > have:
            sem._faultproxy_capacity = limit


def _limited_semaphore(n: int) -> asyncio.Semaphore:
    sem = asyncio.Semaphore(n)
    sem._faultproxy_capacity = n  # type: ignore[attr-defined]
    return sem


def raise_stream_limits(master_or_options: Any = None, *, limit: int = 256) -> None:
    """Allow `limit` concurrent upstream connections per client connection and upstream address.

    There is no mitmproxy option for this (see the comment above); the ConnectionHandler class is
    patched so every handler created afterwards gets the larger semaphores, and the live handlers of
    the running master (`master_or_options` if it is a master, else ctx.master) are raised in place.
    Also installs install_upstream_close_fix(), install_upstream_connection_management() and
    install_fast_message_typecheck(). Idempotent; a smaller limit than already set is ignored. 256 > the 100 streams the proxy lets
    one HTTP/2 client open, so the semaphore never binds for a single client connection.
    """
    global _upstream_limit
    install_upstream_close_fix()
    install_upstream_connection_management()
    install_fast_message_typecheck()
    _upstream_limit = max(_upstream_limit, int(limit))
    cls = mserver.ConnectionHandler
    if not getattr(cls.__init__, "_faultproxy_patched", False):
        orig_init = cls.__init__

        @functools.wraps(orig_init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_init(self, *args, **kwargs)
            _apply_limit(self)

        __init__._faultproxy_patched = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]
    master = master_or_options if hasattr(master_or_options, "addons") else None
    try:
        master = master or ctx.master
        ps = master.addons.get("proxyserver")
        for handler in list(ps.connections.values()):
            _apply_limit(handler)
    except Exception:
        pass  # no running master yet: the class patch covers every handler to come


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
#    (_exchange_connection), as they must for h1 clients' keep-alive.

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
    inner = _innermost_http_conn(top)
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


# --------------------------------------------------------------------------------------------------
# Type checks on every request and response object (mitmproxy 11.0.2 and 12.3.1)
#
# MessageData.__post_init__ (present unless Python runs with -O) passes every field of every
# Request/Response it creates through utils.typecheck.check_option_type, which formats a TypeError
# message before it even looks at the value, and walks typing unions: 44 µs per request and 28 µs
# per response here, about a tenth of the lean engine's CPU per request. The replacement does the
# same check with isinstance against a per-class table of allowed types (an int is accepted for a
# float, as check_option_type does) and calls check_option_type itself -- same exception, same
# message -- only for a value that fails. A class whose field types are not plain classes or unions
# of them keeps mitmproxy's check.


def _typecheck_plan(cls: type) -> list[tuple[str, Any, tuple[type, ...]]] | None:
    import types as pytypes
    import typing

    plan = []
    for f in dataclasses.fields(cls):
        hint = f.type
        if typing.get_origin(hint) in (typing.Union, pytypes.UnionType):
            allowed = typing.get_args(hint)
        elif isinstance(hint, type) and typing.get_origin(hint) is None:
            allowed = (hint,)
        else:
            return None
        if not all(isinstance(a, type) and typing.get_origin(a) is None for a in allowed):
            return None
        if float in allowed:
            allowed = (*allowed, int)
        plan.append((f.name, hint, allowed))
    return plan


def install_fast_message_typecheck() -> None:
    """Make MessageData's per-object type check cheap, with the same outcome. Idempotent."""
    cls = http.MessageData
    orig = cls.__dict__.get("__post_init__")
    if orig is None or getattr(orig, "_faultproxy_patched", False):
        return  # python -O (no check at all), or done
    plans: dict[type, list[tuple[str, Any, tuple[type, ...]]] | None] = {}

    def __post_init__(self: Any) -> None:
        kind = type(self)
        try:
            plan = plans[kind]
        except KeyError:
            plan = plans[kind] = _typecheck_plan(kind)
        if plan is None:
            orig(self)
            return
        for name, hint, allowed in plan:
            value = getattr(self, name)
            if not isinstance(value, allowed):
                typecheck.check_option_type(name, value, hint)  # raises mitmproxy's own TypeError

    __post_init__._faultproxy_patched = True  # type: ignore[attr-defined]
    __post_init__.__wrapped__ = orig  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# --set values for a script's options
#
# mitmdump keeps a --set value for an option no addon has declared yet and parses it when a script
# declares it (OptManager.process_deferred, from AddonManager.register). A value that does not parse
# raises OptionsError out of Script.loadscript, which safecall re-raises: the script is not loaded,
# nothing is printed, and the proxy serves on without it.


def drop_unparsable_deferred(options: Any, prefix: str) -> list[str]:
    """For declared options named `prefix*` with a deferred --set value that does not parse: drop the
    value (the option keeps its default) and return one message each. Call from an addon's load()."""
    from mitmproxy import exceptions

    messages = []
    deferred = getattr(options, "deferred", None) or {}
    for name in [n for n in deferred if n.startswith(prefix) and n in options._options]:
        raw = getattr(deferred[name], "val", None)
        if raw is None:
            continue  # a typed value set from code, not a string from the command line
        try:
            options._parse_setval(options._options[name], raw)
        except exceptions.OptionsError as e:
            del deferred[name]
            messages.append(f"--set {name}={' '.join(raw)}: {e}")
    return messages


# --------------------------------------------------------------------------------------------------
# Self-check


def check_internals() -> list[str]:
    """What this module relies on in mitmproxy, checked; one message per thing that moved."""
    import inspect

    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    def src(obj: Any) -> str:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError):
            return ""

    from mitmproxy.addons import proxyserver as ps_mod

    need(
        "self.connections" in src(ps_mod.Proxyserver) or hasattr(ps_mod.Proxyserver, "connections"),
        "addons.proxyserver.Proxyserver.connections (live handlers by client id) is gone",
    )
    CH = mserver.ConnectionHandler
    for name in ("server_event", "close_connection", "handle_connection"):
        need(hasattr(CH, name), f"proxy.server.ConnectionHandler.{name} is gone")
    init_src = src(getattr(CH.__init__, "__wrapped__", CH.__init__))
    need("self.transports" in init_src, "ConnectionHandler.transports is no longer set in __init__")
    need(
        "max_conns" in init_src and "Semaphore(5)" in init_src,
        "ConnectionHandler.max_conns is no longer defaultdict(lambda: asyncio.Semaphore(5)): "
        "re-check raise_stream_limits",
    )
    need(
        "async with self.max_conns[" in src(CH.open_connection),
        "ConnectionHandler.open_connection no longer holds max_conns per upstream connection",
    )
    hc_src = src(getattr(CH.handle_connection, "__wrapped__", CH.handle_connection))
    need(
        "await self.server_event(events.ConnectionClosed(connection))" in hc_src and "writer.close()" in hc_src,
        "ConnectionHandler.handle_connection changed: re-check install_upstream_close_fix",
    )
    need(
        'name=f"handle_hook({command.name})"' in src(CH.server_event),
        "ConnectionHandler.server_event no longer names hook tasks handle_hook(<name>) (FlowHandle._inject)",
    )
    need("_paused" in src(mlayer.Layer.__init__), "Layer._paused (pending blocking command) is gone")
    need("_server_event_lock" in src(CH.server_event), "ConnectionHandler.server_event has no event lock any more")
    need(
        "self._handle_event(event)" in src(mlayer.Layer.handle_event),
        "proxy.layer.Layer.handle_event no longer dispatches through self._handle_event (stream wrapper)",
    )
    need(hasattr(mlayer.NextLayer, "__init__") and "self.layer" in src(mlayer.NextLayer.__init__), "NextLayer.layer is gone")
    for name in ("streams", "connections", "waiting_for_establishment"):
        need(name in src(HttpLayer.__init__), f"HttpLayer.{name} is gone")
    need(hasattr(HttpLayer, "event_to_child"), "HttpLayer.event_to_child is gone")
    need("raise AssertionError" in src(HttpLayer._handle_event), "HttpLayer._handle_event changed shape")
    for name in (
        "state_wait_for_response_headers",
        "state_stream_response_body",
        "state_consume_response_body",
        "state_stream_request_body",
        "state_consume_request_body",
        "handle_protocol_error",
    ):
        need(hasattr(HttpStream, name), f"HttpStream.{name} is gone (injected-event state check)")
    need("DropStream" in src(HttpStream.handle_protocol_error), "HttpStream.handle_protocol_error no longer drops the stream")
    need(
        "_paused_event_queue" in src(HttpStream.check_killed) and "RequestProtocolError" in src(HttpStream.check_killed),
        "HttpStream.check_killed no longer finds a client protocol error queued behind a hook (FlowHandle.refuse)",
    )
    need(hasattr(Http2Server, "is_closed"), "Http2Connection.is_closed is gone")
    need("self.h2_conn" in src(mhttp._http2.Http2Connection.__init__), "Http2Connection.h2_conn is gone")
    need("self.streams" in src(mhttp._http2.Http2Connection.__init__), "Http2Connection.streams is gone")
    need("our_stream_id" in src(Http2Client.__init__), "Http2Client.our_stream_id (stream id mapping) is gone")
    need(
        "ResponseTrailers" not in src(mhttp._http1.Http1Server.send),
        "Http1Server.send handles trailers now: send_end could pass them to HTTP/1 clients",
    )
    need(
        "RequestProtocolError" in src(Http1Client.send) and "CloseConnection" in src(Http1Client.send),
        "Http1Client.send no longer closes the upstream connection on RequestProtocolError",
    )
    need(
        "highest_inbound_stream_id" in src(h2.connection.H2Connection),
        "h2.connection.H2Connection.highest_inbound_stream_id is gone (GOAWAY default last_stream_id)",
    )
    from mitmproxy.addons import tlsconfig

    need(
        'app_data["client_alpn"]' in src(tlsconfig.alpn_select_callback),
        "addons.tlsconfig.alpn_select_callback no longer reads client_alpn from the connection's app data",
    )
    need(
        "set_app_data" in src(tlsconfig.TlsConfig.tls_start_client)
        and "client_alpn = client.alpn" in src(tlsconfig.TlsConfig.tls_start_client),
        "TlsConfig.tls_start_client no longer copies client.alpn into the connection's AppData",
    )
    from mitmproxy.proxy.layers import tls as tls_layer

    need(
        "self.conn.alpn = self.tls.get_alpn_proto_negotiated()" in src(tls_layer),
        "the TLS layer no longer sets conn.alpn from the negotiated protocol (set_client_alpn relies on it)",
    )
    get_conn = _orig_get_connection or HttpLayer.get_connection
    need(
        "h2_to_h1" in src(get_conn) and "connection_spec_matches" in src(get_conn),
        "HttpLayer.get_connection changed: re-check install_upstream_connection_management (reuse for h2 clients)",
    )
    mark_done = _orig_mark_done or Http1Client.mark_done
    need(
        "request.is_http2" in src(mark_done) and "isinstance(self, Http1Client)" in src(mark_done),
        "Http1Connection.mark_done no longer closes upstream connections of HTTP/2 requests: "
        "re-check install_upstream_connection_management",
    )
    need(
        "self.stream_id = None" in src(mark_done) and "self.state = self.read_headers" in src(mark_done),
        "Http1Connection.mark_done no longer resets an Http1Client for the next exchange (_idle_http1)",
    )
    need("timestamp_end" in src(mserver.ConnectionHandler.open_connection), "ConnectionHandler.open_connection no longer sets timestamp_end after the last event (pruning)")
    from mitmproxy import optmanager

    need(
        "_parse_setval" in src(optmanager.OptManager.process_deferred) and "_UnconvertedStrings" in src(optmanager),
        "OptManager.process_deferred changed: re-check drop_unparsable_deferred",
    )
    post_init = http.MessageData.__dict__.get("__post_init__")
    post_init = getattr(post_init, "__wrapped__", post_init)
    need(
        post_init is None or "typecheck.check_option_type(field.name, val, field.type)" in src(post_init),
        "http.MessageData.__post_init__ changed: re-check install_fast_message_typecheck",
    )
    if MITMPROXY_VERSION >= (12,):
        need(_ErrorCode is not None, "mitmproxy >= 12 without layers.http.ErrorCode")
    return problems

