"""Shared pieces of the benchmark scripts: machine facts and running the runner."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.servers import pin_to

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def machine_line() -> str:
    """Return date, CPU model, core count and the 1-minute load average, for result headers."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{today}; {model}; {os.cpu_count()} cores; load average {load:.2f}; Python {platform.python_version()}"


def run_runner(out_dir: Path, *overrides: str, timeout: float = 1800,
               cpus: Optional[set[int]] = None) -> subprocess.CompletedProcess:
    """Run ``python -m runner`` into ``out_dir`` with the given overrides; raise if it fails.

    ``cpus`` restricts the runner and its children to those CPUs (None: any).
    """
    command = [sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", "progress=false", *overrides]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=pin_to(cpus))
    if completed.returncode != 0:
        raise RuntimeError(f"runner failed ({completed.returncode}): {' '.join(command)}\n{completed.stderr[-2000:]}")
    return completed


def read_summary(out_dir: Path) -> pd.DataFrame:
    return pd.read_csv(out_dir / "summary.csv")


class LoadSampler:
    """Context manager that samples the 1-minute load average every ``period`` seconds in a thread.

    A long measurement records the mean and maximum over its whole duration, not just the
    values at its ends.
    """

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                self.samples.append(os.getloadavg()[0])
                return

    @property
    def mean(self) -> float:
        return round(sum(self.samples) / len(self.samples), 2)

    @property
    def max(self) -> float:
        return round(max(self.samples), 2)


def parse_range(text: str, integer: bool = False) -> list[float]:
    """Parse ``1,2,5`` or ``lo:hi`` (step 1) or ``lo:hi:step``, ranges inclusive."""
    values: list[float] = []
    for item in text.split(","):
        parts = [float(part) for part in item.split(":")]
        if len(parts) == 1:
            values.append(parts[0])
            continue
        low, high = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else 1.0
        if step <= 0 or high < low:
            raise SystemExit(f"error: invalid range {item!r}; write lo:hi or lo:hi:step with lo <= hi and step > 0")
        count = int(math.floor((high - low) / step + 1e-9))
        values.extend(round(low + i * step, 6) for i in range(count + 1))
    if integer:
        return [int(value) for value in values]
    return values
