"""Files of a run folder: requests.csv streamed as requests end, summary.csv at the end."""

from __future__ import annotations

import csv
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
        return " ".join(f"{item:.6f}" for item in value)
    return value


class RequestsWriter:
    """Appends rows to requests.csv in batches of FLUSH_ROWS, flushing each batch.

    With ``append`` an existing file is continued (a resumed run) and keeps its header.
    """

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        continuing = append and path.is_file() and path.stat().st_size > 0
        self._file = path.open("a" if continuing else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if not continuing:
            self._writer.writerow(REQUEST_COLUMNS)
        self._pending: list[list[Any]] = []
        self.rows_written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append([_csv_value(row[column]) for column in REQUEST_COLUMNS])
        if len(self._pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._writer.writerows(self._pending)
            self.rows_written += len(self._pending)
            self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> "RequestsWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_summary(rows: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """Write summary.csv with the contract's columns first; return the frame written."""
    frame = pd.DataFrame(rows)
    ordered = [c for c in SUMMARY_COLUMNS if c in frame.columns]
    extra = [c for c in frame.columns if c not in ordered]
    frame = frame[ordered + extra]
    frame.to_csv(path, index=False, float_format="%.6f")
    return frame


def read_requests(path: Path) -> pd.DataFrame:
    """Read requests.csv back, with ``itl`` as lists of floats."""
    frame = pd.read_csv(path, keep_default_na=True, dtype={"error": str, "finish_reason": str, "token_source": str})
    frame["itl"] = frame["itl"].fillna("").map(lambda text: [float(x) for x in text.split()] if text else [])
    if "cooldown" not in frame:
        frame["cooldown"] = False
    for column in ("warmup", "cooldown", "success"):
        frame[column] = frame[column].astype(bool)
    return frame
