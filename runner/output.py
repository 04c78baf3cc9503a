"""Files of a run folder: requests.csv streamed as requests end, summary.csv at the end."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from runner.client.record import RequestRecord
from runner.metrics import REQUEST_COLUMNS, SUMMARY_COLUMNS

# Rows buffered before requests.csv is written and flushed; a crash loses at most these
# and the requests in flight.
FLUSH_ROWS = 256


def _relative(value: Optional[float], origin: float) -> Optional[float]:
    return None if value is None else value - origin


def record_row(
    record: RequestRecord,
    itl: Sequence[float],
    *,
    origin: float,
    variable: str,
    value: float,
    repeat: int,
) -> dict[str, Any]:
    """Return the requests.csv row of a finished record; times become seconds since ``origin``."""
    return {
        "variable": variable,
        "value": value,
        "repeat": repeat,
        "request_id": record.request_id,
        "warmup": record.warmup,
        "cooldown": record.cooldown,
        "scheduled_at": _relative(record.scheduled_at, origin),
        "dispatched_at": _relative(record.dispatched_at, origin),
        "sent_at": _relative(record.sent_at, origin),
        "first_token_at": _relative(record.first_token_at, origin),
        "ended_at": _relative(record.ended_at, origin),
        "ttft": record.ttft if record.success else None,
        "latency": record.latency,
        "tpot": record.tpot if record.success else None,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "token_source": record.token_source,
        "finish_reason": record.finish_reason,
        "success": record.success,
        "error": record.error,
        "status": record.status,
        "max_tokens": record.max_tokens,
        "expected_prompt_tokens": record.expected_prompt_tokens,
        "tokenizer_tokens": record.tokenizer_tokens,
        "itl": list(itl),
    }


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    if isinstance(value, list):
        return _samples_text(value)
    return value


def _samples_text(samples: Sequence[float]) -> str:
    # One %-format for the whole list: about half the time of joining one f-string per sample.
    return ("%.6f " * len(samples) % tuple(samples))[:-1]


# The writer formats every column but the last through the csv module and appends the ITL
# samples itself. Their digits, points and spaces never need quoting, and the csv module's
# scan of that long text would be most of the cost of a row.
_QUOTED_COLUMNS = REQUEST_COLUMNS[:-1]
if REQUEST_COLUMNS[-1] != "itl":
    raise RuntimeError("RequestsWriter expects itl as the last column of REQUEST_COLUMNS")


class RequestsWriter:
    """Appends rows to requests.csv in batches of FLUSH_ROWS, flushing each batch.

    With ``append`` an existing file is continued (a resumed run) and keeps its header.
    """

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        continuing = append and path.is_file() and path.stat().st_size > 0
        self._file = path.open("a" if continuing else "w", newline="", encoding="utf-8")
        if not continuing:
            csv.writer(self._file).writerow(REQUEST_COLUMNS)
        # csv.writer calls write() once per row, so each line arrives as one string.
        self._lines: list[str] = []
        self._line_writer = csv.writer(_LineSink(self._lines))
        self._pending = 0
        self.rows_written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._line_writer.writerow([_csv_value(row[column]) for column in _QUOTED_COLUMNS])
        # Replace the line end ("\r\n", the excel dialect's) with the last column and the line end.
        line = self._lines[-1]
        self._lines[-1] = f"{line[:-2]},{_samples_text(row['itl'])}\r\n"
        self._pending += 1
        if self._pending >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._file.write("".join(self._lines))
            self.rows_written += self._pending
            self._lines.clear()
            self._pending = 0
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> "RequestsWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _LineSink:
    """File-like object that keeps every string written to it in ``lines``."""

    def __init__(self, lines: list[str]) -> None:
        self.write = lines.append


def write_summary(rows: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """Write summary.csv with the contract's columns first; return the frame written."""
    frame = pd.DataFrame(rows)
    ordered = [c for c in SUMMARY_COLUMNS if c in frame.columns]
    extra = [c for c in frame.columns if c not in ordered]
    frame = frame[ordered + extra]
    # Concurrency is a count, so 16 is written as 16 and not 16.000000, even when it was a float.
    written = frame.assign(parallel=integral_column(frame["parallel"])) if "parallel" in frame.columns else frame
    written.to_csv(path, index=False, float_format="%.6f")
    return frame


def integral_column(column: pd.Series) -> pd.Series:
    """Return ``column`` with whole floats as ints (object dtype), so CSV files show 16, not 16.0.

    Other values, empty cells included, are returned unchanged.
    """
    if not pd.api.types.is_float_dtype(column):
        return column
    values = [int(value) if math.isfinite(value) and value.is_integer() else value for value in column]
    return pd.Series(values, index=column.index, dtype=object, name=column.name)


def read_requests(path: Path) -> pd.DataFrame:
    """Read requests.csv back, with ``itl`` as lists of floats."""
    return _parse_requests(path)


def read_requests_checked(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Read requests.csv without its damaged lines; return the rows and one message per damaged line.

    A line is damaged when it has another number of fields than the header, or when it is
    the last line and the file does not end with a line break. The writer ends every row
    with one, so there the write was cut, and even the last field may be short. Messages
    start with "line N". Raises ValueError when the file has no header.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise ValueError("the file is empty")
    rows = [(reader.line_num, row) for row in reader if row]
    damaged: list[tuple[int, str]] = []
    if rows and not text.endswith("\n"):
        line, _ = rows.pop()
        damaged.append((line, "is cut short because the file ends inside it"))
    kept = []
    for line, row in rows:
        if len(row) == len(header):
            kept.append(row)
        else:
            damaged.append((line, f"has {len(row)} fields instead of {len(header)}"))
    problems = [f"line {line} {reason}" for line, reason in sorted(damaged)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(kept)
    buffer.seek(0)
    return _parse_requests(buffer), problems


def cut_last_line(path: Path) -> int | None:
    """Return the number of the last line of ``path`` when the file ends inside it, else None.

    Reads only the last byte unless the line is cut, which is then rare enough to count lines.
    """
    with path.open("rb") as handle:
        handle.seek(0, io.SEEK_END)
        if handle.tell() == 0:
            return None
        handle.seek(-1, io.SEEK_END)
        if handle.read(1) == b"\n":
            return None
        handle.seek(0)
        breaks = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return breaks + 1


def _parse_requests(source: Any) -> pd.DataFrame:
    # itl as text: with at most one sample per request, pandas would otherwise read it as numbers.
    frame = pd.read_csv(source, keep_default_na=True,
                        dtype={"error": str, "finish_reason": str, "token_source": str, "itl": str})
    frame["itl"] = frame["itl"].fillna("").map(lambda text: [float(x) for x in text.split()] if text else [])
    if "cooldown" not in frame:
        frame["cooldown"] = False
    for column in ("warmup", "cooldown", "success"):
        frame[column] = frame[column].astype(bool)
    return frame
