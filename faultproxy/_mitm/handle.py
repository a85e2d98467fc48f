"""FlowHandle: a live flow's place in mitmproxy's connection machinery, so that an addon can drive a
response on its own clock and end it with the frame it chooses.

mitmproxy gives addons no way to do this (issues 8103 and 4711, no RST_STREAM/GOAWAY with a chosen
code). The handle finds the flow's HttpStream (locate.py), installs a wrapper on its event entry
point (stream.py), and then:

* diverts the upstream's response (or the client's request body) events to a sink of faultproxy's
  own types (messages.py) instead of mitmproxy;
* injects HTTP events (headers, data, trailers, end, errors) through mitmproxy's normal path, on our
  own timers: an `Op` (ops.py) is handed to the connection handler's `server_event`, which runs the
  layer stack under mitmproxy's event lock and writes the resulting bytes before it returns;
* writes RST_STREAM and GOAWAY with a chosen code on the client-side h2 connection, from inside the
  owning HttpLayer, so the frames go up through the TLS layer like any other output;
* closes the client connection (FIN or TCP RST) and pauses the upstream socket (transport.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.errors
from mitmproxy import ctx, http
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events
from mitmproxy.proxy import layer as mlayer
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy.layers import http as mhttp
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client
from mitmproxy.proxy.layers.http._http2 import Http2Client

from .checks import Checker
from .codes import h2_error_name, server_error_code
from .connections import install_upstream_close_fix
from .locate import client_h2, exchange_connection, find_stream, route_for
from .messages import ClientEvent, UpstreamEvent
from .ops import Op, wrap_http_layer
from .stream import INJECTED_RESPONSES, inside_hook_of, resolve, stream_state
from .transport import conn_transport, transport_holds

log = logging.getLogger("faultproxy._mitm")

# Chromium sometimes drops the last DATA frame of a stream when RST_STREAM follows in the same
# moment (2 of 3 runs on 11.0.2, facts file); "a few tens of milliseconds" between the last data and
# the reset made every run deliver every event. reset_stream() therefore (1) waits until everything
# injected before it has been processed, (2) waits until the client socket's write buffer is empty
# (handed to the kernel), and (3) keeps at least this gap after the last DATA of the stream.
RST_AFTER_DATA_GAP = 0.05
# Upper bound for (1)+(2): if the stream stays paused on a slow hook, reset anyway after this long.
SETTLE_TIMEOUT = 2.0

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
        self._route = route_for(stream)
        self._st = stream_state(stream)
        self._st.pauser = self._apply_pause
        self.stream_id = stream.stream_id
        self.client_is_http2 = client_h2(layer_) is not None
        for lay in stream.context.layers:
            if isinstance(lay, HttpLayer):
                wrap_http_layer(lay)

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
            found = find_stream(handler.layer, flow)
            if found is None:
                return None
            return cls(flow, handler, ps, *found)
        except Exception:
            log.exception("faultproxy: cannot find mitmproxy's stream for %s", getattr(flow, "id", flow))
            return None

    @staticmethod
    def injecting(flow: http.HTTPFlow) -> bool:
        """True while flow.response is headers this module injected (from responseheaders: don't divert them again)."""
        return flow.response is not None and flow.response in INJECTED_RESPONSES

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

    def _op(self, kind: str, payload: Any = None) -> Op:
        return Op(kind, self._layer, self._stream, self._route, payload)

    async def _dispatch(self, op: Op) -> bool:
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
        delivered = await self._dispatch(self._op("event", event))
        if not delivered:
            self._st.injected.pop(id(event), None)
            resolve(fut, False)
            return False
        while not fut.done():
            if inside_hook_of(self._stream):
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
            and not inside_hook_of(self._stream)
            and time.monotonic() < deadline
            and self.alive
        ):
            await asyncio.sleep(0.005)
        pending = [f for f in self._st.pending if not f.done()]
        if pending and not inside_hook_of(self._stream):  # from inside the hook they wait for: no use
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
        INJECTED_RESPONSES.add(response)
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
        return await self._inject(ResponseProtocolError(self.stream_id, message, server_error_code()))

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
        ok = await self._dispatch(self._op("reset", int(code)))
        if ok:
            self._note_frame("RST_STREAM", code)
            # mitmproxy's abort path closes/resets the upstream only while it is mid-response; make sure.
            await self._dispatch(self._op("cancel_upstream"))
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
        op = self._op("goaway", (int(code), last_stream_id, bytes(debug_data)))
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
        if not await self._dispatch(self._op("client_error", message)):
            return None
        await self.close_client(reset=reset)
        return "reset" if reset else "close"

    async def _flush_client(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        transport = conn_transport(self._handler, self._client)
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
            await self._dispatch(self._op("cancel_upstream"))
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
        await self._dispatch(self._op("cancel_upstream"))

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
            holds = transport_holds(transport)
            holds.discard(id(self._st))
            if not holds and not transport.is_closing():
                transport._faultproxy_resume()  # type: ignore[attr-defined]
        except Exception:
            log.exception("faultproxy: resume_upstream failed")

    def _apply_pause(self) -> None:
        if self._st.paused_transport is not None or not self._st.pause_wanted:
            return
        try:
            found = exchange_connection(self._layer, self._stream)
            transport = conn_transport(self._handler, found[1]) if found else None
            if transport is None:
                return
            transport_holds(transport).add(id(self._st))
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



def check(c: Checker) -> None:
    """The mitmproxy internals this module relies on (see checks.py)."""
    CH = mserver.ConnectionHandler
    c.need(
        'name=f"handle_hook({command.name})"' in c.src(CH.server_event),
        "ConnectionHandler.server_event no longer names hook tasks handle_hook(<name>) (FlowHandle._inject)",
    )
    c.need("_paused" in c.src(mlayer.Layer.__init__), "Layer._paused (pending blocking command) is gone")
    c.need("_server_event_lock" in c.src(CH.server_event), "ConnectionHandler.server_event has no event lock any more")
    c.need(
        "_paused_event_queue" in c.src(HttpStream.check_killed) and "RequestProtocolError" in c.src(HttpStream.check_killed),
        "HttpStream.check_killed no longer finds a client protocol error queued behind a hook (FlowHandle.refuse)",
    )
    c.need("our_stream_id" in c.src(Http2Client.__init__), "Http2Client.our_stream_id (stream id mapping) is gone")
    c.need(
        "ResponseTrailers" not in c.src(mhttp._http1.Http1Server.send),
        "Http1Server.send handles trailers now: send_end could pass them to HTTP/1 clients",
    )
    c.need(
        "RequestProtocolError" in c.src(Http1Client.send) and "CloseConnection" in c.src(Http1Client.send),
        "Http1Client.send no longer closes the upstream connection on RequestProtocolError",
    )
    c.need(
        "highest_inbound_stream_id" in c.src(h2.connection.H2Connection),
        "h2.connection.H2Connection.highest_inbound_stream_id is gone (GOAWAY default last_stream_id)",
    )
