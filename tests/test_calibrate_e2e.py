"""Client self-calibration through the command line: manifest, client-bound flags, SLA answers, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from paths import REPO
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline

# Every request: first token after 20 ms, then 4 tokens 5 ms apart.
FAST = Reply(writes=token_timeline(ttft=0.02, tokens=4, gap=0.005))
SMALL = ["progress=false", "load.warmup=0", "request.max_tokens=4", "dataset.min_prompt_length=8",
         "dataset.max_prompt_length=8", "endpoint=openai"]
# A fraction this small puts every load point above it, so each one must be flagged.
TINY_FRACTION = "load.max_ceiling_fraction=0.000001"


def run_cli(out_dir: Path, base_url: str, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", *SMALL,
               f"endpoint.url={base_url}/v1/chat/completions", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


@pytest.mark.timeout(180)
async def test_calibrated_run_flags_point_above_ceiling(tmp_path):
    async with ScriptedServerProcess(FAST) as server:
        done = await asyncio.to_thread(run_cli, tmp_path, server.base_url, "load.parallel=2", "load.number=20",
                                       "load.calibrate=true", "load.calibrate_seconds=0.3", TINY_FRACTION)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "client ceiling for this request shape: ~" in done.stdout + done.stderr

    calibration = read_manifest(tmp_path)["calibration"]
    assert calibration["status"] == "measured"
    assert calibration["rps"] > 0
    assert calibration["parallel"] == 2
    assert calibration["seconds"] == 0.3
    assert calibration["request_fields"] == ["ignore_eos", "max_tokens", "messages", "model", "stream",
                                             "stream_options", "temperature"]
    assert calibration["server"]["max_tokens"] == {"4": calibration["requests_ended"]}
    # The calibration's requests went to the null server only: the scripted server saw the
    # preflight request, the 20 measured ones and at most the cooldown requests in requests.csv.
    rows = len(pd.read_csv(tmp_path / "requests.csv"))
    assert 21 <= len(server.state.requests) <= 1 + rows

    row = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert bool(row["client_bound"]) is True
    assert row["client_note"].endswith("above load.max_ceiling_fraction=1e-06")
    assert f"{row['rps']:.4g} req/s is " in row["client_note"]
    assert "of the client's calibrated ceiling of" in row["client_note"]


@pytest.mark.timeout(180)
async def test_small_run_skips_calibration(tmp_path):
    async with ScriptedServerProcess(FAST) as server:
        done = await asyncio.to_thread(run_cli, tmp_path, server.base_url, "load.parallel=2", "load.number=20",
                                       TINY_FRACTION)
    assert done.returncode == 0, done.stderr[-2000:]

    assert read_manifest(tmp_path)["calibration"] == {
        "status": "skipped",
        "reason": "load.calibrate=auto skips plain runs of fewer than load.calibrate_min_requests=1000 requests "
                  "(this one has 20)",
    }
    row = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert "calibrated ceiling" not in str(row["client_note"])
    if sys.platform == "linux":
        assert read_manifest(tmp_path)["arrival_clock"] == "kernel"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sla_answer_names_client_ceiling(tmp_path):
    tune = ["+sla=custom", 'sla.rules=[{p99_ttft:"<=1"}]', "search.variable=rate", "load.rate=40",
            "search.lower_bound=20", "search.upper_bound=80", "search.num_runs=1", "search.min_requests=20",
            "search.rate_repeat_seconds=0.5", "search.max_requests=20", "load.calibrate_seconds=0.3", TINY_FRACTION]
    async with ScriptedServerProcess(FAST) as server:
        done = await asyncio.to_thread(run_cli, tmp_path, server.base_url, *tune)
    assert done.returncode == 0, done.stderr[-2000:]

    # An SLA tune calibrates under load.calibrate=auto.
    assert read_manifest(tmp_path)["calibration"]["status"] == "measured"
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["rate"]) == [20.0, 40.0]
    assert summary["client_bound"].astype(bool).all()
    # Both probes were client-bound, so the search has no server verdict: the answer says so.
    answer = pd.read_csv(tmp_path / "sla_summary.csv").iloc[0]
    assert pd.isna(answer["max_satisfied"])
    assert answer["note"].startswith("client-bound at 20: 20 req/s is ")
    assert "of the client's calibrated ceiling of" in answer["note"]


def null_server_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    found = []
    for child in (int(item) for item in path.read_text().split()) if path.exists() else []:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"runner.nullserver" in command:
            found.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
async def test_signal_during_calibration_stops_null_server(tmp_path):
    async with ScriptedServerProcess(FAST) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path}", *SMALL,
             f"endpoint.url={server.base_url}/v1/chat/completions", "load.calibrate=true",
             "load.calibrate_seconds=60", "load.number=20"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 90
            children: list[int] = []
            while not children and time.monotonic() < deadline:
                assert process.poll() is None, process.communicate()
                children = null_server_children(process.pid)
                await asyncio.sleep(0.1)
            assert children, "the null server child was not found"
            await asyncio.sleep(0.5)  # into the calibration load
            process.send_signal(signal.SIGINT)
            _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    for pid in children:
        assert not alive(pid)
    # Nothing was measured: the scripted server saw only the preflight request.
    assert len(server.state.requests) == 1
    assert read_manifest(tmp_path)["calibration"] is None
