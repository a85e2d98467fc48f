"""Where Server-Sent Events end in a byte stream, counted the way a browser's EventSource does.

From the WHATWG HTML spec's event stream interpretation: lines end with CRLF, LF or CR; a blank
line dispatches the event being built, but only if its data buffer is not empty — so a block of
comments (`: ping` heartbeats) or of `id:`/`event:`/`retry:` fields alone is not an event. A field
line `data` (no colon) adds an empty line to the data buffer, which makes it non-empty. One UTF-8
BOM at the very start of the stream is skipped. Chunk boundaries may fall anywhere, including
between the CR and LF of one line ending and inside the BOM.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
# Bytes of a line kept: enough to tell `data`/`data:` from anything else, after a BOM.
_KEEP = len(_BOM) + 5


class EventScanner:
    """Feed body bytes in order; get the offsets at which complete events end."""

    __slots__ = ("_line", "_has_data", "_after_cr", "_first_line", "events")

    def __init__(self) -> None:
        self._line = bytearray()  # the current line so far (only its start matters)
        self._has_data = False  # the event being built has a data field
        self._after_cr = False  # the previous chunk ended with CR: a leading LF belongs to it
        self._first_line = True  # the first line of the stream may start with a BOM
        self.events = 0  # complete events seen so far

    def feed(self, data: bytes) -> list[int]:
        """Offsets in `data` just past the line ending that completes each event in it.

        For an event ending in CRLF whose CR is the last byte of `data`, that is just past the CR:
        the browser dispatches on the CR, and the LF arriving later belongs to the next chunk.
        """
        ends: list[int] = []
        if not data:
            return ends  # and keep _after_cr: the LF may still come
        pos = 0
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":
                pos = 1
        for m in _LINE_END.finditer(data, pos):
            if len(self._line) < _KEEP:
                self._line += data[pos : min(m.start(), pos + _KEEP)]
            pos = m.end()
            if m.group() == b"\r" and pos == len(data):
                self._after_cr = True  # may be the first half of a CRLF split across chunks
            if self._end_line():
                self.events += 1
                ends.append(pos)
        if pos < len(data):
            # Keep only what decides the line's field name; a data line's value can be megabytes.
            if len(self._line) < _KEEP:
                self._line += data[pos : pos + _KEEP]
        return ends

    def _end_line(self) -> bool:
        line = bytes(self._line[:_KEEP])
        self._line.clear()
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            dispatch = self._has_data
            self._has_data = False
            return dispatch
        if line.startswith(b":"):
            return False  # a comment
        name = line.split(b":", 1)[0]
        if name == b"data" and (len(line) == 4 or line[4:5] == b":"):
            self._has_data = True
        return False
