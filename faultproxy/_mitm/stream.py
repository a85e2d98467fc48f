"""Per-stream state and the wrapper on one HttpStream's event entry point.

`Layer.handle_event` calls `self._handle_event(event)` through the instance, so an instance attribute
on one HttpStream sees every event of that stream, including events replayed after a blocking hook.
The wrapper lets events this package injected through (checking first that the stream's state takes
them), hands the upstream's response events (or the client's request body) to a sink instead of
mitmproxy when the stream is diverted, and notes what the client side has seen (last DATA, the client
giving up). The state lives on the HttpStream object itself and dies with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import layer as mlayer
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

from .checks import Checker
from .codes import client_gone_code
from .locate import exchange_connection, parent_layer
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

log = logging.getLogger("faultproxy._mitm")

# --------------------------------------------------------------------------------------------------
# Per-stream state, kept on the HttpStream object itself (dies with it)

_STATE_ATTR = "_faultproxy_state"
WRAPPED_ATTR = "_faultproxy_wrapped"

UPSTREAM_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage, ResponseProtocolError)
CLIENT_BODY_EVENTS = (RequestData, RequestTrailers, RequestEndOfMessage)

# Responses whose headers this module injected (see FlowHandle.injecting). Identity-hashed, weak.
INJECTED_RESPONSES: weakref.WeakSet[http.Response] = weakref.WeakSet()


class StreamState:
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


def resolve(fut: asyncio.Future[Any] | None, value: Any) -> None:
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
    if isinstance(event, CLIENT_BODY_EVENTS):
        return _state_name(stream.client_state) in ("state_stream_request_body", "state_consume_request_body")
    return True  # protocol errors are handled in every state


def stream_state(stream: HttpStream) -> StreamState:
    """Install (once) the wrapper on this HttpStream instance's _handle_event and return its state."""
    st: StreamState | None = stream.__dict__.get(_STATE_ATTR)
    if st is not None:
        return st
    st = StreamState()
    orig = stream._handle_event  # the class's bound method (or whatever mitmproxy set on the instance)

    def _handle_event(event: events.Event) -> mlayer.CommandGenerator[None]:
        entry = st.injected.pop(id(event), None)
        if entry is not None:
            return _run_injected(stream, st, orig, event, entry[1])
        if isinstance(event, UPSTREAM_EVENTS):
            if st.pause_wanted and st.paused_transport is None and st.pauser is not None:
                st.pauser()  # asked before the request went upstream: the connection is known now
            if st.upstream_sink is not None or st.upstream_muted:
                return _divert_upstream_event(stream, st, event)
        if isinstance(event, CLIENT_BODY_EVENTS) and st.request_sink is not None:
            return _divert_client_event(st, event)
        if isinstance(event, RequestProtocolError):
            # The client reset the stream or went away: "the client gave up" for wait_client_closed().
            if st.client_gave_up is not None:
                resolve(st.client_gave_up, None)
        elif isinstance(event, ResponseData):
            st.last_data_at = time.monotonic()
        return orig(event)

    stream._handle_event = _handle_event  # type: ignore[method-assign]
    setattr(stream, _STATE_ATTR, st)
    return st


def _run_injected(
    stream: HttpStream,
    st: StreamState,
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
            elif isinstance(event, ENDING_EVENTS) and st.upstream_sink is not None and not st.upstream_done:
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
        resolve(fut, ok)


def inside_hook_of(stream: HttpStream) -> bool:
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


ENDING_EVENTS = (ResponseEndOfMessage, ResponseProtocolError, RequestProtocolError)


def _abort_upstream(stream: HttpStream, st: StreamState) -> mlayer.CommandGenerator[None]:
    """From inside the stream: abort its upstream exchange the way mitmproxy does on a client abort
    (SendHttp(RequestProtocolError) to the server connection: HTTP/1 closes it, HTTP/2 resets the stream)."""
    hl = parent_layer(stream)
    found = exchange_connection(hl, stream) if hl is not None else None
    st.upstream_muted = True
    if found is not None:
        yield mhttp.SendHttp(
            RequestProtocolError(stream.stream_id, "upstream closed by faultproxy", client_gone_code()), found[1]
        )


def _divert_upstream_event(stream: HttpStream, st: StreamState, event: events.Event) -> mlayer.CommandGenerator[None]:
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


def _divert_client_event(st: StreamState, event: events.Event) -> mlayer.CommandGenerator[None]:
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



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    c.need(
        "self._handle_event(event)" in c.src(mlayer.Layer.handle_event),
        "proxy.layer.Layer.handle_event no longer dispatches through self._handle_event (stream wrapper)",
    )
    c.need("raise AssertionError" in c.src(HttpLayer._handle_event), "HttpLayer._handle_event changed shape")
    for name in (
        "state_wait_for_response_headers",
        "state_stream_response_body",
        "state_consume_response_body",
        "state_stream_request_body",
        "state_consume_request_body",
        "handle_protocol_error",
    ):
        c.need(hasattr(HttpStream, name), f"HttpStream.{name} is gone (injected-event state check)")
    c.need("DropStream" in c.src(HttpStream.handle_protocol_error), "HttpStream.handle_protocol_error no longer drops the stream")
