"""A multirun checks every job's composed settings, and its launcher, before any job starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

LOAD_KEYS = "arrival, backend, burstiness, calibrate, calibrate_min_requests, calibrate_seconds, duration, " \
            "max_ceiling_fraction, max_client_delay, number, parallel, rate, ray_address, seed, warmup, workers"


def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", "-m", f"hydra.sweep.dir={tmp_path}/sweep", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if line.strip()]


@pytest.mark.timeout(60)
def test_bad_value_in_one_job_stops_sweep(tmp_path):
    done = run_sweep(tmp_path, "load.parallel=4,-1")

    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [
        "error: job 1 (load.parallel=-1): load.parallel must be >= 1 (or null in open loop), got -1",
        "error: no job was started: 1 of 2 jobs have invalid settings",
    ]
    # No job ran, so Hydra never created the sweep folder.
    assert not (tmp_path / "sweep").exists()


@pytest.mark.timeout(60)
def test_same_error_in_every_job(tmp_path):
    done = run_sweep(tmp_path, "model=default,qwen2.5-7b", "+load.paralel=2")

    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [
        "error: all 2 jobs: +load.paralel=2: unknown key load.paralel; did you mean load.parallel? "
        f"valid keys of load: {LOAD_KEYS}",
        "error: no job was started: 2 of 2 jobs have invalid settings",
    ]


@pytest.mark.timeout(60)
def test_errors_grouped_by_message(tmp_path):
    # Jobs 0 and 3 start the search at 0, job 5 starts above search.upper_bound (2).
    done = run_sweep(tmp_path, "+sla=ttft_strict,tps_max", "load.parallel=0,1,3", "search.upper_bound=2")

    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [
        "error: jobs 0, 3: load.parallel must be >= 1 (or null in open loop), got 0",
        "error: jobs 2, 5: load.parallel (the search start) must lie within [search.lower_bound, "
        "search.upper_bound] = [1, 2], got 3",
        "error: no job was started: 4 of 6 jobs have invalid settings",
    ]


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="the ray extra is installed")
@pytest.mark.timeout(60)
def test_missing_ray_in_one_job(tmp_path):
    done = run_sweep(tmp_path, "load.backend=process,ray")

    assert done.returncode == 2, done.stderr
    assert error_lines(done)[0] == (
        "error: job 1 (load.backend=ray): load.backend=ray needs the ray package, which is not installed; "
        "run pip install -e '.[ray]' in the runner's folder, or set load.backend=process"
    )


LAUNCHERS = [
    ("joblib_parallel", "hydra_plugins.hydra_joblib_launcher",
     "error: hydra/launcher=joblib_parallel needs the Hydra launcher plugin hydra-joblib-launcher, which is not "
     "installed; run pip install -e '.[launchers]' in the runner's folder, or pip install hydra-joblib-launcher"),
    ("slurm_cluster", "hydra_plugins.hydra_submitit_launcher",
     "error: hydra/launcher=slurm_cluster needs the Hydra launcher plugin hydra-submitit-launcher, which is not "
     "installed; run pip install -e '.[launchers]' in the runner's folder, or pip install hydra-submitit-launcher"),
    ("ray_cluster", "hydra_plugins.hydra_ray_launcher",
     "error: hydra/launcher=ray_cluster needs the Hydra launcher plugin hydra-ray-launcher, which is not "
     "installed; run pip install hydra-ray-launcher"),
]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("launcher, module, line", LAUNCHERS, ids=[case[0] for case in LAUNCHERS])
def test_missing_launcher_plugin(tmp_path, launcher, module, line):
    if _installed(module):
        pytest.skip(f"{module} is installed")
    done = run_sweep(tmp_path, f"hydra/launcher={launcher}", "load.seed=0,1")

    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [line]
    assert not (tmp_path / "sweep").exists()


def job_problems(launcher: list[str], task: list[str]) -> list[str]:
    """Compose conf/ with Hydra's own config, set a multirun's overrides and check its jobs.

    compose() composes in single-run mode, which rejects sweep values, so the sweep overrides
    are set afterwards where Hydra keeps them (hydra.overrides.task).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import read_write

    from paths import CONF_DIR
    from runner.__main__ import _job_problems

    # The checks compose each job with Hydra's config loader, which lives while this context does.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=launcher, return_hydra_config=True)
        with read_write(config):
            config.hydra.overrides.task = task
        return _job_problems(config, debug=False)


@pytest.mark.parametrize("launcher, lines", [
    ([], ["job 0 (load.parallel=1): endpoint.api_key_env names the environment variable RUNNER_TEST_UNSET_KEY, "
          "which is not set; export it or set endpoint.api_key_env=null",
          "job 1 (load.parallel=0): load.parallel must be >= 1 (or null in open loop), got 0",
          "no job was started: 2 of 2 jobs have invalid settings"]),
    # SLURM jobs run on other nodes, with their own environment, so only settings are checked.
    (["hydra/launcher=slurm_cluster"],
     ["job 1 (load.parallel=0): load.parallel must be >= 1 (or null in open loop), got 0",
      "no job was started: 1 of 2 jobs have invalid settings"]),
], ids=["local", "slurm"])
def test_remote_jobs_skip_local_checks(monkeypatch, launcher, lines):
    monkeypatch.delenv("RUNNER_TEST_UNSET_KEY", raising=False)
    task = ["endpoint.api_key_env=RUNNER_TEST_UNSET_KEY", "load.parallel=1,0"]
    assert job_problems(launcher, task) == lines
