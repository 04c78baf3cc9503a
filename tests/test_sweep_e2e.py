"""Multirun sweeps on the simulated server, end to end, into temporary folders."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent

# Each job: 6 measured requests of 16 prompt and 8 output tokens, no warmup.
SHORT_JOB = ["load.number=6", "load.warmup=0", "request.max_tokens=8", "dataset.min_prompt_length=16",
             "dataset.max_prompt_length=16", "progress=false"]
# SLA searches over concurrency 1 and 2 only, one repeat of 6 requests per probe.
TINY_SEARCH = ["load.parallel=1", "search.lower_bound=1", "search.upper_bound=2", "search.num_runs=1",
               "search.min_requests=6", "search.requests_per_unit=0", "search.max_requests=6",
               "search.max_extra_runs=0"]
SWEEP_PLOTS = ["sweep_p99_latency_vs_load.png", "sweep_p99_tpot_vs_load.png", "sweep_p99_ttft_vs_load.png",
               "sweep_tps_vs_latency.png", "sweep_tps_vs_load.png"]


def run_sweep(overrides: list[str], sweep_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent, capture_output=True, text=True, timeout=400,
    )


def job_overrides(job_dir: Path) -> dict[str, str]:
    lines = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    return dict(line.lstrip("+").split("=", 1) for line in lines)


@pytest.mark.slow
def test_model_by_parallel_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_sweep(["model=default,qwen2.5-7b", "load.parallel=1,2", *SHORT_JOB], sweep)
    assert result.returncode == 0, result.stderr

    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        assert (sweep / job / "summary.csv").is_file(), job

    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["job"]) == [0, 1, 2, 3]
    for _, row in summary.iterrows():
        overrides = job_overrides(sweep / str(row["job"]))
        assert row["model"] == overrides["model"]
        assert row["load.parallel"] == int(overrides["load.parallel"])
        assert row["parallel"] == int(overrides["load.parallel"])
    assert list(summary.columns[:3]) == ["job", "model", "load.parallel"]
    pairs = set(zip(summary["model"], summary["load.parallel"]))
    assert pairs == {("default", 1), ("default", 2), ("qwen2.5-7b", 1), ("qwen2.5-7b", 2)}

    assert sorted(p.name for p in sweep.glob("*.png")) == SWEEP_PLOTS
    assert (sweep / "report.html").is_file()
    assert not (sweep / "sla_summary.csv").exists()


@pytest.mark.slow
def test_sla_sets_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_sweep(["+sla=ttft_strict,tps_max", *TINY_SEARCH, *SHORT_JOB], sweep)
    assert result.returncode == 0, result.stderr

    sla = pd.read_csv(sweep / "sla_summary.csv")
    # Each rule set has one group, so one row per job.
    assert sorted(sla["job"]) == [0, 1]
    assert sorted(sla["sla"]) == ["tps_max", "ttft_strict"]
    for row in sla.itertuples():
        assert row.sla == job_overrides(sweep / str(row.job))["sla"]
        assert row.variable == "parallel"
        assert 1 <= row.max_satisfied <= 2
    assert set(pd.read_csv(sweep / "summary.csv")["job"]) == {0, 1}
    assert (sweep / "report.html").is_file()


# A JSONL file whose second line is cut off: a job reading it fails when it builds its
# prompts, after the sweep's up-front checks (which only see that the file exists).
BAD_JSONL = '{"prompt": "first prompt"}\n{"prompt": "second prompt"\n'


@pytest.mark.slow
def test_failed_job_still_aggregates(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL, encoding="utf-8")
    good = REPO_ROOT / "tests" / "data" / "prompts.jsonl"
    sweep = tmp_path / "sweep"
    overrides = [o for o in SHORT_JOB if not o.startswith("dataset.")]
    result = run_sweep(["dataset=jsonl", f"dataset.path={good},{bad}", *overrides], sweep)
    # Each failure is a one-line error, which exits 2 in a single run too.
    assert result.returncode == 2, result.stderr
    assert "error: 1 job(s) failed: 1; see error.txt in each" in result.stderr.splitlines()

    error = (sweep / "1" / "error.txt").read_text(encoding="utf-8")
    assert f"{bad} line 2" in error
    summary = pd.read_csv(sweep / "summary.csv")
    assert set(summary["job"]) == {0}
    assert list(summary["dataset.path"]) == [str(good)]
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert "1 failed" in page


# The sweep folder name proposed for conf/config.yaml: the process id keeps two sweeps that
# start in the same microsecond apart. It needs an OmegaConf resolver named `pid`, registered
# before Hydra resolves hydra.sweep.dir.
PID_SWEEP_DIR = "${now:%Y-%m-%d}/${now:%H-%M-%S-%f}-${pid:}"
# Registers the resolver, then runs `python -m runner` as the command line would.
WITH_PID_RESOLVER = """
import os, runpy, sys
from omegaconf import OmegaConf
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid)
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""


def test_sweep_dir_with_pid_never_collides(tmp_path):
    # Both jobs of each sweep pass the up-front checks and then fail on the cut-off JSONL line,
    # so the job folders exist but no server starts.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL, encoding="utf-8")
    command = [sys.executable, "-c", WITH_PID_RESOLVER, "-m", "dataset=jsonl", f"dataset.path={bad}",
               "dataset.seed=0,1", f"hydra.sweep.dir={tmp_path}/{PID_SWEEP_DIR}"]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert "error: 2 job(s) failed: 0, 1; see error.txt in each" in stderr, stderr
        assert process.returncode == 2, stderr

    sweeps = sorted(tmp_path.glob("*/*"))
    assert len(sweeps) == 2
    assert sorted(path.name.rsplit("-", 1)[1] for path in sweeps) == sorted(str(p.pid) for p in processes)
    for sweep in sweeps:
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
        assert (sweep / "multirun.yaml").is_file()
