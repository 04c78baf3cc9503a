"""Server-sent events parser: line endings, fields, comments and reads cut anywhere."""

import pytest

from runner.client.sse import SSEEvent, SSEParser


def feed_all(parts: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for part in parts:
        events.extend(parser.feed(part))
    return events


def data_of(events: list[SSEEvent]) -> list[str]:
    return [event.data for event in events]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(ending):
    stream = b"data: one" + ending + ending + b"data: two" + ending + ending

    assert data_of(feed_all([stream])) == ["one", "two"]


def test_mixed_line_endings():
    stream = b"data: a\r\n\ndata: b\r\rdata: c\n\r\n"

    assert data_of(feed_all([stream])) == ["a", "b", "c"]


def test_crlf_split_across_feeds():
    # The CR ends one read and the LF starts the next: one line ending, not two, so the
    # second data line belongs to the same event.
    events = feed_all([b"data: first\r", b"\ndata: second\r", b"\n\r", b"\n"])

    assert data_of(events) == ["first\nsecond"]


def test_cr_then_lf_only_read():
    parser = SSEParser()

    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [SSEEvent("message", "x")]


def test_data_with_and_without_space():
    events = feed_all([b"data:tight\n\ndata: spaced\n\ndata:  two spaces\n\n"])

    assert data_of(events) == ["tight", "spaced", " two spaces"]


def test_multiline_data_joined_with_newline():
    events = feed_all([b"data: line one\ndata: line two\ndata:\ndata: line four\n\n"])

    assert data_of(events) == ["line one\nline two\n\nline four"]


def test_comments_and_keepalives_ignored():
    stream = b": ping\n\n:\n\ndata: a\n: comment inside an event\ndata: b\n\n: ping\n\n"

    assert data_of(feed_all([stream])) == ["a\nb"]


def test_other_fields_ignored():
    stream = b"id: 7\nretry: 1000\nunknown: x\ndata: payload\n\n"

    assert feed_all([stream]) == [SSEEvent("message", "payload")]


def test_event_type_surfaced_and_reset():
    stream = b'event: error\ndata: {"message": "boom"}\n\ndata: next\n\n'

    events = feed_all([stream])

    assert events == [SSEEvent("error", '{"message": "boom"}'), SSEEvent("message", "next")]


def test_event_without_data_not_dispatched():
    assert feed_all([b"event: ping\n\nid: 3\n\n"]) == []


def test_empty_data_field_dispatched():
    assert data_of(feed_all([b"data:\n\n", b"data\n\n"])) == ["", ""]


def test_utf8_character_split_across_feeds():
    encoded = "data: caf\u00e9 \u732b\n\n".encode()
    cut = encoded.index("\u732b".encode()) + 1  # inside the 3-byte character

    events = feed_all([encoded[:cut], encoded[cut : cut + 1], encoded[cut + 1 :]])

    assert data_of(events) == ["caf\u00e9 \u732b"]


def test_one_byte_per_feed():
    stream = b'data: {"a": 1}\r\n\r\n: ping\r\ndata: \xe7\x8c\xab\r\rdata: end\n\n'
    parts = [stream[i : i + 1] for i in range(len(stream))]

    assert data_of(feed_all(parts)) == data_of(feed_all([stream]))
    assert data_of(feed_all(parts)) == ['{"a": 1}', "\u732b", "end"]


def test_several_events_in_one_feed():
    parser = SSEParser()

    events = parser.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4")

    assert data_of(events) == ["1", "2", "3"]
    assert data_of(parser.feed(b"\n\n")) == ["4"]


def test_event_cut_after_field_name():
    assert data_of(feed_all([b"data:", b" x\n", b"\n"])) == ["x"]


def test_final_event_without_blank_line_not_dispatched():
    parser = SSEParser()

    assert parser.feed(b"data: complete\n\ndata: [DONE]\n") == [SSEEvent("message", "complete")]
    assert parser.close() is True
    assert parser.feed(b"\n") == []


def test_close_without_pending_event():
    parser = SSEParser()
    parser.feed(b"data: x\n\n")

    assert parser.close() is False


def test_byte_order_mark_stripped():
    assert data_of(feed_all([b"\xef\xbb", b"\xbfdata: x\n\n"])) == ["x"]
    assert data_of(feed_all([b"\xef\xbb\xbfdata: y\n\n"])) == ["y"]


def test_empty_feed():
    parser = SSEParser()

    assert parser.feed(b"") == []
    assert parser.feed(b"data: x\n\n") == [SSEEvent("message", "x")]
