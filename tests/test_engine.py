"""The streaming engine in-process, with a stand-in for _mitm.FlowHandle: channel backpressure, stage order,
what holding stages do with a cut, and a broken stage. (End to end through mitmdump: test_streaming.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from mitmproxy.test import tflow

from faultproxy import _mitm
from faultproxy.engine import TERMINAL, Channel, Cut, Data, End, Stage, StreamSession
from faultproxy.faults.buffer import BufferConfig, BufferStage
from faultproxy.faults.compress import CompressConfig, CompressStage
from faultproxy.faults.cut import CutConfig, CutStage


class FakeHandle:
    """Records what the engine asks of mitmproxy; feeds upstream events on demand."""

    client_is_http2 = False
    stream_id = 1
    last_frame = None

    def __init__(self) -> None:
        self.sent: list[tuple[float, bytes]] = []
        self.calls: list[str] = []
        self.sink: Any = None
        self.paused = 0
        self.resumed = 0

    def divert_upstream(self, sink: Any) -> None:
        self.sink = sink

    def pause_upstream(self) -> None:
        self.paused += 1

    def resume_upstream(self) -> None:
        self.resumed += 1

    async def send_data(self, data: bytes) -> bool:
        self.sent.append((time.monotonic(), data))
        return True

    async def send_end(self, trailers: Any = None) -> bool:
        self.calls.append("end")
        return True

    async def send_error(self, message: str) -> bool:
        self.calls.append(f"error: {message}")
        return True

    async def close_upstream(self) -> None:
        self.calls.append("close_upstream")

    async def close_client(self, reset: bool = False) -> None:
        self.calls.append("reset" if reset else "close")

    @property
    def body(self) -> bytes:
        return b"".join(d for _, d in self.sent)


class FakeHit:
    dry_run = False

    def __init__(self) -> None:
        self.records: list[str] = []

    def record(self, outcome: str, **extra: Any) -> None:
        self.records.append(outcome)


def session() -> tuple[StreamSession, FakeHandle]:
    handle = FakeHandle()
    s = StreamSession(tflow.tflow(resp=True), handle)  # type: ignore[arg-type]
    s.mark_headers_sent()
    return s, handle


async def wait_for(cond: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def feed(handle: FakeHandle, *chunks: bytes, end: bool = True) -> None:
    for c in chunks:
        handle.sink(_mitm.UpstreamData(c))
    if end:
        handle.sink(_mitm.UpstreamEnd())


EV = [b"data: %d\n\n" % i for i in range(6)]


def test_channel_backpressure_and_watermarks():
    async def main() -> None:
        marks: list[str] = []
        ch = Channel(high=100, low=30, on_high=lambda: marks.append("high"), on_low=lambda: marks.append("low"))
        sent = asyncio.get_running_loop().create_task(ch.send(Data(b"x" * 150)))
        await asyncio.sleep(0.01)
        assert not sent.done(), "send did not wait while the channel is above its high mark"
        assert marks == ["high"]
        assert isinstance(await ch.get(), Data)
        await asyncio.wait_for(sent, 1)
        assert marks == ["high", "low"]
        assert await ch.get(0.01) is None  # a timeout, not an item
        ch.put(End())
        ch.put(Data(b"after the end"))  # ignored: nothing belongs to the stream after its terminal item
        assert isinstance(await ch.get(), End) and len(ch) == 0

    asyncio.run(main())


class Tag(Stage):
    """Appends its name to every chunk, to see the order stages ran in."""

    def __init__(self, name: str, at_upstream: bool = False, at_client: bool = False) -> None:
        super().__init__(FakeHit())  # type: ignore[arg-type]
        self.name, self.at_upstream, self.at_client = name, at_upstream, at_client

    async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
        while True:
            item = await src.get()
            if isinstance(item, Data):
                item = Data(item.data + self.name.encode())
            await dst.send(item)
            if isinstance(item, TERMINAL):
                return


def test_stage_order_upstream_first_client_last():
    async def main() -> None:
        s, h = session()
        s.start_pipeline([Tag("c", at_client=True), Tag("1"), Tag("u", at_upstream=True), Tag("2")])
        feed(h, b"x")
        await wait_for(lambda: "end" in h.calls)
        assert h.body == b"xu12c"

    asyncio.run(main())


def test_a_broken_stage_breaks_the_stream_instead_of_hanging_it():
    class Broken(Stage):
        async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
            await dst.send(await src.get())
            raise RuntimeError("a bug")

    async def main() -> None:
        s, h = session()
        s.start_pipeline([Broken(FakeHit())])  # type: ignore[arg-type]
        feed(h, EV[0], EV[1])
        await wait_for(lambda: any(c.startswith("error") for c in h.calls))
        assert h.body == EV[0] and h.calls == ["error: faultproxy: Broken failed"]

    asyncio.run(main())


@pytest.mark.parametrize("action,expected", [("end", b"".join(EV[:3])), ("close", b"")])
def test_a_buffer_after_a_cut(action, expected):
    """A holding stage after the cut: a clean end releases what it holds, a broken stream drops it."""

    async def main() -> None:
        s, h = session()
        cut_hit = FakeHit()
        s.start_pipeline(
            [
                CutStage(cut_hit, CutConfig(type="cut", after_events=3, action=action)),  # type: ignore[arg-type]
                BufferStage(FakeHit(), BufferConfig(type="buffer", size="all")),  # type: ignore[arg-type]
            ]
        )
        feed(h, *EV, end=False)
        await wait_for(lambda: cut_hit.records)
        assert h.body == expected
        assert ("end" if action == "end" else "close") in h.calls

    asyncio.run(main())


def test_compress_runs_last_and_a_clean_cut_finishes_the_gzip_body():
    import zlib

    async def main() -> None:
        s, h = session()
        compress = CompressStage(FakeHit(), CompressConfig(type="compress"), sync_flush=False)  # type: ignore[arg-type]
        cut = CutStage(FakeHit(), CutConfig(type="cut", after_events=2, action="end"))  # type: ignore[arg-type]
        s.start_pipeline([compress, cut])  # compress first in the profile: still runs after the cut
        feed(h, b"".join(EV), end=False)
        await wait_for(lambda: "end" in h.calls)
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        assert z.decompress(h.body) == EV[0] + EV[1] and z.eof

    asyncio.run(main())


def test_compress_holds_until_a_buffer_fills():
    async def main() -> None:
        s, h = session()
        s.start_pipeline([CompressStage(FakeHit(), CompressConfig(type="compress"), sync_flush=False)])  # type: ignore[arg-type]
        feed(h, *EV, end=False)
        await asyncio.sleep(0.05)
        assert h.sent == [], "the gzip header (or anything) went out before a 4 KiB buffer was full"
        h.sink(_mitm.UpstreamEnd())
        await wait_for(lambda: "end" in h.calls)
        import zlib

        assert zlib.decompress(h.body, 16 + zlib.MAX_WBITS) == b"".join(EV)

    asyncio.run(main())


def test_input_backpressure_pauses_and_resumes_the_upstream():
    class Slow(Stage):
        async def pipe(self, src: Channel, dst: Channel, session: StreamSession) -> None:
            while True:
                await asyncio.sleep(0.002)
                item = await src.get()
                await dst.send(item)
                if isinstance(item, TERMINAL):
                    return

    async def main() -> None:
        s, h = session()
        s.start_pipeline([Slow(FakeHit())])  # type: ignore[arg-type]
        feed(h, *[b"x" * 65536] * 40)  # 2.5 MiB at once: above the 1 MiB mark
        assert h.paused == 1
        await wait_for(lambda: "end" in h.calls, 5)
        assert h.resumed >= 1 and len(h.body) == 40 * 65536

    asyncio.run(main())


def test_a_cut_is_performed_even_if_the_session_is_cancelled_meanwhile():
    """mitmproxy's error hook (caused by the action itself) cancels the session; the action still finishes."""

    async def main() -> None:
        s, h = session()
        hit = FakeHit()
        orig_close = h.close_client

        async def slow_close(reset: bool = False) -> None:
            s.cancel()  # as the error hook would, while the action is under way
            await asyncio.sleep(0.01)
            await orig_close(reset)

        h.close_client = slow_close  # type: ignore[method-assign]
        s.start_pipeline([CutStage(hit, CutConfig(type="cut", after_events=1, action="close"))])  # type: ignore[arg-type]
        feed(h, *EV, end=False)
        await wait_for(lambda: hit.records)
        assert "close" in h.calls and h.body == EV[0]
        assert "connection closed" in hit.records[0]

    asyncio.run(main())


def test_cut_item_repr_is_terminal():
    assert isinstance(Cut(None, None, "x"), TERMINAL)  # type: ignore[arg-type]
