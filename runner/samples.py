"""Compact in-memory samples of one load point, for its summary row.

requests.csv keeps every column of every request on disk. In memory a load point keeps
only what ``runner.metrics.summarize`` reads, in typed arrays (8 bytes per number, no
Python object per request), instead of a dict and a list per request.

NOTE: memory still grows with every request, mostly through the ITL samples kept for exact
percentiles: about 0.6 KB per request of 128 tokens in a 30-minute soak (bench/soak.py).
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

# Columns kept as float64; None becomes NaN.
FLOAT_COLUMNS = ("scheduled_at", "dispatched_at", "sent_at", "ended_at", "ttft", "latency", "tpot",
                 "prompt_tokens", "completion_tokens", "max_tokens", "expected_prompt_tokens", "tokenizer_tokens")


def _number(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


class PointSamples:
    """Samples of the requests of one load value, all repeats together."""

    def __init__(self) -> None:
        self._floats = {name: array("d") for name in FLOAT_COLUMNS}
        self._repeat = array("l")
        self._warmup = array("b")
        self._cooldown = array("b")
        self._success = array("b")
        # ITL samples of all requests back to back; request i owns [offsets[i], offsets[i + 1]).
        self._itl = array("d")
        self._itl_offsets = array("q", [0])

    def __len__(self) -> int:
        return len(self._repeat)

    def add(self, row: Mapping[str, Any]) -> None:
        """Append one requests.csv row (``itl`` as a sequence of seconds)."""
        for name, column in self._floats.items():
            column.append(_number(row.get(name)))
        self._repeat.append(int(row["repeat"]))
        self._warmup.append(bool(row["warmup"]))
        self._cooldown.append(bool(row.get("cooldown", False)))
        self._success.append(bool(row["success"]))
        self._itl.extend(float(sample) for sample in row["itl"])
        self._itl_offsets.append(len(self._itl))

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def frame(self) -> pd.DataFrame:
        """Return the samples as the data frame ``summarize`` expects, ``itl`` as array views."""
        data: dict[str, Any] = {name: np.array(column, dtype=float) for name, column in self._floats.items()}
        data["repeat"] = np.array(self._repeat, dtype=np.int64)
        data["warmup"] = np.array(self._warmup, dtype=bool)
        data["cooldown"] = np.array(self._cooldown, dtype=bool)
        data["success"] = np.array(self._success, dtype=bool)
        itl = np.array(self._itl, dtype=float)
        offsets = np.array(self._itl_offsets, dtype=np.int64)
        # Views into one array: no copy of the samples, one small object per request while summarizing.
        data["itl"] = [itl[offsets[i]:offsets[i + 1]] for i in range(len(self))]
        return pd.DataFrame(data)
