"""load.workers=2 through the real command line gives the rows and columns of load.workers=1."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from paths import REPO

# 40 measured requests of 8 output tokens at concurrency 4 on the fast simulated server.
RUN = ["model.sim_profile=fast", "load.parallel=4", "load.number=40", "load.warmup=4", "request.max_tokens=8",
       "dataset.min_prompt_length=16", "dataset.max_prompt_length=16", "progress=false"]


def run(out_dir, workers: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runner", *RUN, f"load.workers={workers}", f"hydra.run.dir={out_dir}"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    for out_dir, workers in ((single, 1), (multi, 2)):
        completed = run(out_dir, workers)
        assert completed.returncode == 0, completed.stderr[-2000:]

    single_rows, multi_rows = pd.read_csv(single / "requests.csv"), pd.read_csv(multi / "requests.csv")
    assert list(multi_rows.columns) == list(single_rows.columns)
    for rows in (single_rows, multi_rows):
        main = rows[~rows["cooldown"]]
        assert sorted(main["request_id"]) == list(range(44))
        assert int(main["warmup"].sum()) == 4
        assert main["success"].all()
        assert (rows.loc[rows["cooldown"], "request_id"] >= 44).all()
    # The workers counted output tokens with their own copy of the tokenizer, as the parent does.
    token_columns = ["completion_tokens", "token_source", "tokenizer_tokens"]
    single_tokens = single_rows.loc[~single_rows["cooldown"], token_columns].value_counts().to_dict()
    multi_tokens = multi_rows.loc[~multi_rows["cooldown"], token_columns].value_counts().to_dict()
    assert multi_tokens == single_tokens

    single_summary, multi_summary = pd.read_csv(single / "summary.csv"), pd.read_csv(multi / "summary.csv")
    assert list(multi_summary.columns) == list(single_summary.columns)
    assert multi_summary.loc[0, "requests"] == single_summary.loc[0, "requests"] == 40
    assert multi_summary.loc[0, "warmup"] == 4

    # Each worker's lateness, loop lag and CPU are in the repeat's probes.jsonl line.
    probe = json.loads((multi / "probes.jsonl").read_text().splitlines()[0])
    assert [worker["worker"] for worker in probe["workers"]] == [0, 1]
    assert sum(worker["requests"] for worker in probe["workers"]) == len(multi_rows)
    for worker in probe["workers"]:
        assert worker["lateness_p99"] >= worker["lateness_p50"] >= 0
        assert worker["loop_lag_p99"] >= 0
        assert worker["cpu_percent"] > 0
    assert "workers" not in json.loads((single / "probes.jsonl").read_text().splitlines()[0])
    log = (multi / "runner.log").read_text()
    assert "parallel 4 run 1, load worker 0:" in log
    assert "parallel 4 run 1, load worker 1:" in log


@pytest.mark.timeout(120)
def test_workers_above_slots_warn(tmp_path):
    command = [sys.executable, "-m", "runner", *RUN, "load.parallel=2", "load.number=4", "load.workers=5",
               f"hydra.run.dir={tmp_path}"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=100)

    assert completed.returncode == 0, completed.stderr[-2000:]
    log = (tmp_path / "runner.log").read_text()
    warning = ("load.workers=5, but only 2 workers are used: each worker needs at least one concurrency slot and "
               "one request, and this load point has load.parallel=2 concurrency slots and 8 requests")
    assert log.count(warning) == 1
    assert "parallel 2 run 1, load worker 1:" in log
    assert "parallel 2 run 1, load worker 2:" not in log
