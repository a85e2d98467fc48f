"""`slice`: dribble the body in pieces of `size` bytes with `delay` between pieces.

What a congested mobile link or a proxy that flushes tiny writes looks like: the bytes all arrive,
in order, just cut into many small reads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from ..engine import TERMINAL, Channel, Data, Stage, StreamSession
from ..units import Duration, Size
from .base import Fault, FaultConfig, Hit
from .registry import register


class SliceConfig(FaultConfig):
    type: Literal["slice"]
    size: Size = Field(gt=0, description="bytes per piece")
    delay: Duration = Field(0.0, description="pause between pieces")


class SliceStage(Stage):
    def __init__(self, hit: Hit, config: SliceConfig):
        super().__init__(hit)
        self.config = config

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        size, delay = self.config.size, self.config.delay
        pieces = 0
        last_sent: float | None = None
        while True:
            item = await src.get()
            if not isinstance(item, Data):
                assert isinstance(item, TERMINAL)
                self.hit.record(f"sliced into {pieces} pieces of <= {size} bytes, {delay:.3f}s apart", pieces=pieces)
                await dst.send(item)
                return
            data = memoryview(item.data)
            for start in range(0, len(data), size):
                if last_sent is not None and delay:
                    wait = last_sent + delay - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await dst.send(Data(bytes(data[start : start + size])))
                last_sent = time.monotonic()
                pieces += 1


@register
class Slice(Fault[SliceConfig]):
    Config = SliceConfig
    streams_response = True

    def body_stage(self, hit: Hit) -> Stage:
        return SliceStage(hit, self.config)
