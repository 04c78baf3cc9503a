"""SIGINT and SIGTERM at any moment write what was measured and stop the simulated server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.paths import REPO

LONG_RUN = ["progress=false", "model.sim_profile=fast", "load.parallel=16", "load.number=1000000",
            "request.max_tokens=32", "dataset.min_prompt_length=16", "dataset.max_prompt_length=16",
            "dataset.num_prompts=64"]
LONG_TUNE = [*LONG_RUN, "+sla=custom", 'sla.rules=[{p99_ttft:"<=10"}]', "search.upper_bound=64",
             "search.min_requests=100000", "search.max_requests=100000"]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(item) for item in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_for_rows(out_dir: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until requests.csv contains more than the header, i.e. some requests were measured."""
    deadline = time.monotonic() + timeout
    path = out_dir / "requests.csv"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and len(path.read_text().splitlines()) > 1:
            return
        time.sleep(0.2)
    raise AssertionError("no request was written within the timeout")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", ["run", "tune"])
def test_signal_writes_results(tmp_path, signum, mode):
    out_dir = tmp_path / "run"
    overrides = LONG_RUN if mode == "run" else LONG_TUNE
    process = subprocess.Popen([sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", *overrides],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(out_dir, process)
        sims = children(process.pid)
        assert sims, "the simulated server child was not found"

        sent = time.monotonic()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 128 + signum, stderr
    assert elapsed < 15
    assert "Traceback" not in stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    for pid in sims:
        assert not alive(pid)
    summary = pd.read_csv(out_dir / "summary.csv")
    assert summary["requests"].iloc[0] > 0
    # The only repeat was cut by the signal, so no repeat finished.
    assert summary["runs"].tolist() == [0]
    requests = pd.read_csv(out_dir / "requests.csv")
    assert len(requests) >= summary["requests"].sum()
    if mode == "run":
        # Each of the 16 slots had a request in flight at the signal. They keep a row, marked
        # cancelled and, like cooldown requests, left out of every statistic.
        cancelled = requests[requests["error"] == "cancelled"]
        assert len(cancelled) == 16
        assert cancelled["cooldown"].all()
        assert not cancelled["success"].any()
        assert summary["cooldown"].tolist() == [16]
        assert summary["success_rate"].tolist() == [100.0]
        assert len(requests) == summary["requests"].iloc[0] + summary["warmup"].iloc[0] + 16
    assert (out_dir / "performance_summary.txt").read_text().strip()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["interrupted_by"] == signal.Signals(signum).name
    if mode == "tune":
        sla = pd.read_csv(out_dir / "sla_summary.csv")
        assert sla["note"].str.startswith("interrupted").tolist() == [True]
        # No probe of 100,000 requests finished, so no load has passed yet.
        assert sla["last_pass"].isna().all()
        assert "none so far (interrupted)" in (out_dir / "performance_summary.txt").read_text()


SWEEP = ["progress=false", "model.sim_profile=fast", "load.parallel=4", "request.max_tokens=16",
         "dataset.min_prompt_length=16", "dataset.max_prompt_length=16", "dataset.num_prompts=16",
         "load.number=40,1000000,50"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_sweep_aggregates(tmp_path, signum):
    sweep_dir = tmp_path / "sweep"
    process = subprocess.Popen([sys.executable, "-m", "runner", "-m", f"hydra.sweep.dir={sweep_dir}", *SWEEP],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Job 0 sends 40 requests; job 1 would send a million, so it is running when the signal comes.
        wait_for_rows(sweep_dir / "1", process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"sweep interrupted by {signal.Signals(signum).name}" in stderr
    assert not (sweep_dir / "2").exists()
    summary = pd.read_csv(sweep_dir / "summary.csv", dtype={"job": str})
    assert summary["job"].tolist() == ["0", "1"]
    assert summary["job_status"].tolist() == ["ok", f"interrupted by {signal.Signals(signum).name}"]
    assert summary["requests"].iloc[0] == 40
    assert 0 < summary["requests"].iloc[1] < 1000000
    markdown = (sweep_dir / "summary.md").read_text()
    assert ("3 jobs: 2 with results (1 of them interrupted, so their results are partial), 0 failed, "
            "1 not started.") in markdown
    assert f"| 1 | 1000000 | interrupted by {signal.Signals(signum).name} | 1 | 0 |  |" in markdown
    assert (sweep_dir / "report.html").is_file()


@pytest.mark.timeout(60)
def test_signal_before_load_exits_cleanly(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path / 'run'}", *LONG_RUN],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside Hydra's start-up or the tokenizer load
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr


# Job 1 requests 20,000 tokens per request, which the qwen2.5-7b profile streams for minutes,
# so a signal soon after its requests.csv appears comes before any request completes.
SLOW_FIRST_REQUEST_SWEEP = ["progress=false", "model.sim_profile=qwen2.5-7b-1gpu", "load.parallel=2",
                            "load.number=4", "dataset.min_prompt_length=16", "dataset.max_prompt_length=16",
                            "dataset.num_prompts=4", "request.max_tokens=8,20000,8,8"]


@pytest.mark.timeout(120)
def test_ctrl_c_before_first_request_in_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # A session of its own, so the signal can go to the whole process group as Ctrl-C does.
    process = subprocess.Popen([sys.executable, "-m", "runner", "-m", f"hydra.sweep.dir={sweep_dir}",
                                *SLOW_FIRST_REQUEST_SWEEP],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (sweep_dir / "1" / "requests.csv").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "job 1 did not open requests.csv within 60 s"
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not (sweep_dir / "1" / "error.txt").exists(), (sweep_dir / "1" / "error.txt").read_text()
    # The two warmup requests in flight have rows, cancelled, and no request completed.
    requests = pd.read_csv(sweep_dir / "1" / "requests.csv")
    assert requests["error"].tolist() == ["cancelled", "cancelled"]
    assert requests["warmup"].tolist() == [True, True]
    assert (sweep_dir / "1" / "performance_summary.txt").read_text() == (
        "No measured request completed before the run stopped.\n")
    assert json.loads((sweep_dir / "1" / "manifest.json").read_text())["interrupted_by"] == "SIGINT"
    assert not (sweep_dir / "2").exists()
    assert "sweep interrupted by SIGINT" in stderr
    assert "; 2 jobs not started" in stderr
    final_lines = stderr.strip().splitlines()[-2:]
    assert sum("interrupted by SIGINT" in line for line in final_lines) == 1, final_lines
    markdown = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 1 with results, 1 interrupted before a request completed, 0 failed, 2 not started." in markdown
    assert "| 1 | 20000 | interrupted by SIGINT, no complete request | 0 | 0 |  |" in markdown
    assert "## Failed jobs" not in markdown
    summary = pd.read_csv(sweep_dir / "summary.csv", dtype={"job": str})
    assert summary["job"].tolist() == ["0"]
