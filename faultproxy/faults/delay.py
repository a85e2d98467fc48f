"""`delay`: hold the request before it goes upstream, or the response before the client gets it.

The wait is an `await`, so only this flow waits: every other flow keeps flowing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from ..units import Duration
from .base import Fault, FaultConfig, Hit
from .registry import register


class DelayConfig(FaultConfig):
    type: Literal["delay"]
    phase: Literal["request", "response"] = "request"
    time: Duration = Field(description="how long to hold the message")
    jitter: Duration = Field(0.0, description="up to this much more, drawn per flow from the seeded generator")


@register
class Delay(Fault[DelayConfig]):
    Config = DelayConfig

    @property
    def acts_on_request(self) -> bool:  # type: ignore[override]
        return self.config.phase == "request"

    async def _hold(self, hit: Hit) -> None:
        wanted = self.config.time + (hit.rng.uniform(0, self.config.jitter) if self.config.jitter else 0.0)
        if hit.dry_run:
            hit.record(f"would delay {wanted:.3f}s", phase=self.config.phase)
            return
        started = time.monotonic()
        await asyncio.sleep(wanted)
        hit.record(f"delayed {time.monotonic() - started:.3f}s", phase=self.config.phase)

    async def on_request(self, hit: Hit) -> None:
        if self.config.phase == "request":
            await self._hold(hit)

    async def on_response_headers(self, hit: Hit) -> None:
        if self.config.phase == "response":
            await self._hold(hit)
