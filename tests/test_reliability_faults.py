"""Every injected fault becomes a failed request record with a one-line reason, and the run goes on.

The runner runs as a subprocess against the simulated server with a fault profile and a
1 s read timeout, so stalls and delayed headers are cut after about a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.paths import REPO

FAST_PROFILE = REPO / "runner" / "sim" / "profiles" / "fast.yaml"

# The reason each fault leaves in requests.csv's error column.
REASONS = {
    "rate_limited": r"^HTTP 429: rate limit reached for requests; retry later$",
    "unavailable": r"^HTTP 503: the server is overloaded; retry later \(Retry-After: 1\)$",
    "reset_mid_stream": r"^stream ended without a terminal event: connection reset or closed \(\w+\)$",
    "stalled": r"^timed out: no data for 1 s \(endpoint\.read_timeout\)$",
    "malformed_chunk": r"^invalid JSON in stream event: ",
    "no_terminal_event": r"^stream ended without a terminal event$",
    "non_sse_body": r"^HTTP 200 with content type text/html, expected text/event-stream for a streamed request: ",
    "headers_delayed": r"^timed out: no data for 1 s \(endpoint\.read_timeout\)$",
}
# Short requests and timeouts so a run of 40 requests takes a few seconds.
FAST_RUN = ["progress=false", "load.parallel=8", "load.number=40", "load.warmup=0", "request.max_tokens=16",
            "dataset.min_prompt_length=16", "dataset.max_prompt_length=16", "endpoint.read_timeout=1",
            "endpoint.connect_timeout=2"]


def run_cli(out_dir: Path, *overrides: str, timeout: float = 120, env: dict | None = None):
    command = [sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def fault_profile(tmp_path: Path, rates: dict[str, float]) -> Path:
    profile = yaml.safe_load(FAST_PROFILE.read_text(encoding="utf-8"))
    profile["faults"].update(rates)
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(profile), encoding="utf-8")
    return path


def measured(out_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(out_dir / "requests.csv", dtype={"error": str}, keep_default_na=False)
    left_out = frame["warmup"].astype(str).eq("True") | frame["cooldown"].astype(str).eq("True")
    return frame[~left_out]


def summary_success_rate(out_dir: Path) -> float:
    return float(pd.read_csv(out_dir / "summary.csv")["success_rate"].iloc[0])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", sorted(REASONS))
def test_fault_alone_is_recorded(tmp_path, fault):
    profile = fault_profile(tmp_path, {fault: 0.3})
    out_dir = tmp_path / "run"

    done = run_cli(out_dir, *FAST_RUN, f"model.sim_profile={profile}")

    assert done.returncode == 0, done.stderr
    rows = measured(out_dir)
    assert len(rows) == 40
    failed = rows[rows["success"].astype(str) != "True"]
    assert len(failed) > 0
    for error in failed["error"]:
        assert re.search(REASONS[fault], error), error
        assert "\n" not in error
    successes = len(rows) - len(failed)
    assert summary_success_rate(out_dir) == pytest.approx(100.0 * successes / len(rows), abs=1e-6)


@pytest.mark.timeout(120)
def test_mixed_faults_at_twenty_percent(tmp_path):
    out_dir = tmp_path / "run"

    done = run_cli(out_dir, *FAST_RUN, "load.number=200", "model.sim_profile=faults-mixed")

    assert done.returncode == 0, done.stderr
    rows = measured(out_dir)
    assert len(rows) == 200
    failed = rows[rows["success"].astype(str) != "True"]
    kinds = set()
    for error in failed["error"]:
        matching = [fault for fault, pattern in REASONS.items() if re.search(pattern, error)]
        assert matching, error
        kinds.add(REASONS[matching[0]])
    assert len(kinds) >= 4
    assert 0 < len(failed) < 100
    successes = len(rows) - len(failed)
    assert summary_success_rate(out_dir) == pytest.approx(100.0 * successes / len(rows), abs=1e-6)


@pytest.mark.timeout(120)
def test_sla_probe_with_faults_fails(tmp_path):
    profile = fault_profile(tmp_path, {"rate_limited": 0.1})
    out_dir = tmp_path / "run"

    done = run_cli(out_dir, *FAST_RUN, f"model.sim_profile={profile}", "+sla=custom",
                   "sla.rules=[{p99_ttft:\"<=10\"}]", "load.parallel=2", "search.upper_bound=2",
                   "search.num_runs=1", "search.min_requests=20", "search.max_extra_runs=0")

    assert done.returncode == 0, done.stderr
    sla = pd.read_csv(out_dir / "sla_summary.csv")
    assert sla["max_satisfied"].isna().all()
    assert sla["note"].iloc[0] == "failed at lower bound"
