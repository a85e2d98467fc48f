"""`stall`: after a trigger, forward nothing for `for` (or until the client gives up), then go on.

The connection stays open and silent: a black-holed stream that only a client-side watchdog can
detect. Everything the upstream sent meanwhile is held and delivered afterwards, in order; none is lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from ..engine import Channel, Data, Stage, StreamSession, passthrough
from ..triggers import Trigger, TriggerFields, forward_until
from ..units import Duration
from .base import Fault, FaultConfig, Hit
from .registry import register


class StallConfig(FaultConfig, TriggerFields):
    type: Literal["stall"]
    for_: Duration | None = Field(None, alias="for", description="how long to stay silent; omit: until the client gives up")


class StallStage(Stage):
    def __init__(self, hit: Hit, config: StallConfig):
        super().__init__(hit)
        self.config = config

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        trigger = Trigger(self.config, session)
        ended, rest = await forward_until(trigger, src, dst)
        if ended is not None:
            await dst.send(ended)
            return
        started = time.monotonic()
        if self.config.for_ is None:
            self.hit.record(f"stream stalled {self.config.describe_trigger()} until the client gives up")
            if session.handle is not None:
                await session.handle.wait_client_closed()
            return
        # Items keep arriving in src meanwhile; they wait there (the channel applies backpressure).
        await asyncio.sleep(self.config.for_)
        if rest:
            await dst.send(Data(rest))
        self.hit.record(
            f"stream stalled {time.monotonic() - started:.3f}s {self.config.describe_trigger()}",
            held_bytes=src.queued + len(rest),
        )
        await passthrough(src, dst)


@register
class Stall(Fault[StallConfig]):
    Config = StallConfig
    streams_response = True

    def body_stage(self, hit: Hit) -> Stage:
        return StallStage(hit, self.config)
