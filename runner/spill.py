"""Float64 series kept mostly on disk, and exact statistics computed over them block by block.

A long load point produces millions of samples (one ITL sample per generated token). A
``SpilledSeries`` keeps at most one block of them in memory and appends the rest to a
scratch file. ``mean`` and ``percentiles`` then read the file one block at a time, so their
peak memory depends on the block size, never on the length of the series, and they return
what numpy returns for the whole series in memory:

- ``mean`` adds the values in the same pairwise order as numpy's sum, so it equals
  ``np.mean`` bit for bit.
- ``percentiles`` uses numpy's default method (linear interpolation between the two closest
  ranks) and finds those ranks by radix selection over order-preserving integer keys of
  the values. Each pass over the file counts the next 16 key bits of the values in the
  bucket that holds the rank, until that bucket fits in one block, which is partitioned in
  memory. That takes at most five passes, and it equals ``np.percentile`` bit for bit.
  The only exception is a zero result, which numpy may return as -0.0 or 0.0.

Files are read with explicit reads into fresh arrays rather than np.memmap, because mapped
pages count as the process's resident memory until the kernel drops them.
"""

from __future__ import annotations

import math
import struct
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

# Values a series keeps in memory before it appends them to its file (512 KiB of float64).
BLOCK_VALUES = 1 << 16
# numpy's pairwise sum adds runs of up to 128 values without splitting them. A block must be
# at least this long, so that ``mean`` splits a long series where numpy splits it.
PAIRWISE_RUN = 128
# Key bits resolved per radix selection pass (a histogram of 65,536 counts).
RADIX_BITS = 16
SIGN_BIT = 1 << 63
KEY_MASK = (1 << 64) - 1


class SpilledSeries:
    """An append-only float64 series: values past one block go to ``path``.

    With ``path=None`` every value stays in memory. The file is opened only to append a
    block or to read, so a run with many series keeps no file descriptors open.
    """

    def __init__(self, path: Optional[Path] = None, block: int = BLOCK_VALUES) -> None:
        if block < PAIRWISE_RUN:
            raise ValueError(f"block must be at least {PAIRWISE_RUN} values, got {block}")
        self.path = path
        self.block = block
        self._on_disk = 0
        self._tail = array("d")

    def __len__(self) -> int:
        return self._on_disk + len(self._tail)

    def append(self, value: float) -> None:
        self._tail.append(value)
        if len(self._tail) >= self.block:
            self.spill()

    def extend(self, values: Iterable[float]) -> None:
        self._tail.extend(values)
        if len(self._tail) >= self.block:
            self.spill()

    def spill(self) -> None:
        """Append the values held in memory to the file (nothing happens without a path)."""
        if self.path is None or not self._tail:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            self._tail.tofile(handle)
        self._on_disk += len(self._tail)
        self._tail = array("d")  # a new array, so the memory of the old one is freed

    def blocks(self, start: int = 0, stop: Optional[int] = None, size: Optional[int] = None) -> Iterator[np.ndarray]:
        """Yield the values of [start, stop) in order, in arrays of ``size`` values (one block by default)."""
        stop = len(self) if stop is None else stop
        size = self.block if size is None else size
        with _Reader(self) as reader:
            for low in range(start, stop, size):
                yield reader.read(low, min(low + size, stop))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Return the values of [start, stop) as a new array; the caller bounds its length."""
        with _Reader(self) as reader:
            return reader.read(start, stop)


class _Reader:
    """Reads ranges of a series, its file kept open for one pass."""

    def __init__(self, series: SpilledSeries) -> None:
        self.series = series
        self.handle = None

    def __enter__(self) -> "_Reader":
        if self.series._on_disk:
            assert self.series.path is not None
            self.handle = self.series.path.open("rb")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        on_disk = self.series._on_disk
        parts = []
        if start < on_disk:
            count = min(stop, on_disk) - start
            assert self.handle is not None
            self.handle.seek(start * 8)
            values = np.fromfile(self.handle, dtype=np.float64, count=count)
            if len(values) != count:
                raise OSError(f"{self.series.path} is shorter than the {on_disk} values written to it")
            parts.append(values)
        if stop > on_disk:
            # A copy, because a view would keep the array from growing while it exists.
            tail = np.frombuffer(self.series._tail, dtype=np.float64)
            parts.append(tail[max(start - on_disk, 0):stop - on_disk].copy())
        if not parts:
            return np.empty(0, dtype=np.float64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def mean(series: SpilledSeries) -> float:
    """Return the mean of a series with no NaN, equal to ``np.mean`` of it bit for bit (NaN when empty)."""
    if not len(series):
        return math.nan
    return pairwise_sum(series) / len(series)


def pairwise_sum(series: SpilledSeries) -> float:
    """Return the sum of a series, added in the order numpy's pairwise sum adds it.

    numpy sums n > 128 contiguous float64 values as the sum of the first n // 2 (rounded
    down to a multiple of 8) plus the sum of the rest, recursively. Splitting the same way
    down to ranges of one block, and letting numpy sum each block, reproduces its result.
    """
    with _Reader(series) as reader:

        def total(start: int, stop: int) -> float:
            if stop - start <= series.block:
                return float(np.add.reduce(reader.read(start, stop)))
            half = (stop - start) // 2
            half -= half % 8
            return total(start, start + half) + total(start + half, stop)

        return total(0, len(series))


def percentiles(series: SpilledSeries, points: Sequence[float]) -> list[float]:
    """Return ``np.percentile(values, points)`` of a series with no NaN (NaN for each when empty)."""
    count = len(series)
    if count == 0:
        return [math.nan] * len(points)
    positions = [_position(count, point) for point in points]
    ranks = sorted({rank for lower, upper, _ in positions for rank in (lower, upper)})
    values = order_statistics(series, ranks)
    return [_interpolate(values[lower], values[upper], gamma) for lower, upper, gamma in positions]


def _position(count: int, point: float) -> tuple[int, int, float]:
    """Return the two ranks around percentile ``point`` and the weight of the upper one, as numpy computes them."""
    virtual = (count - 1) * (point / 100)
    if virtual >= count - 1:
        return count - 1, count - 1, 0.0
    lower = math.floor(virtual)
    return lower, lower + 1, virtual - lower


def _interpolate(low: float, high: float, gamma: float) -> float:
    # numpy's _lerp: from the nearer end, so the result stays within [low, high].
    difference = high - low
    if gamma >= 0.5:
        return high - difference * (1 - gamma)
    return low + difference * gamma


def sort_keys(values: np.ndarray) -> np.ndarray:
    """Map float64 values to uint64 keys in the same order (-0.0 sorts just below 0.0)."""
    bits = values.view(np.uint64)
    negative = (bits >> 63).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(SIGN_BIT))


def key_value(key: int) -> float:
    """Return the float64 value of a key made by ``sort_keys``."""
    bits = key ^ SIGN_BIT if key & SIGN_BIT else ~key & KEY_MASK
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


class _RankSearch:
    """The bucket of keys known to hold one rank: keys whose top ``bits`` bits equal ``prefix``."""

    def __init__(self, rank: int, count: int) -> None:
        self.target = rank
        self.prefix = 0
        self.bits = 0
        # Rank within the bucket, and the bucket's number of values.
        self.rank = rank
        self.count = count
        self.value: Optional[float] = None

    @property
    def bucket(self) -> tuple[int, int]:
        return self.bits, self.prefix


def _in_bucket(keys: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    bits, prefix = bucket
    if bits == 0:
        return keys
    return keys[(keys >> np.uint64(64 - bits)) == np.uint64(prefix)]


def order_statistics(series: SpilledSeries, ranks: Sequence[int]) -> dict[int, float]:
    """Return the value at each 0-based rank of the sorted series, reading it one block at a time."""
    count = len(series)
    if count <= series.block:
        values = series.read(0, count)
        values.partition(list(ranks))
        return {rank: float(values[rank]) for rank in ranks}

    searches = [_RankSearch(rank, count) for rank in ranks]
    while any(search.value is None for search in searches):
        open_searches = [search for search in searches if search.value is None]
        narrowing = {s.bucket for s in open_searches if s.count > series.block}
        collecting = {s.bucket for s in open_searches if s.count <= series.block}
        histograms = {bucket: np.zeros(1 << RADIX_BITS, dtype=np.int64) for bucket in narrowing}
        collected: dict[tuple[int, int], list[np.ndarray]] = {bucket: [] for bucket in collecting}
        for block in series.blocks():
            keys = sort_keys(block)
            for bucket, histogram in histograms.items():
                digits = (_in_bucket(keys, bucket) >> np.uint64(64 - RADIX_BITS - bucket[0])) & np.uint64(0xFFFF)
                histogram += np.bincount(digits.astype(np.intp), minlength=1 << RADIX_BITS)
            for bucket, parts in collected.items():
                parts.append(_in_bucket(keys, bucket))

        for search in open_searches:
            if search.bucket in histograms:
                _narrow(search, histograms[search.bucket])
        for bucket, parts in collected.items():
            keys = np.concatenate(parts)
            waiting = [search for search in open_searches if search.bucket == bucket]
            keys.partition([search.rank for search in waiting])
            for search in waiting:
                search.value = key_value(int(keys[search.rank]))
    return {search.target: search.value for search in searches}  # type: ignore[misc]


def _narrow(search: _RankSearch, histogram: np.ndarray) -> None:
    """Move ``search`` into the sub-bucket of the next RADIX_BITS key bits that contains its rank."""
    cumulative = np.cumsum(histogram)
    digit = int(np.searchsorted(cumulative, search.rank, side="right"))
    below = int(cumulative[digit - 1]) if digit else 0
    search.rank -= below
    search.count = int(histogram[digit])
    search.prefix = (search.prefix << RADIX_BITS) | digit
    search.bits += RADIX_BITS
    if search.bits == 64:
        search.value = key_value(search.prefix)  # every value in the bucket has this key
