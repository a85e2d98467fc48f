"""When a fault inside a stream fires: `after` (seconds since the response headers were forwarded),
`after_bytes` (body bytes forwarded) or `after_events` (complete SSE events forwarded).

A trigger on bytes or events fires exactly on that boundary: the stage splits a chunk there, so with
`after_events: 3` the client holds exactly three events and never part of a fourth. Bytes and events
are the upstream's own (a `compress` stage always runs after every other stage). A stage that holds
bytes and sits after the cutting stage in the profile (`buffer`) is a hop whose upstream broke: it
drops what it holds unless the action is `end` (see engine.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from .engine import Channel, Data, Item
from .sse import EventScanner
from .units import Duration, Size

if TYPE_CHECKING:
    from .engine import StreamSession


class TriggerFields(BaseModel):
    after: Duration | None = Field(None, description="seconds after the response headers were forwarded")
    after_bytes: Size | None = Field(None, description="once this many body bytes were forwarded")
    after_events: int | None = Field(None, ge=0, description="once this many complete SSE events were forwarded")

    @model_validator(mode="after")
    def _exactly_one(self):  # type: ignore[no-untyped-def]
        given = [n for n in ("after", "after_bytes", "after_events") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one trigger of after, after_bytes, after_events; got {', '.join(given)}")
        return self

    def has_trigger(self) -> bool:
        return any(getattr(self, n) is not None for n in ("after", "after_bytes", "after_events"))

    def describe_trigger(self) -> str:
        if self.after_events is not None:
            return f"after {self.after_events} events"
        if self.after_bytes is not None:
            return f"after {self.after_bytes} bytes"
        if self.after is not None:
            return f"after {self.after:.3f}s"
        return "at once"


class Trigger:
    """Tracks one stream against a trigger, splitting chunks at the exact boundary."""

    def __init__(self, fields: TriggerFields, session: StreamSession):
        self.fields = fields
        self.session = session
        self.bytes = 0
        self.scanner = EventScanner() if fields.after_events is not None else None
        self.fired = fields.after_events == 0 or fields.after_bytes == 0 or not fields.has_trigger()

    def deadline(self) -> float | None:
        """Monotonic time at which a time trigger fires (counted from the headers going out)."""
        if self.fields.after is None:
            return None
        start = self.session.headers_sent_at or time.monotonic()
        return start + self.fields.after

    def split(self, data: bytes) -> tuple[bytes, bytes]:
        """(part before the trigger point, part from it on). Sets `fired` when the point is inside."""
        if self.fired:
            return b"", data
        if self.fields.after_bytes is not None:
            room = self.fields.after_bytes - self.bytes
            if len(data) >= room:
                self.fired = True
                self.bytes += room
                return data[:room], data[room:]
            self.bytes += len(data)
            return data, b""
        if self.scanner is not None:
            target = self.fields.after_events
            assert target is not None
            already = self.scanner.events
            ends = self.scanner.feed(data)
            if already + len(ends) >= target:
                self.fired = True
                cut_at = ends[target - already - 1]
                return data[:cut_at], data[cut_at:]
            return data, b""
        return data, b""

    def remaining(self) -> float | None:
        d = self.deadline()
        return None if d is None else d - time.monotonic()


async def forward_until(trigger: Trigger, src: Channel, dst: Channel) -> tuple[Item | None, bytes]:
    """Forward items until the trigger fires. Returns (terminal item if the stream ended first, or
    None) and the bytes of the chunk that lie past the trigger point (not yet forwarded)."""
    while not trigger.fired:
        timeout = trigger.remaining()
        if timeout is not None and timeout <= 0:
            trigger.fired = True
            break
        item = await src.get(timeout)
        if item is None:  # the time trigger came first
            trigger.fired = True
            break
        if not isinstance(item, Data):
            return item, b""
        before, after = trigger.split(item.data)
        if before:
            await dst.send(Data(before))
        if trigger.fired:
            return None, after
    return None, b""
