"""requests.csv as RequestsWriter writes it: quoting, empty values and the ITL column."""

import csv
import math

from runner.metrics import REQUEST_COLUMNS
from runner.output import FLUSH_ROWS, RequestsWriter, read_requests, read_requests_checked, write_summary


def row(request_id: int, error: str, itl: list[float], ttft: float = 0.5) -> dict:
    values = {column: None for column in REQUEST_COLUMNS}
    values |= {"variable": "parallel", "value": 4, "repeat": 0, "request_id": request_id, "warmup": False,
               "cooldown": False, "scheduled_at": 1.0, "sent_at": 1.25, "ttft": ttft, "success": not error,
               "error": error, "token_source": "usage", "itl": itl}
    return values


def test_writer_quotes_text_and_formats_itl(tmp_path):
    path = tmp_path / "requests.csv"
    with RequestsWriter(path) as writer:
        writer.add(row(0, "", [0.1, 0.25]))
        writer.add(row(1, 'HTTP 500: "bad", try again', []))
        writer.add(row(2, "first line\nsecond line", [1 / 3], ttft=math.nan))
    with path.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == REQUEST_COLUMNS
    fields = [dict(zip(REQUEST_COLUMNS, line)) for line in lines[1:]]
    assert [f["request_id"] for f in fields] == ["0", "1", "2"]
    assert [f["itl"] for f in fields] == ["0.100000 0.250000", "", "0.333333"]
    assert [f["error"] for f in fields] == ["", 'HTTP 500: "bad", try again', "first line\nsecond line"]
    # NaN and None are written as empty fields; floats get 6 decimals.
    assert [f["ttft"] for f in fields] == ["0.500000", "0.500000", ""]
    assert fields[0]["ended_at"] == ""
    assert fields[0]["sent_at"] == "1.250000"
    assert path.read_bytes().count(b"\r\n") == 4


def test_writer_flushes_every_batch(tmp_path):
    path = tmp_path / "requests.csv"
    writer = RequestsWriter(path)
    for index in range(FLUSH_ROWS + 1):
        writer.add(row(index, "", [0.5]))
    # A full batch is on disk before close; the one row after it waits for the next flush.
    assert writer.rows_written == FLUSH_ROWS
    assert len(read_requests(path)) == FLUSH_ROWS
    writer.close()
    frame = read_requests(path)
    assert writer.rows_written == len(frame) == FLUSH_ROWS + 1
    assert frame["itl"].iloc[-1] == [0.5]


def test_summary_writes_parallel_as_integer(tmp_path):
    path = tmp_path / "summary.csv"
    write_summary([{"parallel": 16.0, "rate": math.nan, "requests": 100, "rps": 2.5},
                   {"parallel": math.nan, "rate": 8.0, "requests": 50, "rps": 7.75}], path)
    assert path.read_text(encoding="utf-8").splitlines() == [
        "parallel,rate,requests,rps", "16,,100,2.500000", ",8.000000,50,7.750000"]


def test_checked_read_keeps_quoted_line_breaks(tmp_path):
    path = tmp_path / "requests.csv"
    with RequestsWriter(path) as writer:
        writer.add(row(0, "first line\nsecond line", [0.1]))
        writer.add(row(1, "", [0.1, 0.2]))
    frame, problems = read_requests_checked(path)
    assert problems == []
    assert frame["error"].fillna("").tolist() == ["first line\nsecond line", ""]

    path.write_bytes(path.read_bytes()[:-4])  # the last row loses "200\r\n" of its ITL
    frame, problems = read_requests_checked(path)
    # Line 3 is the second line of the first row's error, so the second row is line 4.
    assert problems == ["line 4 is cut short because the file ends inside it"]
    assert frame["request_id"].tolist() == [0]
