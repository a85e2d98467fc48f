"""`cut`: end a live response at a trigger, with a chosen action (FIN, RST, clean end, RST_STREAM, GOAWAY).

With a trigger on events or bytes the cut falls exactly on that boundary; with no trigger at all the
stream is cut as soon as the response headers have gone out.
"""

from __future__ import annotations

from typing import Literal

from ..actions import ActionFields, drains, start_drain
from ..engine import Channel, Cut, Data, Stage, StreamSession, passthrough
from ..triggers import Trigger, TriggerFields, forward_until
from .base import Fault, FaultConfig, Hit
from .registry import register


class CutConfig(FaultConfig, TriggerFields, ActionFields):
    type: Literal["cut"]


class CutStage(Stage):
    def __init__(self, hit: Hit, config: CutConfig):
        super().__init__(hit)
        self.config = config

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        trigger = Trigger(self.config, session)
        ended, _rest = await forward_until(trigger, src, dst)
        if ended is not None:  # the upstream finished before the trigger: nothing to cut
            await dst.send(ended)
            return
        if drains(session, self.config, self.hit):
            # GOAWAY with a grace period: the stream is at or below last_stream_id and goes on while
            # the connection drains (RFC 9113 6.8), until the connection closes under it.
            start_drain(session, self.config, self.hit, self.config.describe_trigger())
            if _rest:
                await dst.send(Data(_rest))
            await passthrough(src, dst)
            return
        # The bytes past the trigger point are dropped: the client keeps an exact prefix.
        await dst.send(Cut(self.config, self.hit, self.config.describe_trigger()))


@register
class CutFault(Fault[CutConfig]):
    Config = CutConfig
    streams_response = True

    def body_stage(self, hit: Hit) -> Stage:
        return CutStage(hit, self.config)
