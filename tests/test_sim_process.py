"""The simulated server as a child process: start, stop, start-up failures, command line."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import runner
from runner.errors import EndpointError
from runner.sim.process import start_sim

PACKAGE_ROOT = Path(runner.__file__).resolve().parent.parent
# Health and completion calls go straight to 127.0.0.1, never through a configured proxy.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie passes the kill(0) check, but its state letter Z in /proc shows it has exited.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with OPENER.open(request, timeout=10) as response:
        return json.load(response)


def test_start_sim_serves_and_stops(tmp_path):
    log_path = tmp_path / "sim.jsonl"
    with start_sim("fast", seed=1, model="sim-model", log_path=str(log_path)) as sim:
        pid = sim.pid
        assert sim.base_url.startswith("http://127.0.0.1:")
        with OPENER.open(f"{sim.base_url}/health", timeout=5) as response:
            assert response.status == 200
        body = post_json(f"{sim.base_url}/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 3})
        assert body["usage"]["completion_tokens"] == 3
    assert not process_exists(pid)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [record["completion_tokens"] for record in records] == [3]


def test_start_sim_stops_after_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with start_sim("fast") as sim:
            pid = sim.pid
            raise RuntimeError("inside the block")
    assert not process_exists(pid)


def test_explicit_stop_is_idempotent():
    sim = start_sim("fast")
    sim.stop()
    sim.stop()
    assert not sim.running()


def test_start_failure_reports_stderr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("step_base: 0.001\nwarp_speed: 9\n")
    with pytest.raises(EndpointError, match="unknown key warp_speed"):
        start_sim(str(bad), startup_timeout=60)


def test_command_line_bad_profile_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqs: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "runner.sim", "--port", "0", "--profile", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "max_num_seqs=0" in result.stderr


def test_child_exits_when_parent_dies():
    # The parent starts a server and exits without stopping it, as if it were killed.
    script = (
        "import os, sys\n"
        "from runner.sim.process import start_sim\n"
        "sim = start_sim('fast')\n"
        "print(sim.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=PACKAGE_ROOT
    )
    pid = int(result.stdout.strip())
    deadline = time.monotonic() + 10
    while process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_exists(pid)


def test_sim_child_out_of_terminal_group():
    # Ctrl-C goes to the terminal's foreground process group. The runner must receive it and
    # stop the server itself, so that the server cannot die first and fail the start-up.
    with start_sim("fast") as sim:
        assert os.getpgid(sim.pid) != os.getpgid(0)
        assert os.getsid(sim.pid) == sim.pid
