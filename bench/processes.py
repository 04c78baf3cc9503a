"""Run one load-testing tool as a bounded child process and account for the CPU it and others used.

A tool's CPU time is the user + system time of its whole process tree. `os.wait4` on the
tool returns its own time plus that of every descendant it waited for. This process is
also made a child subreaper (Linux `prctl(PR_SET_CHILD_SUBREAPER)`), so descendants the
tool left behind are re-parented here, killed and waited for, and their time is added.
Processes that were already children before the tool started (the servers) are measured
from /proc over the same window. The machine's busy time comes from /proc/stat; what
remains after the tool, the servers and this process is the CPU that other work on the
machine used during the run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.02
# Before a launch, wait up to IDLE_WAIT seconds for the machine's busy CPU, measured over
# one-second windows, to fall below IDLE_CORES cores.
IDLE_WAIT = 5.0
IDLE_CORES = 0.3
# Seconds a tool gets to exit after SIGTERM before it is killed.
TERM_GRACE = 5.0


def become_subreaper() -> None:
    """Make orphaned descendants re-parent to this process (Linux only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def machine_busy_seconds() -> float:
    """Return CPU seconds all cores spent outside idle and iowait since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields]
    # user nice system idle iowait irq softirq steal (guest time is already inside user).
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of a live process and its waited-for children (0 if gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the parenthesised command name; utime, stime, cutime, cstime are 14-17.
    after = text.rsplit(")", 1)[1].split()
    return sum(int(value) for value in after[11:15]) / CLOCK_TICKS


def child_pids() -> set[int]:
    """Return the pids whose parent is this process."""
    me = os.getpid()
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            after = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(after[1]) == me:
            children.add(int(entry.name))
    return children


def wait_for_idle(max_wait: float = IDLE_WAIT, idle_cores: float = IDLE_CORES) -> float:
    """Wait until the machine is nearly idle or `max_wait` seconds pass; return the last busy level in cores."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy < idle_cores or time.monotonic() >= deadline:
            return busy


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class ToolRun:
    """Measurements of one tool run; CPU in seconds, times in perf_counter seconds."""

    command: list[str]
    exit_code: int
    timed_out: bool
    # 1-minute load average right before the launch.
    load_before: float
    # Cores busy in the last second before the launch, after waiting for the machine to idle.
    busy_before: float
    launched_at: float
    wall_seconds: float
    tool_cpu: float
    # CPU of the processes that were children before the launch (the servers) during the run.
    server_cpu: float
    # Machine busy CPU during the run minus the tool, the servers and this process.
    other_cpu: float
    log_path: Path

    def log_tail(self, characters: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


def _reap(pid: int) -> float:
    """Wait for one child and return its CPU seconds including the descendants it waited for."""
    try:
        _, _, usage = os.wait4(pid, 0)
    except ChildProcessError:
        return 0.0
    return usage.ru_utime + usage.ru_stime


def _kill_leftovers(known: set[int]) -> float:
    """Kill and reap children that are not in `known` (orphans re-parented here); return their CPU."""
    cpu = 0.0
    for _ in range(20):
        strays = child_pids() - known
        if not strays:
            break
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            cpu += _reap(pid)
    return cpu


def run_tool(command: list[str], *, env: dict[str, str], cwd: Path, timeout: float, log_path: Path) -> ToolRun:
    """Run `command` to its end (or kill it after `timeout` seconds) and measure its CPU."""
    servers = child_pids()
    busy_before = wait_for_idle()
    load_before = os.getloadavg()[0]
    machine_before = machine_busy_seconds()
    servers_before = sum(process_cpu_seconds(pid) for pid in servers)
    own_before = _own_cpu_seconds()

    launched_at = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)

    timed_out = False
    status: Optional[int] = None
    tool_cpu = 0.0
    deadline = launched_at + timeout
    while status is None:
        pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(wait_status)
            tool_cpu += usage.ru_utime + usage.ru_stime
            break
        if time.perf_counter() > deadline and not timed_out:
            timed_out = True
            _signal_group(process.pid, signal.SIGTERM)
            deadline = time.perf_counter() + TERM_GRACE
        elif timed_out and time.perf_counter() > deadline:
            _signal_group(process.pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(POLL_SECONDS)
    # Popen must not wait for the pid again: it was reaped above.
    process.returncode = status
    wall = time.perf_counter() - launched_at

    _signal_group(process.pid, signal.SIGKILL)
    tool_cpu += _kill_leftovers(servers)
    server_cpu = sum(process_cpu_seconds(pid) for pid in servers) - servers_before
    own_cpu = _own_cpu_seconds() - own_before
    busy = machine_busy_seconds() - machine_before
    other = busy - tool_cpu - server_cpu - own_cpu
    return ToolRun(command, status, timed_out, load_before, busy_before, launched_at, wall, tool_cpu, server_cpu,
                   max(other, 0.0), log_path)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
