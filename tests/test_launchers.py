"""Hydra launcher configs in conf/hydra/launcher, and a Joblib-launched sweep end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import runner.__main__  # noqa: F401  registers the run_schema the config tree extends

from paths import CONF_DIR, REPO

TARGETS = {
    "joblib_parallel": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "ray_cluster": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
    "slurm_cluster": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}
# Two jobs of 8 short requests each; every job starts its own simulated server (endpoint=sim).
SWEEP = ("progress=false", "load.number=8", "load.warmup=0", "load.parallel=2", "request.max_tokens=16",
         "load.seed=0,1")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_launcher_config_composes(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    assert config.hydra.launcher._target_ == TARGETS[name]


def test_joblib_config_runs_two_jobs():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=["hydra/launcher=joblib_parallel"], return_hydra_config=True)
    assert config.hydra.launcher.n_jobs == 2
    assert config.hydra.launcher.prefer == "processes"


def run_sweep(sweep_dir, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runner", "-m", f"hydra.sweep.dir={sweep_dir}", *SWEEP, *overrides]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_joblib_sweep_aggregates_like_sequential(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    parallel_dir, sequential_dir = tmp_path / "joblib", tmp_path / "basic"

    parallel = run_sweep(parallel_dir, "hydra/launcher=joblib_parallel")
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    sequential = run_sweep(sequential_dir)
    assert sequential.returncode == 0, sequential.stderr[-2000:]

    # The aggregation callback ran once, at the end of each multirun.
    parallel_summary = pd.read_csv(parallel_dir / "summary.csv")
    sequential_summary = pd.read_csv(sequential_dir / "summary.csv")
    assert list(parallel_summary.columns) == list(sequential_summary.columns)
    assert sorted(parallel_summary["job"]) == sorted(sequential_summary["job"]) == [0, 1]
    assert sorted(parallel_summary["load.seed"]) == [0, 1]
    assert list(parallel_summary["requests"]) == [8, 8]
    assert list(parallel_summary["success_rate"]) == [100.0, 100.0]
    for job in (0, 1):
        assert (parallel_dir / str(job) / "requests.csv").is_file()
        assert (parallel_dir / str(job) / "summary.csv").is_file()
