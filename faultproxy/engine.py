"""The streaming engine: shapes a live response body in time, on its own clock.

mitmproxy hands a streamed body to addons only as a synchronous callback that runs when upstream data
arrives (mitmproxy issue 8103), and cannot end a flow in transit (issue 4711). So for a faulted flow
the engine takes the response over (see `_mitm.FlowHandle`): the upstream's body events are diverted
into an input channel, a chain of stages (one per fault, Toxiproxy-style) moves items from channel to
channel, and a sink writes what comes out to the client by injecting events, on timers, without ever
blocking mitmproxy's event loop.

Items are `Data`, and exactly one terminal item per stream: `End` (the upstream finished), `Fail`
(the upstream broke) or `Cut` (a fault ends the stream with an action). Every stage forwards the
terminal item it receives and then returns; a stage never drops body bytes except when a Cut ends
the stream (then the client holds a prefix of the upstream's bytes, never a reordering). A stage
that holds bytes (buffer, compress) and receives a Cut is a buffering hop whose upstream broke: it
drops what it holds, as nginx drops its gzip buffers when its upstream times out — except for a
Cut whose action is `end`, which that hop cannot tell from the upstream's own clean end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy import http

from . import _mitm
from .journal import Journal

log = logging.getLogger("faultproxy")


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class End:
    trailers: Any = None


@dataclass(slots=True)
class Fail:
    message: str


class CutAction(Protocol):
    """How a Cut shows on the wire (actions.ActionFields is the one implementation): the engine's sink
    hands the session to `perform`, and stages ask `effective` whether it is a clean end."""

    def effective(self, *, headers_sent: bool) -> str: ...

    async def perform(self, session: StreamSession, hit: Hit, reason: str) -> None: ...


class AppliedFault(Protocol):
    """What the engine and the journal need of a configured fault kind (faults.base.Fault is one)."""

    kind: str

    @property
    def config(self) -> Any: ...


class Hit:
    """One fault applied to one flow: the place kinds record what they did and reach the engine."""

    def __init__(
        self,
        *,
        flow: http.HTTPFlow,
        rule: str,
        profile: str,
        fault: AppliedFault,
        rng: random.Random,
        journal: Journal,
        session_factory: Callable[[], StreamSession],
        dry_run: bool,
        counters: Any = None,
    ):
        self.flow = flow
        self.rule = rule
        self.profile = profile
        self.fault = fault
        self.rng = rng
        self.journal = journal
        self._session_factory = session_factory
        self.dry_run = dry_run
        self.counters = counters  # the rule's matching.RuleCounters: `injected` counts once per hit
        self._counted = False

    @property
    def session(self) -> StreamSession:
        """The flow's streaming-engine session (created on first use, shared by every fault on the flow)."""
        return self._session_factory()

    def record(self, outcome: str, **extra: Any) -> None:
        """Journal what the client saw because of this fault."""
        if self.counters is not None and not self.dry_run and not self._counted:
            self._counted = True
            self.counters.injected += 1
        self.journal.record(
            self.flow,
            profile=self.profile,
            rule=self.rule,
            fault=self.fault.kind,
            params=self.fault.config.describe(),
            outcome=outcome,
            dry_run=self.dry_run,
            **extra,
        )


@dataclass(slots=True)
class Cut:
    """A fault ends the stream: the sink has `action` performed for this hit."""

    action: CutAction
    hit: Hit
    reason: str


Item = Data | End | Fail | Cut
TERMINAL = (End, Fail, Cut)


def ends_cleanly(item: Item) -> bool:
    """An End, or a Cut whose action is a clean end of the body: what a stage after it sees as the end."""
    return isinstance(item, End) or (isinstance(item, Cut) and item.action.effective(headers_sent=True) == "end")


_TIMED_OUT = object()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Channel:
    """A FIFO of items between two stages, bounded by watermarks so no stage can queue without limit.

    Stages `await send(item)`, which waits while more than `high` bytes are queued, until the
    consumer has brought it down to `low`. The upstream feed is a synchronous callback and cannot
    wait, so it uses `put`; the first channel of a pipeline instead calls `on_high` (stop reading the
    upstream socket, so TCP pushes back on the origin) and `on_low` (read again).
    """

    __slots__ = ("_items", "_waiter", "_room", "queued", "high", "low", "on_high", "on_low", "_paused", "closed")

    def __init__(
        self,
        *,
        high: int = 1 << 20,
        low: int = 256 << 10,
        on_high: Callable[[], None] | None = None,
        on_low: Callable[[], None] | None = None,
    ):
        self._items: collections.deque[Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.queued = 0
        self.high, self.low = high, low
        self.on_high, self.on_low = on_high, on_low
        self._paused = False
        self.closed = False  # a terminal item was put

    def put(self, item: Item) -> None:
        if self.closed:
            return  # after the terminal item nothing more belongs to this stream
        if isinstance(item, TERMINAL):
            self.closed = True
        self._items.append(item)
        if isinstance(item, Data):
            self.queued += len(item.data)
            if self.high and not self._paused and self.queued > self.high and self.on_high:
                self._paused = True
                self.on_high()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, item: Item) -> None:
        """Put, then wait while the consumer is more than `high` bytes behind (backpressure)."""
        self.put(item)
        while self.queued > self.high:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _took(self, item: Item) -> Item:
        if isinstance(item, Data):
            self.queued -= len(item.data)
            if self.queued <= self.low:
                if self._paused and self.on_low:
                    self._paused = False
                    self.on_low()
                if self._room is not None and not self._room.done():
                    self._room.set_result(None)
        return item

    async def get(self, timeout: float | None = None) -> Item | None:
        """The next item; None if `timeout` seconds pass first."""
        while not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timeout is one timer handle on the loop's heap that resolves the same waiter `put`
            # resolves (not wait_for + shield: a task-like wrapper and two extra futures per get).
            timer = None if timeout is None else loop.call_later(max(timeout, 0), _expire, waiter)
            try:
                if await waiter is _TIMED_OUT:
                    return None
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._took(self._items.popleft())

    def __len__(self) -> int:
        return len(self._items)


class Stage(ABC):
    """One fault's place in a body pipeline: read items from `src`, write them to `dst`."""

    # Stages that must see the upstream's own timing (idle timeouts) run first, whatever the order.
    at_upstream: bool = False
    # Stages that change the bytes' representation (gzip) run last, whatever the order, so that every
    # other stage (and every trigger on bytes or events) sees the upstream's own bytes.
    at_client: bool = False

    def __init__(self, hit: Hit):
        self.hit = hit

    @abstractmethod
    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        """Move items until a terminal item has been forwarded, then return."""


async def passthrough(src: Channel, dst: Channel) -> None:
    """Forward everything until the terminal item (for a stage that has finished its work)."""
    while True:
        item = await src.get()
        await dst.send(item)
        if isinstance(item, TERMINAL):
            return


def wants_streaming(response: http.Response | None) -> bool:
    """Whether mitmproxy must stream this response for the proxy to stay transparent in time.

    mitmproxy reads a whole response before sending it on unless it is streamed (issue 4469): an
    SSE stream, faulted or not, would reach the client only when it ends. Event streams and bodies
    of unknown length (chunked, or read until close) are streamed; a body with a Content-Length is
    left to mitmproxy's own `stream_large_bodies`.
    """
    if response is None or response.stream or response.status_code < 200 or response.status_code in (204, 304):
        return False
    # One pass over the raw header fields: Headers.get and `in` each cost more than this whole loop,
    # and this runs for every response under faultproxy.
    ctype = None
    has_length = False
    for name, value in response.headers.fields:
        name = name.lower()
        if name == b"content-type":
            ctype = value if ctype is None else ctype
        elif name == b"content-length":
            has_length = True
    return not has_length or (ctype is not None and ctype.split(b";")[0].strip().lower() == b"text/event-stream")


def stream_request_body(flow: http.HTTPFlow) -> None:
    """Have mitmproxy stream this request's body (for a request pipeline), keeping it well-framed.

    An HTTP/2 (or 3) request may have a body without content-length. Not streamed, mitmproxy reads
    it whole and sets the length; streamed to an HTTP/1.1 upstream, mitmproxy writes the head with
    neither length nor chunked encoding and then the raw body, which the origin cannot delimit (it
    answers at once and reads the body as the next request). Chunked encoding fixes that. Only for a
    plain-http upstream, which is always HTTP/1.1: an HTTPS upstream may speak HTTP/2, where
    transfer-encoding is a forbidden header.
    """
    flow.request.stream = True
    req = flow.request
    if (
        req.http_version.startswith(("HTTP/2", "HTTP/3"))
        and "content-length" not in req.headers
        and "transfer-encoding" not in req.headers
        and req.scheme == "http"
    ):
        req.headers["transfer-encoding"] = "chunked"


# Set on a flow whose response headers the engine made up: the addon's responseheaders hook sees
# them go through mitmproxy and must not treat them as the upstream's.
INJECTED_HEADERS = "faultproxy.injected_headers"

# How much a pipeline may queue before the upstream is asked to wait (see Channel).
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10  # resume well below the mark, so pausing does not flap per chunk


class StreamSession:
    """The engine's hold on one flow: the handle, the pipeline, the timers, and what the client has got."""

    def __init__(self, flow: http.HTTPFlow, handle: _mitm.FlowHandle | None):
        self.flow = flow
        self.handle = handle
        self.request_sent_at: float | None = None
        self.headers_sent_at: float | None = None
        self.last_upstream_at: float | None = None  # any upstream byte, headers included
        self.bytes_sent = 0
        self.last_send_at: float | None = None
        self.finished = False  # the client-side response is over (ended, cut, or replaced)
        self.diverted = False
        self.input: Channel | None = None
        self._trailers: Any = None
        self.request_input: Channel | None = None  # the client's request body, when a request pipeline runs
        self._request_trailers: Any = None
        self.upstream_paused_at: float | None = None  # the engine stopped reading the upstream (backpressure)
        self._stage_tasks: list[asyncio.Task[Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watches: list[asyncio.Task[Any]] = []
        self.on_finish: list[Callable[[], None]] = []

    # --- upstream side -------------------------------------------------------------------------

    def _divert(self, keep: bool) -> None:
        """Take the upstream's response events away from mitmproxy; keep them (pipeline) or drop them."""
        if self.handle is None or self.diverted:
            return
        self.diverted = True
        if keep:
            self.input = Channel(on_high=self._pause_upstream, on_low=self._resume_upstream)
        self.handle.divert_upstream(self._from_upstream)

    def _pause_upstream(self) -> None:
        assert self.handle is not None
        self.upstream_paused_at = time.monotonic()
        self.handle.pause_upstream()

    def _resume_upstream(self) -> None:
        assert self.handle is not None
        # While we did not read, the upstream's silence was ours: an idle timeout (like nginx's read
        # timer, armed only while nginx wants to read) starts counting again from now.
        self.upstream_paused_at = None
        self.last_upstream_at = time.monotonic()
        self.handle.resume_upstream()

    def _from_upstream(self, event: Any) -> None:
        self.last_upstream_at = time.monotonic()
        if self.input is None:
            return
        if isinstance(event, _mitm.UpstreamData):
            if event.data:
                self.input.put(Data(event.data))
        elif isinstance(event, _mitm.UpstreamTrailers):
            self._trailers = event.trailers  # mitmproxy sends trailers with the end, so do we
        elif isinstance(event, _mitm.UpstreamEnd):
            self.input.put(End(self._trailers))
        elif isinstance(event, _mitm.UpstreamError):
            self.input.put(Fail(event.message))

    def note_request_sent(self) -> None:
        self.request_sent_at = self.last_upstream_at = time.monotonic()

    def note_headers(self) -> None:
        """The upstream's response headers arrived: pre-header watches are over."""
        self.last_upstream_at = time.monotonic()
        for w in self._watches:
            w.cancel()
        self._watches.clear()

    # --- timers --------------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._guard(coro, name), name=f"faultproxy {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Awaitable[Any], name: str) -> Any:
        # A failing fault must never take the proxy or other flows down: log and move on.
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("faultproxy: %s failed on %s", name, self.flow.request.pretty_url)

    def watch_before_headers(self, delay: float, fire: Callable[[], Awaitable[None]], name: str) -> None:
        """Run `fire` after `delay` seconds unless the response headers arrive first."""

        async def waiter() -> None:
            await asyncio.sleep(delay)
            if not self.finished and self.headers_sent_at is None:
                # From here on this task is an action, no longer a watch: the action finishes the
                # session (which cancels watches) and makes mitmproxy end the flow (whose error hook
                # cancels the session's tasks). Neither may stop it half-way.
                me = asyncio.current_task()
                if me in self._watches:
                    self._watches.remove(me)  # type: ignore[arg-type]
                await asyncio.shield(fire())

        self._watches.append(self.spawn(waiter(), name))

    # --- the pipeline --------------------------------------------------------------------------

    def start_pipeline(self, stages: list[Stage]) -> None:
        """Divert the body and run it through `stages` to the client. Call from `responseheaders`."""
        if self.handle is None:
            return
        self._divert(keep=True)
        assert self.input is not None
        ordered = (
            [s for s in stages if s.at_upstream]
            + [s for s in stages if not s.at_upstream and not s.at_client]
            + [s for s in stages if s.at_client and not s.at_upstream]
        )
        src = self.input
        for stage in ordered:
            dst = Channel(high=HIGH_WATER, low=LOW_WATER)
            self._stage_tasks.append(self.spawn(self._run_stage(stage, src, dst), f"{type(stage).__name__}"))
            src = dst
        self.spawn(self._sink(src), "sink")

    async def _run_stage(self, stage: Stage, src: Channel, dst: Channel) -> None:
        try:
            await stage.pipe(src, dst, self)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A broken stage must not leave the client hanging on a stream nobody feeds: the client
            # sees the stream break as if the upstream had failed, and the upstream is let go.
            log.exception("faultproxy: %s failed on %s", type(stage).__name__, self.flow.request.pretty_url)
            dst.put(Fail(f"faultproxy: {type(stage).__name__} failed"))

    async def _sink(self, src: Channel) -> None:
        try:
            while True:
                item = await src.get()
                if isinstance(item, Data):
                    if not await self.send(item.data):
                        self._finish()
                        return
                elif isinstance(item, End):
                    await self.end(item.trailers)
                    return
                elif isinstance(item, Fail):
                    # The upstream broke mid-stream: let mitmproxy's own error path show it, as without faults.
                    self._finish()
                    if self.handle is not None:
                        await self.handle.send_error(item.message)
                    return
                elif isinstance(item, Cut):
                    # Shielded: the action itself makes mitmproxy end the flow, whose error hook cancels
                    # this session's tasks; the action must still finish and be journaled.
                    await asyncio.shield(item.action.perform(self, item.hit, item.reason))
                    return
        finally:
            # The client-side response is over. A Cut can come from the middle of the pipeline, so
            # stages before it may still wait on the upstream: nothing reads what they would send.
            for task in self._stage_tasks:
                task.cancel()

    # --- the request body pipeline (slow uploads) ------------------------------------------------

    def start_request_pipeline(self, stages: list[Stage]) -> None:
        """Divert the client's request body and run it through `stages` to the upstream.

        Must be called from `requestheaders` with `flow.request.stream = True`: mitmproxy streams the
        body events right after that hook, and runs the `request` hook only once the body has ended,
        which would be too late to divert it. A second call is a no-op.
        """
        if self.handle is None or self.request_input is not None:
            return
        # No backpressure towards the client here (mitmproxy offers no per-flow pause of the client
        # socket through FlowHandle): the body is queued while the stages pace it.
        self.request_input = Channel()
        self.handle.divert_request(self._from_client)
        src = self.request_input
        for stage in stages:
            dst = Channel(high=HIGH_WATER, low=LOW_WATER)
            self.spawn(self._run_stage(stage, src, dst), f"request {type(stage).__name__}")
            src = dst
        self.spawn(self._request_sink(src), "request sink")

    def _from_client(self, event: Any) -> None:
        assert self.request_input is not None
        if isinstance(event, _mitm.ClientData):
            if event.data:
                self.request_input.put(Data(event.data))
        elif isinstance(event, _mitm.ClientTrailers):
            self._request_trailers = event.trailers
        elif isinstance(event, _mitm.ClientEnd):
            self.request_input.put(End(self._request_trailers))

    async def _request_sink(self, src: Channel) -> None:
        assert self.handle is not None
        while True:
            item = await src.get()
            if isinstance(item, Data):
                if not await self.handle.send_request_data(item.data):
                    return  # the flow is gone (client left, or the response already ended it)
            elif isinstance(item, End):
                await self.handle.send_request_end(item.trailers)
                return
            else:
                # A stage failed (no request-side kind cuts yet; a client that breaks off never
                # reaches here: mitmproxy ends the flow with an error and cancel() stops this task).
                # The upstream would wait for the rest of the body forever: let it go.
                await self.handle.close_upstream()
                return

    async def send(self, data: bytes) -> bool:
        if self.finished or self.handle is None:
            return False
        ok = await self.handle.send_data(data)
        if ok:
            self.bytes_sent += len(data)
            self.last_send_at = time.monotonic()
        return ok

    async def end(self, trailers: Any = None) -> None:
        if self.finished or self.handle is None:
            return
        self._finish()
        await self.handle.send_end(trailers)

    def mark_headers_sent(self) -> None:
        self.headers_sent_at = time.monotonic()

    # --- taking a response over ----------------------------------------------------------------

    async def replace_response(self, response: http.Response) -> None:
        """From `responseheaders`: the client gets `response` instead of the upstream's, which is dropped."""
        flow = self.flow
        body = response.raw_content or b""
        flow.response = response
        flow.response.stream = False
        if self.handle is None:
            return
        self._divert(keep=False)
        self._finish()
        # Injected while the responseheaders hook is pending: mitmproxy queues them and processes them
        # in order right after the hook, as the (consumed, not streamed) body of our response.
        self.spawn(self._finish_replacement(body), "replace response")

    async def _finish_replacement(self, body: bytes) -> None:
        assert self.handle is not None
        if body:
            await self.handle.send_data(body)
        await self.handle.send_end()
        await self.handle.close_upstream()

    async def answer(self, response: http.Response) -> bool:
        """Before the upstream's headers: answer with our own response now. False if headers already went."""
        if self.handle is None or self.headers_sent_at is not None or self.finished:
            return False
        self._divert(keep=False)
        self._finish()
        body = response.raw_content or b""
        response.stream = False
        self.flow.metadata[INJECTED_HEADERS] = True
        await self.handle.send_headers(response)
        if body:
            await self.handle.send_data(body)
        await self.handle.send_end()
        await self.handle.close_upstream()
        return True

    def take_over(self) -> None:
        """Stop mitmproxy from processing anything more from the upstream (an action is ending the flow)."""
        self._divert(keep=False)
        self.input = None  # a running pipeline stops taking in upstream data: nobody would read it
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for w in self._watches:
            w.cancel()
        for cb in self.on_finish:
            cb()

    def cancel(self) -> None:
        """The flow is over (client gone, error): stop every timer and stage of it."""
        self.finished = True
        for task in list(self._tasks):
            task.cancel()
