"""sse.EventScanner counts events as a browser's EventSource dispatches them, wherever chunks split the
stream; triggers.Trigger.split cuts exactly on event and byte boundaries. Checked against an independent
WHATWG parser (faultproxy.testing.clients.SseParser), exhaustively over split positions."""

from __future__ import annotations

import itertools
import random

import pytest

from faultproxy.sse import EventScanner
from faultproxy.testing.clients import SseParser
from faultproxy.triggers import Trigger, TriggerFields


def scan(pieces: list[bytes]) -> list[int]:
    """Absolute offsets at which the scanner says events end, feeding `pieces` in order."""
    s = EventScanner()
    out, base = [], 0
    for p in pieces:
        out += [base + e for e in s.feed(p)]
        base += len(p)
    assert s.events == len(out)
    return out


def normalize(stream: bytes, ends: list[int]) -> list[int]:
    """An event ending in CRLF may be reported after the CR (when the LF is in the next piece) or after the
    LF: both are the moment the browser dispatches. Report it after the CR."""
    return [e - 1 if stream[e - 2 : e] == b"\r\n" else e for e in ends]


def splits(stream: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# A stream with every feature that decides whether a blank line dispatches.
SAMPLE = (
    b"\xef\xbb\xbf"  # BOM: skipped
    b"data: one\n\n"  # 1: LF
    b": ping\n\n"  # comment-only block: no event
    b"id: 7\r\n\r\n"  # id-only block: no event
    b"event: x\revent: y\r\r"  # event-only block, CR line endings: no event
    b"data\r\n\r\n"  # 2: `data` without a colon is an (empty) data line
    b"retry: 10\ndata:two\r\ndata: 2b\r\n\r\n"  # 3: CRLF, several data lines
    b":comment\ndata: three\r\r"  # 4: CR
    b"datax: no\n\n"  # a field named datax: no event
    b"dat\n\n"  # neither
    b"data:  five\n\n"  # 5
    b"data: incomplete at the end"  # never dispatched
)
SAMPLE_EVENTS = ["one", "", "two\n2b", "three", " five"]


def test_sample_matches_an_independent_parser():
    p = SseParser()
    p.feed(SAMPLE, 0.0)
    assert p.data() == SAMPLE_EVENTS
    ends = scan([SAMPLE])
    assert len(ends) == 5
    assert normalize(SAMPLE, ends) == normalize(SAMPLE, [e.end_offset for e in p.events])


def test_every_split_point_gives_the_same_boundaries():
    whole = normalize(SAMPLE, scan([SAMPLE]))
    for cut in range(len(SAMPLE) + 1):
        assert normalize(SAMPLE, scan(splits(SAMPLE, (cut,)))) == whole, f"split at {cut}"


def test_every_pair_of_split_points_gives_the_same_boundaries():
    whole = normalize(SAMPLE, scan([SAMPLE]))
    for a, b in itertools.combinations_with_replacement(range(len(SAMPLE) + 1), 2):
        assert normalize(SAMPLE, scan(splits(SAMPLE, (a, b)))) == whole, f"split at {a}, {b}"


def test_byte_by_byte():
    assert normalize(SAMPLE, scan([bytes([c]) for c in SAMPLE])) == normalize(SAMPLE, scan([SAMPLE]))


@pytest.mark.parametrize(
    "stream,count",
    [
        (b"data: a\n\n", 1),
        (b"data: a\r\n\r\n", 1),
        (b"data: a\r\r", 1),
        (b"data: a\n", 0),  # no blank line yet
        (b": ping\n\n: ping\n\n", 0),
        (b"id: 1\n\n", 0),
        (b"event: e\n\n", 0),
        (b"retry: 5\n\n", 0),
        (b"data\n\n", 1),
        (b"data:\n\n", 1),
        (b"data:x\n\n\n\n", 1),  # extra blank lines dispatch nothing
        (b"\n\n\ndata: a\n\n", 1),
        (b"DATA: a\n\n", 0),  # field names are case-sensitive
        (b" data: a\n\n", 0),
        (b"\xef\xbb\xbfdata: a\n\n", 1),
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", 0),  # only one BOM is skipped
        (b"data: a\n\ndata: a\n\xef\xbb\xbfdata: b\n\n", 2),  # a BOM later is just bytes
        (b"data: " + b"x" * 100_000 + b"\n\n", 1),
    ],
)
def test_what_counts_as_an_event(stream, count):
    assert len(scan([stream])) == count
    p = SseParser()
    p.feed(stream, 0.0)
    assert len(p.events) == count, "the reference parser disagrees with the test's expectation"


def test_cr_then_lf_across_chunks_is_one_line_ending():
    # `data: a\r` + `\n` + `\n`: the CR ends the data line, the LF completes CRLF, the next LF is the blank
    # line. Wrongly reading the LF after the CR as a blank line would dispatch one byte early.
    assert scan([b"data: a\r", b"\n", b"\n"]) == [10]
    assert scan([b"data: a\r", b"", b"\n", b"\r\n"]) == [11]  # an empty chunk in between changes nothing


def test_random_streams_against_the_reference_parser():
    rng = random.Random(1234)
    atoms = [b"data: x", b"data", b"data:", b": c", b"id: 1", b"event: t", b"retry: 3", b"datum: 1", b"", b"\xc3\xa9"]
    endings = [b"\n", b"\r\n", b"\r"]
    for _ in range(300):
        stream = b"".join(rng.choice(atoms) + rng.choice(endings) for _ in range(rng.randint(1, 30)))
        p = SseParser()
        p.feed(stream, 0.0)
        expected = normalize(stream, [e.end_offset for e in p.events])
        cuts = tuple(sorted(rng.sample(range(len(stream) + 1), min(4, len(stream) + 1))))
        assert normalize(stream, scan(splits(stream, cuts))) == expected, (stream, cuts)


# --- Trigger.split ------------------------------------------------------------------------------------


class _Session:
    headers_sent_at = None


def split_all(fields: TriggerFields, pieces: list[bytes]) -> tuple[bytes, bytes, bool]:
    """Feed pieces through a Trigger the way forward_until does: (forwarded, rest of the firing piece, fired)."""
    t = Trigger(fields, _Session())  # type: ignore[arg-type]
    sent = b""
    for p in pieces:
        before, after = t.split(p)
        sent += before
        if t.fired:
            return sent, after, True
    return sent, b"", False


EVENTS = b"".join(b"id: %d\ndata: {\"seq\":%d}\n\n" % (i, i) for i in range(1, 7))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_after_events_fires_exactly_on_the_boundary_at_every_split(n):
    stream = b": hello\n\n" + EVENTS.replace(b"\n\nid: 4", b"\n\n: ping\n\nid: 4")
    for a, b in itertools.combinations_with_replacement(range(len(stream) + 1), 2):
        sent, rest, fired = split_all(TriggerFields(after_events=n), splits(stream, (a, b)))
        assert fired, (a, b)
        p = SseParser()
        p.feed(sent, 0.0)
        assert len(p.events) == n, (a, b)
        # Nothing of the next event: what was held back starts right after the nth blank line.
        assert sent.endswith(b"\n\n"), (a, b, sent[-20:])
        assert stream.startswith(sent) and (sent + rest) == stream[: len(sent) + len(rest)]


def test_after_events_with_crlf_split_between_cr_and_lf():
    stream = b"data: 1\r\n\r\ndata: 2\r\n\r\n"
    sent, rest, fired = split_all(TriggerFields(after_events=1), [stream[:10], stream[10:]])
    assert fired and sent == b"data: 1\r\n\r" and rest == b""  # dispatched on the CR; the LF goes later
    sent, rest, fired = split_all(TriggerFields(after_events=1), [stream])
    assert fired and sent == b"data: 1\r\n\r\n" and rest == b"data: 2\r\n\r\n"


def test_after_events_not_reached():
    sent, rest, fired = split_all(TriggerFields(after_events=4), [EVENTS[:50], EVENTS[50:70]])
    assert not fired and sent == EVENTS[:70] and rest == b""


def test_after_zero_events_fires_at_once():
    t = Trigger(TriggerFields(after_events=0), _Session())  # type: ignore[arg-type]
    assert t.fired and t.split(b"data: x\n\n") == (b"", b"data: x\n\n")


@pytest.mark.parametrize("n", [0, 1, 17, 100, len(EVENTS)])
def test_after_bytes_is_exact_at_every_split(n):
    for cut in range(len(EVENTS) + 1):
        sent, rest, fired = split_all(TriggerFields(after_bytes=n), splits(EVENTS, (cut,)))
        assert fired and sent == EVENTS[:n], (n, cut)
        assert EVENTS.startswith(sent + rest)


def test_no_trigger_fires_at_once_and_time_trigger_never_splits():
    assert Trigger(TriggerFields(), _Session()).fired  # type: ignore[arg-type]
    t = Trigger(TriggerFields(after=5.0), _Session())  # type: ignore[arg-type]
    assert not t.fired and t.split(EVENTS) == (EVENTS, b"") and not t.fired


def test_more_than_one_trigger_is_an_error():
    with pytest.raises(ValueError, match="exactly one trigger"):
        TriggerFields(after=1.0, after_events=2)
    with pytest.raises(ValueError, match="exactly one trigger"):
        TriggerFields(after_bytes=1, after_events=2)
