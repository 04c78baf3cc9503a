"""Load point samples spilled to disk give the summary row of the same rows held in memory.

The reference is ``runner.metrics.summarize`` over a data frame of every row, the way load
points were summarized before their samples spilled to disk. The rows are random, with
ties, NaN, failures, warmup and cooldown rows, several repeats, and empty and one-sample
points. Small blocks make every series spill and every percentile take the radix path.
"""

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from runner.metrics import summarize
from runner.samples import PointSamples

FLOAT_COLUMNS = ("scheduled_at", "dispatched_at", "sent_at", "ended_at", "ttft", "latency", "tpot",
                 "prompt_tokens", "completion_tokens", "max_tokens", "expected_prompt_tokens", "tokenizer_tokens")
BLOCK = 128


def number(value):
    return math.nan if value is None or value == "" else float(value)


def reference_frame(rows):
    """Build the frame that summarize reads, one row per request, as the in-memory samples did."""
    data = {name: np.array([number(row.get(name)) for row in rows], dtype=float) for name in FLOAT_COLUMNS}
    data["repeat"] = np.array([int(row["repeat"]) for row in rows], dtype=np.int64)
    data["warmup"] = np.array([bool(row["warmup"]) for row in rows], dtype=bool)
    data["cooldown"] = np.array([bool(row.get("cooldown", False)) for row in rows], dtype=bool)
    data["success"] = np.array([bool(row["success"]) for row in rows], dtype=bool)
    data["itl"] = [np.asarray(row["itl"], dtype=float) for row in rows]
    return pd.DataFrame(data)


def mismatches(new, old):
    """Return the keys whose values differ (NaN equals NaN; 0.0 equals -0.0)."""
    assert set(new) == set(old)
    different = {}
    for key in old:
        a, b = new[key], old[key]
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        if not both_nan and a != b:
            different[key] = (a, b)
    return different


def random_rows(count, seed, *, repeats=2, warmup=5, cooldown=4, ties=False):
    rng = random.Random(seed)
    rows = []
    clock = 0.0
    for index in range(count):
        repeat = min(index * repeats // max(count, 1), repeats - 1)
        clock += rng.choice([0.01, 0.02]) if ties else rng.random() * 0.05
        scheduled = clock
        handed = scheduled + (0.001 if ties else rng.random() * 0.002)
        dispatched = None if rng.random() < 0.05 else handed  # summarize then uses sent_at
        sent = handed + (0.0005 if ties else rng.random() * 0.001)
        success = rng.random() > 0.1
        tokens = rng.choice([0, 1, 2, 8, 16]) if success else None
        ttft = None
        if success and tokens:
            ttft = 0.1 if ties else rng.random() * 0.2
        gaps = max((tokens or 0) - 1, 0)
        itl = [rng.choice([0.01, 0.02]) if ties else rng.random() * 0.03 for _ in range(gaps)]
        latency = ((ttft or 0.0) + sum(itl)) if success else None
        rows.append({
            "repeat": repeat,
            "warmup": index < warmup,
            "cooldown": index >= count - cooldown,
            "scheduled_at": scheduled,
            "dispatched_at": dispatched,
            "sent_at": sent,
            "ended_at": sent + (latency if latency is not None else 0.3),
            "ttft": ttft,
            "latency": latency,
            "tpot": sum(itl) / (tokens - 1) if success and tokens and tokens >= 2 else None,
            "prompt_tokens": rng.choice([64, 70]) if success else None,
            "completion_tokens": tokens,
            "success": success,
            "max_tokens": 16,
            "expected_prompt_tokens": 64,
            "tokenizer_tokens": None if tokens is None else tokens + rng.choice([0, 0, 3]),
            "itl": itl,
        })
    return rows


def spilled(rows, tmp_path, block=BLOCK):
    samples = PointSamples(tmp_path / "point", block=block)
    samples.extend(rows)
    return samples


TIMINGS = [{"parallel": 4.0}, {"open_loop": True}, {}]
BOUNDS = [None, {"ttft": 0.1}, {"tpot": 0.015, "itl": 0.02}, {"latency": 0.2, "ttft": 0.15, "tpot": 0.02,
                                                               "itl": 0.025}]


@pytest.mark.parametrize("timing", TIMINGS, ids=["closed", "open", "window"])
@pytest.mark.parametrize("bounds", BOUNDS, ids=["none", "ttft", "tpot_itl", "all"])
def test_random_rows_match_in_memory(timing, bounds, tmp_path):
    rows = random_rows(700, seed=1)
    samples = spilled(rows, tmp_path)

    assert mismatches(samples.summarize(bounds, **timing), summarize(reference_frame(rows), bounds, **timing)) == {}
    assert samples.goodput(bounds, **timing) == summarize(reference_frame(rows), bounds, **timing)["goodput"]
    assert len(list((tmp_path / "point").iterdir())) >= 5  # the series did spill


@pytest.mark.parametrize("timing", TIMINGS, ids=["closed", "open", "window"])
def test_ties_match_in_memory(timing, tmp_path):
    rows = random_rows(900, seed=2, ties=True, repeats=3)
    samples = spilled(rows, tmp_path)
    reference = summarize(reference_frame(rows), {"itl": 0.015}, **timing)

    assert mismatches(samples.summarize({"itl": 0.015}, **timing), reference) == {}
    assert reference["p50_itl"] in (0.01, 0.015, 0.02)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 9])
@pytest.mark.parametrize("timing", TIMINGS, ids=["closed", "open", "window"])
def test_small_points_match_in_memory(count, timing, tmp_path):
    # 0 rows, a single warmup row, and points with a single measured request.
    rows = random_rows(count, seed=count, repeats=1, warmup=1, cooldown=0)
    samples = spilled(rows, tmp_path)

    assert mismatches(samples.summarize({"ttft": 0.1}, **timing),
                      summarize(reference_frame(rows), {"ttft": 0.1}, **timing)) == {}


def test_missing_times_fall_back_like_in_memory(tmp_path):
    rows = random_rows(400, seed=4)
    rows[200]["scheduled_at"] = None  # closed loop cannot time by slot any more
    rows[201]["sent_at"] = None
    rows[202]["ended_at"] = None
    samples = spilled(rows, tmp_path)

    for timing in TIMINGS:
        assert mismatches(samples.summarize(**timing), summarize(reference_frame(rows), **timing)) == {}


def test_nan_itl_samples_like_in_memory(tmp_path):
    rows = random_rows(300, seed=5)
    with_samples = [row for row in rows if row["success"] and len(row["itl"]) >= 3]
    with_samples[0]["itl"][1] = math.nan
    with_samples[1]["itl"][0] = math.nan
    samples = spilled(rows, tmp_path)
    bounds = {"itl": 0.02}

    assert mismatches(samples.summarize(bounds, parallel=2.0),
                      summarize(reference_frame(rows), bounds, parallel=2.0)) == {}


def test_all_failed_point_like_in_memory(tmp_path):
    rows = random_rows(300, seed=6)
    for row in rows:
        row.update(success=False, ttft=None, latency=None, tpot=None, itl=[])
    samples = spilled(rows, tmp_path)
    summary = samples.summarize(parallel=4.0)

    assert mismatches(summary, summarize(reference_frame(rows), parallel=4.0)) == {}
    assert summary["failures"] == 291
    assert math.isnan(summary["p99_ttft"])


def test_memory_only_point_like_spilled(tmp_path):
    rows = random_rows(700, seed=7)
    in_memory = PointSamples()
    in_memory.extend(rows)

    assert mismatches(in_memory.summarize(parallel=4.0), spilled(rows, tmp_path).summarize(parallel=4.0)) == {}
    assert not (tmp_path / "point-memory").exists()


def test_remove_deletes_scratch_files(tmp_path):
    samples = spilled(random_rows(700, seed=8), tmp_path)
    samples.spill()
    assert (tmp_path / "point" / "itl.f64").is_file()

    samples.remove()

    assert not (tmp_path / "point").exists()


def test_unknown_bound_rejected(tmp_path):
    samples = spilled(random_rows(50, seed=9), tmp_path)

    with pytest.raises(ValueError, match="per-request bounds on e2e are not supported"):
        samples.goodput({"e2e": 1.0}, parallel=4.0)


class KeepingWriter:
    """A requests.csv writer that also keeps every row it is given."""

    def __init__(self, path):
        from runner.output import RequestsWriter

        self.inner = RequestsWriter(path)
        self.rows = []

    def add(self, row):
        self.rows.append(row)
        self.inner.add(row)

    def flush(self):
        self.inner.flush()


async def measure_on_sim(tmp_path, monkeypatch, overrides, value, repeats):
    """Measure ``repeats`` repeats of ``value`` with the real prober and client against the simulated server."""
    import functools
    import time

    from hydra import compose, initialize_config_dir
    from rich.console import Console

    from paths import REPO
    from runner import prober as prober_module
    from runner.__main__ import to_run_config
    from runner.client.openai import OpenAIClient
    from runner.console import make_progress
    from runner.data import build_prompts
    from runner.sim.process import start_sim
    from runner.tokenizer import load_tokenizer, resolve_tokenizer_path, token_counter

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = to_run_config(compose("config", overrides=[
            "model.sim_profile=fast", "request.max_tokens=24", "dataset.min_prompt_length=16",
            "dataset.max_prompt_length=16", "dataset.num_prompts=64", *overrides]))
    # Blocks of 128 values make every series of a few hundred requests spill and select by radix.
    monkeypatch.setattr(prober_module, "PointSamples", functools.partial(PointSamples, block=BLOCK))
    tokenizer = load_tokenizer(config.model.tokenizer)
    prompts = build_prompts(config.dataset, tokenizer, 64, config.endpoint.api)
    writer = KeepingWriter(tmp_path / "requests.csv")
    with start_sim("fast", seed=1, tokenizer=resolve_tokenizer_path(config.model.tokenizer),
                   model=config.model.name) as sim:
        async with OpenAIClient(config.endpoint, config.model, config.request, base_url=sim.base_url,
                                pool_size=16) as client:
            with make_progress(Console(), False) as progress:
                prober = prober_module.LoadPointProber(
                    config, client, prompts, writer, token_counter(tokenizer), progress, time.perf_counter(),
                    probes_path=tmp_path / "probes.jsonl", scratch_dir=tmp_path / ".samples")
                await prober.ensure(value, repeats)
    writer.inner.close()
    return prober, writer.rows


async def test_sim_closed_loop_matches_in_memory(tmp_path, monkeypatch):
    prober, rows = await measure_on_sim(tmp_path, monkeypatch, ["load.parallel=8", "load.number=250",
                                                                "load.warmup=8"], 8, repeats=2)
    samples = prober.samples[8]

    assert len(rows) >= 516  # 2 x (8 warmup + 250 measured), and cooldown requests
    assert len(samples.itl) > 20 * BLOCK
    for bounds in (None, {"ttft": 0.05, "itl": 0.01}):
        row = prober.summary_row(8, bounds)
        reference = summarize(reference_frame(rows), bounds, parallel=8)
        assert mismatches({key: row[key] for key in reference}, reference) == {}
    assert row["requests"] == 500
    assert row["runs"] == 2
    lag = samples.loop_lag.read(0, len(samples.loop_lag))
    assert row["loop_lag_p99"] == float(np.percentile(lag, 99))
    # Each probes.jsonl line keeps its own repeat's lag samples.
    lines = [json.loads(line) for line in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert [line["repeat"] for line in lines] == [0, 1]
    assert lines[0]["loop_lag"] + lines[1]["loop_lag"] == [round(sample, 6) for sample in lag.tolist()]

    prober.remove_scratch()
    assert not (tmp_path / ".samples").exists()


async def test_sim_open_loop_matches_in_memory(tmp_path, monkeypatch):
    prober, rows = await measure_on_sim(tmp_path, monkeypatch, ["load.rate=400", "load.parallel=32",
                                                                "load.number=400", "load.warmup=0"], 400, repeats=1)
    samples = prober.samples[400]
    row = prober.summary_row(400, {"tpot": 0.01})
    reference = summarize(reference_frame(rows), {"tpot": 0.01}, open_loop=True)

    assert mismatches({key: row[key] for key in reference}, reference) == {}
    assert row["requests"] == 400
    # probes.jsonl keeps the repeat's lag samples, written one block at a time.
    line = json.loads((tmp_path / "probes.jsonl").read_text().splitlines()[0])
    lag = samples.loop_lag.read(0, len(samples.loop_lag))
    assert line["loop_lag"] == [round(sample, 6) for sample in lag.tolist()]
    assert line["requests"] == 400


def test_probe_line_written_by_blocks(tmp_path):
    import io

    from runner.prober import write_probe_line
    from runner.spill import SpilledSeries

    lag = SpilledSeries(tmp_path / "lag.f64", block=BLOCK)
    lag.extend(np.random.default_rng(12).random(1000).tolist())
    line = {"variable": "parallel", "value": 8.0, "repeat": 1, "requests": 250}
    handle = io.StringIO()

    write_probe_line(handle, line, lag, 300)

    expected = line | {"loop_lag": [round(sample, 6) for sample in lag.read(300, 1000).tolist()]}
    assert handle.getvalue() == json.dumps(expected) + "\n"
