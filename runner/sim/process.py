"""The simulated server as a child process, started and stopped by the runner or by tests."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Optional

import runner
from runner.errors import EndpointError
from runner.sim.server import DEFAULT_MODEL

logger = logging.getLogger(__name__)

_LISTENING = re.compile(r"listening on (http://\S+)")
# Seconds a child gets to exit after SIGTERM before it is killed.
STOP_GRACE = 5.0
# Last stderr lines quoted when the child fails to start.
ERROR_TAIL_LINES = 8


class SimProcess:
    """A running ``python -m runner.sim`` child; a context manager that stops it on exit."""

    def __init__(self, process: subprocess.Popen, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.process = process
        self.base_url = ""
        self._stdout = stdout
        self._stderr = stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL after STOP_GRACE seconds; safe to call more than once."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                logger.warning("simulated server pid %s ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
            logger.info("simulated server pid %s stopped with exit code %s", process.pid, process.returncode)
        if process.stdin is not None and not process.stdin.closed:
            process.stdin.close()
        for stream in (self._stdout, self._stderr):
            stream.close()

    def stderr_tail(self, lines: int = ERROR_TAIL_LINES) -> str:
        self._stderr.flush()
        text = Path(self._stderr.name).read_text(encoding="utf-8", errors="replace")
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def _read_url(self) -> Optional[str]:
        text = Path(self._stdout.name).read_text(encoding="utf-8", errors="replace")
        match = _LISTENING.search(text)
        return match.group(1) if match else None


def start_sim(
    profile: str = "default",
    *,
    seed: int = 0,
    tokenizer: Optional[str] = None,
    model: str = DEFAULT_MODEL,
    log_path: Optional[str] = None,
    startup_timeout: float = 30,
) -> SimProcess:
    """Start the simulated server on a free 127.0.0.1 port and wait until /health returns 200.

    Raises EndpointError with the child's last stderr lines when the child exits during start-up
    or is not healthy within ``startup_timeout`` seconds. The child is stopped in both cases.
    """
    command = [sys.executable, "-m", "runner.sim", "--port", "0", "--host", "127.0.0.1"]
    command += ["--profile", profile, "--seed", str(seed), "--model", model, "--stop-on-stdin-close"]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    if log_path:
        command += ["--log", str(log_path)]
    env = dict(os.environ)
    # The child must import this same runner package even when it is not installed.
    package_root = str(Path(runner.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    stdout = tempfile.NamedTemporaryFile(prefix="sim-stdout-", suffix=".txt")
    stderr = tempfile.NamedTemporaryFile(prefix="sim-stderr-", suffix=".txt")
    # The child exits when its stdin pipe closes, which also happens when this process is killed.
    # It runs in its own session, so Ctrl-C at the terminal reaches only this process, which
    # stops the child itself. Otherwise a Ctrl-C during start-up killed the child first, and
    # the run reported a failed start-up instead of the interrupt.
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env=env,
                               start_new_session=True)
    sim = SimProcess(process, stdout, stderr)
    try:
        _wait_until_ready(sim, startup_timeout)
    except BaseException:
        sim.stop()
        raise
    logger.info("simulated server pid %s (profile %s) listening on %s", process.pid, profile, sim.base_url)
    return sim


def _wait_until_ready(sim: SimProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not sim.running():
            raise EndpointError(
                f"simulated server exited with code {sim.process.returncode} during start-up: {sim.stderr_tail()}"
            )
        if not sim.base_url:
            sim.base_url = sim._read_url() or ""
        if sim.base_url and _healthy(sim.base_url):
            return
        if time.monotonic() > deadline:
            raise EndpointError(
                f"simulated server did not become healthy within {timeout} s; raise startup_timeout "
                f"or check its output: {sim.stderr_tail()}"
            )
        time.sleep(0.05)


# No proxy handler: the health check must reach 127.0.0.1 even when HTTP_PROXY is set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(base_url: str) -> bool:
    try:
        with _OPENER.open(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
