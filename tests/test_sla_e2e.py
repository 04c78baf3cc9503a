"""End to end: ``python -m runner +sla=...`` as a user runs it, against the simulated server.

The tune tests use the batch8-slow sim profile, whose capacity is fixed by its 8 batch slots.
At concurrency 8 every request gets its first token within a few 20 ms steps (p99 TTFT about
60 ms). At 9, one request always waits for a whole 32-token request to finish (TTFT about
0.7 s). A rule of p99 TTFT <= 0.3 s therefore holds up to exactly 8, with a wide margin on
both sides for CPU hiccups on a busy machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent

# Short requests keep each probe to a few seconds, and the slot count fixes the result anyway.
SHARP_SERVER = ("model.sim_profile=batch8-slow", "request.max_tokens=32")
# The margins on both sides of 0.3 s are wide, so tail_noise=0 keeps each probe to num_runs repeats.
SHARP_RULE = ("+sla=custom", 'sla.rules=[{p99_ttft:"<=0.3"}]', "search.tail_noise=0")


def runner_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "runner", f"hydra.run.dir={run_dir}", "progress=false", *overrides]


def run_runner(run_dir: Path, *overrides: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(runner_command(run_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tune_finds_slot_count(tmp_path):
    run_dir = tmp_path / "run"
    # One repeat of 100 requests per probe: probes 8, 16, 12, 10, 9.
    completed = run_runner(
        run_dir, *SHARP_RULE, "load.parallel=8", "search.upper_bound=16", "search.num_runs=1",
        "search.min_requests=100", *SHARP_SERVER, timeout=140,
    )

    assert completed.returncode == 0, completed.stderr
    assert "SLA Auto-tune Summary" in completed.stdout
    answer = pd.read_csv(run_dir / "sla_summary.csv")
    assert len(answer) == 1
    row = answer.iloc[0]
    assert row["criteria"] == "p99_ttft <= 0.3"
    assert row["variable"] == "parallel"
    assert row["max_satisfied"] == 8
    assert row["last_pass"] == 8
    assert row["first_fail"] == 9
    assert row["note"] == "Satisfied"
    summary = pd.read_csv(run_dir / "summary.csv").set_index("parallel")
    assert sorted(summary.index) == [8, 9, 10, 12, 16]
    assert summary.loc[8, "p99_ttft"] <= 0.3
    assert summary.loc[9, "p99_ttft"] > 0.3


BAD_SETTINGS = {
    "unknown operator": ("+sla=custom", 'sla.rules=[{p99_latency:"<<2"}]'),
    "wrong direction": ("+sla=custom", 'sla.rules=[{tps:"<=5"}]'),
    "unknown metric": ("+sla=custom", 'sla.rules=[{p98_ttft:"<1"}]'),
    "empty rules": ("+sla=custom", "sla.rules=[]"),
    "upper below start": ("+sla=ttft_strict", "search.upper_bound=2", "load.parallel=4"),
}


@pytest.mark.parametrize("overrides", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_setting_exits_before_load(tmp_path, overrides):
    run_dir = tmp_path / "run"
    completed = run_runner(run_dir, *overrides, timeout=60)

    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in completed.stdout
    # No load was sent: the run folder has neither prompts nor request rows.
    assert not (run_dir / "requests.csv").exists()
    assert not (run_dir / "prompts.jsonl").exists()


def _finished_rows(requests_csv: Path, value: int, total: int) -> bool:
    """Return True when requests.csv contains all ``total`` rows (warmup included) of ``value``."""
    if not requests_csv.is_file():
        return False
    try:
        frame = pd.read_csv(requests_csv, usecols=["value"])
    except (pd.errors.EmptyDataError, ValueError):
        return False  # the header or a row is being written
    return int((frame["value"] == value).sum()) >= total


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("whole_group", [False, True], ids=["runner only", "process group"])
def test_interrupt_writes_partial_results(tmp_path, whole_group):
    """SIGINT after the first probe: exit 130 within seconds, with the finished probe reported.

    "process group" sends SIGINT to the runner and its simulated server together, as Ctrl-C
    in a terminal does.
    """
    run_dir = tmp_path / "run"
    start, number = 4, 60
    command = runner_command(
        run_dir, *SHARP_RULE, f"load.parallel={start}", "search.upper_bound=16", "search.num_runs=1",
        f"search.min_requests={number}", *SHARP_SERVER,
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        # Warmup fills every slot once, so the first probe sends number + start requests.
        while not _finished_rows(run_dir / "requests.csv", start, number + start):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the first probe did not finish within 90 s"
            time.sleep(0.2)

        interrupted_at = time.monotonic()
        if whole_group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - interrupted_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 130, stderr
    assert elapsed < 8, f"exit took {elapsed:.1f} s after SIGINT"
    assert "interrupted" in stderr
    assert (run_dir / "performance_summary.txt").is_file()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert start in summary["parallel"].tolist()
    answer = pd.read_csv(run_dir / "sla_summary.csv").iloc[0]
    assert answer["note"].startswith("interrupted")
    assert pd.isna(answer["max_satisfied"])
    assert answer["last_pass"] >= start
    requests = pd.read_csv(run_dir / "requests.csv")
    first_probe = requests[(requests["value"] == start) & ~requests["cooldown"]]
    assert len(first_probe) == number + start
    assert first_probe["success"].all()


@pytest.mark.timeout(120)
def test_tune_at_upper_bound_advises_raising_it(tmp_path):
    run_dir = tmp_path / "run"
    # Probes 4 and 8, both far below the 0.3 s limit, and 8 is the upper bound.
    completed = run_runner(
        run_dir, *SHARP_RULE, "load.parallel=4", "search.upper_bound=8", "search.num_runs=1",
        "search.min_requests=16", "search.requests_per_unit=0", "load.calibrate=false", *SHARP_SERVER, timeout=110,
    )

    assert completed.returncode == 0, completed.stderr
    row = pd.read_csv(run_dir / "sla_summary.csv").iloc[0]
    assert row["max_satisfied"] == 8
    assert row["note"] == "upper bound reached"
    assert pd.isna(row["first_fail"])
    # rich wraps lines at 120 columns, so whitespace is compared collapsed.
    text = " ".join((run_dir / "performance_summary.txt").read_text().split())
    assert ("• SLA 1 (p99_ttft <= 0.3): every probe passed up to the upper bound 8; raise search.upper_bound "
            "(now 8) to look further up") in text
    assert "try a higher" not in text
    assert "none failed up to 8" in text
