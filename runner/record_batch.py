"""Compact batches of final records, for sending them from a load worker to the parent.

A worker finalizes each record itself (token counts and ITL samples, see
``runner.client.finalize``), so a batch carries only the fields that requests.csv and the
statistics read. These are every scalar field of ``RequestRecord``, as one tuple per
record, and the ITL samples of all records in one ``array('d')``. Chunk arrival times and chunk texts stay in
the worker, so a batch pickles to about 100 bytes per record plus 8 bytes per ITL sample,
and unpickling it builds no Python object per chunk.
"""

from __future__ import annotations

import dataclasses
import operator
from array import array
from typing import Iterator

from runner.client.record import RequestRecord

# Fields left in the worker: finalize() has already turned them into the ITL samples.
_LEFT_OUT = ("chunk_times", "chunk_texts", "itl")
FIELDS = tuple(field.name for field in dataclasses.fields(RequestRecord) if field.name not in _LEFT_OUT)
# RequestRecord(*row) fills fields by position, so the sent fields must come first.
if tuple(field.name for field in dataclasses.fields(RequestRecord))[:len(FIELDS)] != FIELDS:
    raise RuntimeError("RequestRecord must declare chunk_times, chunk_texts and itl after its other fields")
_read_fields = operator.attrgetter(*FIELDS)


class RecordBatch:
    """Final records in compact form; ``add`` them in the worker, iterate ``records()`` in the parent."""

    __slots__ = ("rows", "itl", "bounds")

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        # ITL samples of all records back to back; record k owns itl[bounds[k]:bounds[k + 1]].
        self.itl = array("d")
        self.bounds = array("q", [0])

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, record: RequestRecord) -> None:
        """Append a record that finalize() has completed (its ``itl`` is set)."""
        if record.itl is None:
            raise ValueError(f"record {record.request_id} is not final; call finalize() before adding it")
        self.rows.append(_read_fields(record))
        self.itl.extend(record.itl)
        self.bounds.append(len(self.itl))

    def records(self) -> Iterator[RequestRecord]:
        """Yield the records back, final, without chunk times and chunk texts."""
        itl, bounds = self.itl, self.bounds
        for index, row in enumerate(self.rows):
            record = RequestRecord(*row)
            record.itl = itl[bounds[index]:bounds[index + 1]].tolist()
            yield record
