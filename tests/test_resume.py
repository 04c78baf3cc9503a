"""An SLA tune interrupted mid-probe and resumed gives the uninterrupted answer, with no probe twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.paths import REPO

# Four batch slots and about 4 ms per step: up to 4 requests in flight start at once (p99
# TTFT a few ms), a fifth waits for a whole 32-token request (about 0.13 s), so the answer
# of p99 TTFT <= 60 ms is exactly 4.
SHARP_PROFILE = {
    "step_base": 0.004, "step_per_seq": 0.0, "step_per_prefill_token": 0.0, "max_num_seqs": 4,
    "kv_cache_tokens": 1000000, "max_batched_tokens": 8192, "eos_probability": 0.0,
}
TUNE = ["progress=false", "request.max_tokens=32", "dataset.min_prompt_length=16", "dataset.max_prompt_length=16",
        "+sla=custom", 'sla.rules=[{p99_ttft:"<=0.06"}]', "load.parallel=2", "load.warmup=0",
        "search.upper_bound=16", "search.num_runs=2", "search.min_requests=30", "search.requests_per_unit=0",
        "search.max_extra_runs=0"]


def tune_command(out_dir: Path, profile: Path) -> list[str]:
    return [sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", f"model.sim_profile={profile}", *TUNE]


def probe_lines(out_dir: Path) -> list[dict]:
    path = out_dir / "probes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer(out_dir: Path) -> float:
    return float(pd.read_csv(out_dir / "sla_summary.csv")["max_satisfied"].iloc[0])


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "sharp.yaml"
    path.write_text(yaml.safe_dump(SHARP_PROFILE), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole(tmp_path_factory, profile) -> Path:
    """Folder of the tune run to its end, without a signal."""
    out_dir = tmp_path_factory.mktemp("tune") / "whole"
    done = subprocess.run(tune_command(out_dir, profile), cwd=REPO, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    return out_dir


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_of_finished_tune(whole):
    before = folder_state(whole)
    resumed = subprocess.run([sys.executable, "-m", "runner.resume", str(whole)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)

    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"{whole} finished already; nothing to resume\n"
    assert resumed.stderr == ""
    assert folder_state(whole) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_matches_uninterrupted(tmp_path, profile, whole):
    assert answer(whole) == 4

    cut = tmp_path / "cut"
    process = subprocess.Popen(tune_command(cut, profile), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(probe_lines(cut)) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.4)  # into the next repeat
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    finished_before = {(line["value"], line["repeat"]) for line in probe_lines(cut)}
    assert len(finished_before) >= 3
    interrupted = pd.read_csv(cut / "sla_summary.csv").iloc[0]
    # Parallel 2 passed with both its repeats before the signal, 4 had not finished.
    assert interrupted["last_pass"] >= 2
    table = (cut / "performance_summary.txt").read_text()
    assert f"{interrupted['last_pass']:g} so far (interrupted)" in table
    first_manifest = json.loads((cut / "manifest.json").read_text())
    assert first_manifest["interrupted_by"] == "SIGINT"

    resumed = subprocess.run([sys.executable, "-m", "runner.resume", str(cut)], cwd=REPO, capture_output=True,
                             text=True, timeout=200)

    assert resumed.returncode == 0, resumed.stderr
    assert answer(cut) == answer(whole)
    lines = probe_lines(cut)
    pairs = [(line["value"], line["repeat"]) for line in lines]
    assert len(pairs) == len(set(pairs))
    assert finished_before <= set(pairs)
    requests = pd.read_csv(cut / "requests.csv")
    counts = requests.groupby(["value", "repeat"]).size().to_dict()
    assert counts == {(float(line["value"]), line["repeat"]): line["requests"] for line in lines}
    assert requests["request_id"].is_unique
    assert (cut / ("requests.csv" + ".before-resume")).is_file()

    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["started_at"] == first_manifest["started_at"]
    assert manifest["runner_command"] == first_manifest["runner_command"]
    assert manifest["interrupted_by"] is None
    (record,) = manifest["resumes"]
    assert record["command"][1:] == ["-m", "runner.resume", str(cut)]
    kept = {(float(value), repeat) for value, repeats in record["kept_repeats"].items() for repeat in repeats}
    assert kept == finished_before
    discarded = {(float(value), repeat) for value, repeats in record["discarded_repeats"].items()
                 for repeat in repeats}
    assert discarded and not discarded & kept
    assert record["requests_backup"] == "requests.csv.before-resume"
    assert record["started_at"] > first_manifest["ended_at"]
    log = (cut / "runner.log").read_text()
    assert f"resuming {cut} at {record['started_at'][:10]}" in log
    assert "reusing the finished repeats parallel=2 #0 #1" in log
    # Concurrencies restored from probes.jsonl are written as integers, never 2.000000.
    summary_lines = (cut / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary_lines[1:]] == ["2", "4", "5", "6", "8"]

    again = subprocess.run([sys.executable, "-m", "runner.resume", str(cut)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{cut} finished already; nothing to resume\n"
    assert len(json.loads((cut / "manifest.json").read_text())["resumes"]) == 1


@pytest.mark.parametrize("override", ["request.max_tokens=64", "search.upper_bound=12", "+load.warmup=3"])
def test_resume_rejects_measurement_override(override):
    from runner.errors import ConfigError
    from runner.resume import check_overrides

    with pytest.raises(ConfigError) as raised:
        check_overrides([override])

    key = override.split("=")[0].lstrip("+")
    assert f"cannot override {key} when resuming" in str(raised.value)


def test_resume_accepts_endpoint_overrides():
    from runner.resume import check_overrides

    check_overrides(["endpoint.headers.Authorization=Bearer x", "endpoint.url=http://127.0.0.1:9/v1/completions",
                     "progress=false"])


def write_archived_config(run_dir, **endpoint):
    """Write a run folder's .hydra/config.yaml, as Hydra composes it, with ``endpoint`` keys changed."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import runner.__main__  # noqa: F401  (registers the run_schema that conf/config.yaml starts from)
    from tests.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=["+sla=ttft_strict"])
    for key, value in endpoint.items():
        config.endpoint[key] = value
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")


def test_resume_rejects_redacted_header(tmp_path):
    from runner.errors import ConfigError
    from runner.resume import load_config

    write_archived_config(tmp_path, headers={"Authorization": "<redacted>", "X-Team": "infra"})

    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, [])

    assert str(raised.value).startswith(
        f"endpoint.headers.Authorization is redacted in {tmp_path}/.hydra/config.yaml, so it cannot be sent again; "
        "pass it as an override, for example 'endpoint.headers.Authorization=Bearer ${oc.env:TOKEN}'")
    config = load_config(tmp_path, ["endpoint.headers.Authorization=Bearer abc123"])
    assert config.endpoint.headers == {"Authorization": "Bearer abc123", "X-Team": "infra"}


def test_resume_api_key_replaces_authorization(tmp_path):
    from runner.resume import load_config

    write_archived_config(tmp_path, headers={"Authorization": "<redacted>"}, api_key_env="RUNNER_TEST_KEY")

    config = load_config(tmp_path, [])

    assert config.endpoint.api_key_env == "RUNNER_TEST_KEY"


def test_resume_rejects_redacted_url(tmp_path):
    from runner.errors import ConfigError
    from runner.resume import load_config

    write_archived_config(tmp_path, kind="openai", url="http://127.0.0.1:9/v1/chat/completions?api_key=<redacted>")

    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, [])

    assert str(raised.value) == (f"endpoint.url has a redacted credential in {tmp_path}/.hydra/config.yaml; "
                                 "pass the full URL again: endpoint.url=URL")
