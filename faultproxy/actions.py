"""How a stream that a fault ends shows on the wire: the `action:` field of `cut` and `timeout`.

- `status`    before response headers: answer with `status` (default 504) and `body`. After headers
              it cannot be done; falls back to `close` and the journal says so.
- `close`     TCP FIN on the client connection. HTTP/1.1: a truncated chunked body; HTTP/2: the whole
              connection goes.
- `reset`     TCP RST on the client connection.
- `end`       a clean end of the body (terminating chunk / END_STREAM).
- `rst_stream` HTTP/2: RST_STREAM with `code` on this stream only. HTTP/1.x: falls back to `reset`.
- `goaway`    HTTP/2: GOAWAY with `code`, `last_stream_id`, `debug_data`; the connection closes after
              `grace`. HTTP/1.x: falls back to `close`.
- `blackhole` the stream goes silent: nothing more reaches the client, no FIN, no RST, no frame, and
              faultproxy never closes the client connection itself; the client finds out only with a
              watchdog of its own (or when it gives up). What an AWS NLB does after 350 s idle. The
              upstream side is closed silently. HTTP/2: this stream only; the connection stays alive.

Whatever the action, the flow's upstream connection is closed too, as a real proxy does, so an
origin's disconnect handling can be tested.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Annotated, Literal

from mitmproxy import http
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema

from .units import Duration

if TYPE_CHECKING:
    from .engine import Hit, StreamSession


class H2ErrorCode(enum.IntEnum):
    """RFC 9113 section 7 error codes."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def code_name(code: int) -> str:
    try:
        return H2ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


def parse_error_code(value: object) -> int:
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if 0 <= value <= 0xFFFFFFFF:
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        if name in H2ErrorCode.__members__:
            return int(H2ErrorCode[name])
    names = ", ".join(H2ErrorCode.__members__)
    raise ValueError(f"expected an HTTP/2 error code name ({names}) or a number, got {value!r}")


ErrorCode = Annotated[
    int,
    BeforeValidator(parse_error_code),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": list(H2ErrorCode.__members__)},
                {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF},
            ],
            "description": "RFC 9113 error code, by name or number",
        }
    ),
]

ActionName = Literal["status", "close", "reset", "end", "rst_stream", "goaway", "blackhole"]


class ActionFields(BaseModel):
    """Fields shared by every kind that ends a stream."""

    action: ActionName = "close"
    status: int = Field(504, ge=100, le=599, description="for action: status")
    body: str = Field("", description="for action: status")
    code: ErrorCode = Field(int(H2ErrorCode.INTERNAL_ERROR), description="for rst_stream and goaway")
    last_stream_id: int | None = Field(None, ge=0, description="for goaway; default: the highest stream processed")
    debug_data: str = Field("", description="for goaway")
    grace: Duration = Field(0.0, description="for goaway: how long streams at or below last_stream_id may go on")
    before_headers: ActionName | None = Field(
        None, description="the action when it fires before the response headers went out (e.g. status 504)"
    )
    http1: Literal["close", "reset", "end"] | None = Field(
        None,
        description="for HTTP/1.x clients in place of rst_stream/goaway (default: reset for rst_stream, close for goaway)",
    )

    def effective(self, *, headers_sent: bool) -> ActionName:
        if not headers_sent and self.before_headers is not None:
            return self.before_headers
        return self.action

    async def perform(self, session: StreamSession, hit: Hit, reason: str) -> None:
        """End the flow's client-side response with this action (engine.CutAction)."""
        await perform(session, self, hit, reason)


def drains(session: StreamSession, action: ActionFields, hit: Hit) -> bool:
    """Whether this action is a GOAWAY that lets the stream go on for `grace` (an HTTP/2 client, the
    stream at or below last_stream_id): then the stream must keep flowing while the connection drains,
    instead of ending at the trigger (see `start_drain`)."""
    handle = session.handle
    return (
        not hit.dry_run
        and handle is not None
        and handle.client_is_http2
        and action.effective(headers_sent=session.headers_sent_at is not None) == "goaway"
        and action.grace > 0
        and (action.last_stream_id is None or action.last_stream_id >= handle.stream_id)
    )


def start_drain(session: StreamSession, action: ActionFields, hit: Hit, reason: str) -> None:
    """GOAWAY now, in the background; the caller keeps forwarding the stream. The connection closes
    after `grace` (or once no stream at or below last_stream_id is left), and the journal says so."""
    handle = session.handle
    assert handle is not None

    async def drain() -> None:
        started = time.monotonic()
        ok = await handle.goaway(action.code, action.last_stream_id, action.debug_data.encode(), action.grace)
        if not ok:
            gone = f"GOAWAY impossible: the connection is gone ({reason})"
            hit.record(gone, action="goaway", bytes_sent=session.bytes_sent)
            return
        hit.record(
            f"GOAWAY {code_name(action.code)} last_stream_id={handle.goaway_last_stream_id} "
            f"(stream {handle.stream_id}); "
            f"the stream went on for {time.monotonic() - started:.3f}s, then the connection was closed ({reason})",
            action="goaway",
            bytes_sent=session.bytes_sent,
            **wire_fields(session),
        )

    # Shielded: closing the connection ends the flow, whose error hook cancels the session's tasks.
    session.spawn(asyncio.shield(drain()), "goaway drain")


async def perform(session: StreamSession, action: ActionFields, hit: Hit, reason: str) -> None:
    """End the flow's client-side response as `action` says, and journal what the client saw."""
    action_name = action.effective(headers_sent=session.headers_sent_at is not None)
    outcome = await _perform(session, action, hit)
    hit.record(f"{outcome} ({reason})", action=action_name, bytes_sent=session.bytes_sent, **wire_fields(session))


def wire_fields(session: StreamSession) -> dict[str, object]:
    """The frame the action put on the wire, for the journal: frame, code, code_name, stream_id
    (and last_stream_id for GOAWAY); nothing when no HTTP/2 frame was sent (HTTP/1.x fallbacks)."""
    frame = session.handle.last_frame if session.handle is not None else None
    return dict(frame) if frame else {}


async def _perform(session: StreamSession, action: ActionFields, hit: Hit) -> str:
    handle = session.handle
    if hit.dry_run:
        return f"would {action.action}"
    if handle is None:
        return "flow no longer live"
    headers_sent = session.headers_sent_at is not None
    kind = action.effective(headers_sent=headers_sent)
    note = ""
    if kind == "status":
        if not headers_sent:
            response = http.Response.make(
                action.status, action.body.encode(), {"content-type": "text/plain; charset=utf-8"}
            )
            if await session.answer(response):
                return f"status {action.status}"
        kind, note = "close", "status impossible after response headers; "
    if kind == "end":
        if headers_sent:
            session.take_over()
            await handle.send_end()
            await handle.close_upstream()
            return "clean end of body"
        kind, note = "close", "a clean end needs response headers; "
    if kind == "blackhole":
        # Take the response away from mitmproxy (nothing more reaches the client, no end, no error),
        # drop the upstream exchange (the origin sees its connection close, as behind a load balancer
        # that forgot the flow) and leave the client connection open: we never close it ourselves.
        session.take_over()
        await handle.close_upstream()
        where = "stream" if handle.client_is_http2 else "connection"
        return f"black hole: upstream closed, nothing more sent, client {where} left open until the client gives up"
    if kind in ("rst_stream", "goaway") and not handle.client_is_http2:
        fallback = action.http1 or ("reset" if kind == "rst_stream" else "close")
        note = f"{kind} needs HTTP/2, client speaks {session.flow.request.http_version}; "
        kind = fallback
        if kind == "end":
            session.take_over()
            await handle.send_end()
            await handle.close_upstream()
            return f"{note}clean end of body"
    session.take_over()
    if kind == "rst_stream":
        if not await handle.reset_stream(action.code):
            return f"RST_STREAM {code_name(action.code)} not sent: stream {handle.stream_id} was already closed"
        return f"{note}RST_STREAM {code_name(action.code)} on stream {handle.stream_id}"
    if kind == "goaway":
        last = await handle.goaway(
            action.code, action.last_stream_id, action.debug_data.encode(), action.grace
        )
        last_id = last if isinstance(last, int) and not isinstance(last, bool) else handle.goaway_last_stream_id
        return f"{note}GOAWAY {code_name(action.code)} last_stream_id={last_id} (stream {handle.stream_id})"
    if kind == "reset":
        await handle.close_client(reset=True)
        return f"{note}TCP RST"
    await handle.close_client(reset=False)
    truncated = " (truncated body)" if headers_sent else ""
    return f"{note}connection closed{truncated}"
