"""Incremental parser for server-sent events (the WHATWG HTML "event stream" format).

The parser works on bytes and decodes a line only once it is complete. CR and LF bytes never
occur inside a multi-byte UTF-8 sequence, so splitting on them before decoding is safe, and a
character cut across two reads simply waits in the buffer with the rest of its line.
"""

from __future__ import annotations

from typing import NamedTuple

_BOM = b"\xef\xbb\xbf"
_LINE_ENDS = (b"\n", b"\r")


class SSEEvent(NamedTuple):
    """One dispatched event: its type (`message` unless an `event:` field set it) and its data."""

    event: str
    data: str


class SSEParser:
    """Feed raw response bytes in and get the events that those bytes complete.

    The parser follows the WHATWG rules. Lines end in CRLF, LF or CR, and a blank line
    dispatches the event. `data` lines are joined with "\\n", and one space after the colon
    is dropped. Lines starting with a colon are comments. `id`, `retry` and unknown fields
    are ignored. An event whose data buffer is empty is not dispatched.
    """

    __slots__ = ("_buffer", "_skip_lf", "_at_start", "_data_lines", "_event_type")

    def __init__(self) -> None:
        # Bytes of the line still being received (no line ending seen yet).
        self._buffer = b""
        # True when the previous read ended in CR, so an LF starting the next read ends no new line.
        self._skip_lf = False
        # A UTF-8 byte order mark is allowed before the first byte of the stream.
        self._at_start = True
        self._data_lines: list[str] = []
        self._event_type = ""

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume one read of the stream and return the events it completed, in order."""
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
                if not data:
                    return []
        if self._buffer:
            # Fast path for a long line arriving in pieces: keep appending until a line ends.
            if b"\n" not in data and b"\r" not in data:
                self._buffer += data
                return []
            data = self._buffer + data
            self._buffer = b""
        if self._at_start:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._buffer = data
                return []
            self._at_start = False
            if data.startswith(_BOM):
                data = data[len(_BOM) :]

        if b"\r" not in data and not self._data_lines and not self._event_type:
            return self._feed_lf_events(data)

        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(_LINE_ENDS):
            self._buffer = lines.pop()
        elif data.endswith(b"\r"):
            self._skip_lf = True

        events: list[SSEEvent] = []
        for line in lines:
            event = self._process_line(line.rstrip(b"\r\n"))
            if event is not None:
                events.append(event)
        return events

    def _feed_lf_events(self, data: bytes) -> list[SSEEvent]:
        """Parse LF-only input that starts at an event boundary, one split per event.

        Servers send almost every event as a single `data:` line followed by a blank line, so
        such an event is decoded directly. Anything else in the input goes line by line.
        """
        parts = data.split(b"\n\n")
        # The text after the last blank line is an event still being received.
        tail = parts.pop()
        events: list[SSEEvent] = []
        for part in parts:
            if part.startswith(b"data:") and b"\n" not in part:
                value = part[6:] if part[5:6] == b" " else part[5:]
                events.append(SSEEvent("message", value.decode("utf-8", "replace")))
                continue
            for line in part.split(b"\n"):
                event = self._process_line(line)
                if event is not None:
                    events.append(event)
            event = self._dispatch()
            if event is not None:
                events.append(event)
        tail_lines = tail.split(b"\n")
        self._buffer = tail_lines.pop()
        for line in tail_lines:
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> bool:
        """End the stream and reset the parser.

        An event not yet ended by a blank line is discarded, as the specification requires.
        Returns True when such an incomplete event or line was discarded.
        """
        discarded = bool(self._buffer or self._data_lines or self._event_type)
        self.__init__()
        return discarded

    def _process_line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._data_lines.append(value.decode("utf-8", "replace"))
            return None
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            # A bare "data" line without a colon adds an empty line to the data.
            self._data_lines.append("")
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        # `id` and `retry` only matter for reconnecting, which a benchmark never does.
        return None

    def _dispatch(self) -> SSEEvent | None:
        data_lines = self._data_lines
        event_type = self._event_type or "message"
        self._event_type = ""
        if not data_lines:
            return None
        self._data_lines = []
        if len(data_lines) == 1:
            return SSEEvent(event_type, data_lines[0])
        return SSEEvent(event_type, "\n".join(data_lines))
