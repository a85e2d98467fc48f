"""`throttle`: limit bandwidth with a token bucket, on the response (default) or the request (a slow upload).

Bytes go out in pieces of at most `burst`, each when the bucket holds enough tokens; the bucket fills
at `rate` bytes per second. Data is never dropped: while the client side is slower than the upstream,
the channel before this stage fills up and the upstream socket stops being read (TCP backpressure).
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from ..engine import TERMINAL, Channel, Data, Stage, StreamSession
from ..units import Rate, Size
from .base import Fault, FaultConfig, Hit
from .registry import register


class ThrottleConfig(FaultConfig):
    type: Literal["throttle"]
    rate: Rate = Field(description="bytes per second, e.g. '64KiB/s'")
    burst: Size | None = Field(None, gt=0, description="bucket size in bytes (default: 50 ms of rate, 1 KiB to 64 KiB)")
    direction: Literal["response", "request"] = "response"

    def bucket(self) -> int:
        if self.burst is not None:
            return self.burst
        return int(min(max(self.rate * 0.05, 1024), 65536))


class ThrottleStage(Stage):
    def __init__(self, hit: Hit, config: ThrottleConfig):
        super().__init__(hit)
        self.rate = config.rate
        self.burst = config.bucket()
        self.config = config

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        tokens = float(self.burst)
        last = time.monotonic()
        started = None
        total = 0
        while True:
            item = await src.get()
            if not isinstance(item, Data):
                assert isinstance(item, TERMINAL)
                took = time.monotonic() - started if started else 0.0
                achieved = total / took if took > 0 else 0.0
                self.hit.record(
                    f"throttled {total} bytes to {self.rate:.0f} B/s (achieved {achieved:.0f} B/s over {took:.3f}s)",
                    direction=self.config.direction,
                    bytes=total,
                )
                await dst.send(item)
                return
            data = memoryview(item.data)
            if started is None:
                started = time.monotonic()
            while data:
                piece = data[: self.burst]
                now = time.monotonic()
                tokens = min(self.burst, tokens + (now - last) * self.rate)
                last = now
                if tokens < len(piece):
                    await asyncio.sleep((len(piece) - tokens) / self.rate)
                    now = time.monotonic()
                    # Not capped at the bucket: the time slept was owed, and the timer's lateness
                    # (about 1 ms a wake-up) would otherwise be lost every piece — 10% at 10 MiB/s
                    # with 64 KiB pieces. Idle time is still capped (above, on the next piece).
                    tokens += (now - last) * self.rate
                    last = now
                tokens -= len(piece)
                await dst.send(Data(bytes(piece)))
                total += len(piece)
                data = data[len(piece) :]


@register
class Throttle(Fault[ThrottleConfig]):
    Config = ThrottleConfig

    @property
    def streams_response(self) -> bool:  # type: ignore[override]
        return self.config.direction == "response"

    @property
    def streams_request(self) -> bool:  # type: ignore[override]
        return self.config.direction == "request"

    def body_stage(self, hit: Hit) -> Stage | None:
        return ThrottleStage(hit, self.config) if self.config.direction == "response" else None

    def request_stage(self, hit: Hit) -> Stage | None:
        return ThrottleStage(hit, self.config) if self.config.direction == "request" else None
