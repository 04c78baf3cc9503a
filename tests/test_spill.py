"""Spilled series: exact mean and percentiles, equal to numpy's, with one block in memory."""

import math

import numpy as np
import pytest

from runner.spill import SpilledSeries, key_value, mean, order_statistics, percentiles, sort_keys

POINTS = [0, 12.5, 50, 90, 99, 99.9, 100]


def spilled(values, tmp_path, block=128, chunk=37):
    series = SpilledSeries(tmp_path / "values.f64", block=block)
    values = list(values)
    for start in range(0, len(values), chunk):
        series.extend(values[start:start + chunk])
    return series


def datasets():
    rng = np.random.default_rng(3)
    return {
        "lognormal": rng.lognormal(-4, 1, 5000),
        "ties": rng.integers(0, 4, 5000) * 0.01,
        "all_equal": np.full(3000, 0.0123),
        "negatives": rng.normal(0, 1, 4000),
        "rounded_clusters": np.round(rng.normal(0.01, 0.0001, 6000), 6),
        "huge_range": np.concatenate([rng.random(2000) * 1e-9, rng.random(2000) * 1e9, [0.0, 5e-324]]),
        "single": np.array([0.25]),
        "two": np.array([0.5, 0.25]),
        "one_block": rng.random(128),
        "one_past_a_block": rng.random(129),
    }


@pytest.mark.parametrize("name", list(datasets()))
def test_percentiles_equal_numpy(name, tmp_path):
    values = datasets()[name]
    series = spilled(values, tmp_path)

    assert percentiles(series, POINTS) == np.percentile(values, POINTS).tolist()
    assert mean(series) == float(np.mean(values))


@pytest.mark.parametrize("block", [128, 129, 1000, 4096])
def test_block_size_changes_nothing(block, tmp_path):
    values = np.random.default_rng(block).lognormal(-3, 2, 20_000)
    series = spilled(values, tmp_path, block=block, chunk=64)

    assert len(series) == 20_000
    assert percentiles(series, POINTS) == np.percentile(values, POINTS).tolist()
    assert mean(series) == float(np.mean(values))


def test_values_split_between_file_and_memory(tmp_path):
    values = np.random.default_rng(5).random(1000)
    series = SpilledSeries(tmp_path / "values.f64", block=256)
    series.extend(values[:300].tolist())  # 300 values reach the block: all go to the file
    series.extend(values[300:400].tolist())
    series.spill()
    series.extend(values[400:900].tolist())
    series.extend(values[900:].tolist())  # fewer than a block: they stay in memory

    assert (tmp_path / "values.f64").stat().st_size == 900 * 8
    assert series.read(0, 1000).tolist() == values.tolist()
    assert series.read(390, 410).tolist() == values[390:410].tolist()
    assert np.concatenate(list(series.blocks(5, 999))).tolist() == values[5:999].tolist()
    assert percentiles(series, POINTS) == np.percentile(values, POINTS).tolist()


def test_memory_only_series_never_writes(tmp_path):
    series = SpilledSeries(None, block=128)
    series.extend(np.arange(1000.0).tolist())
    series.spill()

    assert len(series) == 1000
    assert list(tmp_path.iterdir()) == []
    assert percentiles(series, [50]) == [499.5]
    assert mean(series) == 499.5


def test_empty_series_is_nan(tmp_path):
    series = SpilledSeries(tmp_path / "values.f64", block=128)

    assert all(math.isnan(value) for value in percentiles(series, POINTS))
    assert math.isnan(mean(series))


def test_order_statistics_every_rank(tmp_path):
    values = np.random.default_rng(9).integers(-50, 50, 700) / 8
    series = spilled(values, tmp_path)
    ranks = list(range(700))

    assert order_statistics(series, ranks) == dict(zip(ranks, np.sort(values).tolist()))


def test_sort_keys_keep_order():
    values = np.array([-math.inf, -1e300, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1.0, 1e300, math.inf])
    keys = sort_keys(values)

    assert (np.diff(keys.astype(object)) > 0).all()
    assert [key_value(int(key)) for key in keys] == values.tolist()


def test_block_below_pairwise_run_rejected(tmp_path):
    with pytest.raises(ValueError, match="block must be at least 128 values, got 64"):
        SpilledSeries(tmp_path / "values.f64", block=64)


def test_reads_never_exceed_one_block(tmp_path, monkeypatch):
    from runner import spill

    values = np.random.default_rng(11).lognormal(-4, 1, 50_000)
    series = spilled(values, tmp_path, block=1024, chunk=64)
    lengths = []
    read = spill._Reader.read

    def recording_read(self, start, stop):
        lengths.append(stop - start)
        return read(self, start, stop)

    monkeypatch.setattr(spill._Reader, "read", recording_read)
    assert percentiles(series, POINTS) == np.percentile(values, POINTS).tolist()
    assert mean(series) == float(np.mean(values))
    assert max(lengths) == 1024
    assert sum(lengths) > 3 * 50_000  # several passes over the file, one block at a time
