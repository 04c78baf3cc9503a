"""Soak benchmark: the runner at steady load for --minutes, with its memory sampled every 10 s.

    python -m bench.soak --minutes 30

Runs ``python -m runner`` against the embedded simulated server (fast profile, closed
loop) with load.duration set to the soak length, reads the runner's resident set size
(VmRSS in /proc) every --interval seconds, writes bench/results/soak.csv and prints the
first and last samples. Linux only, because it reads /proc.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, RESULTS, machine_line

# Requests far beyond what the duration allows, so load.duration is what ends the run.
UNBOUNDED_REQUESTS = 100_000_000


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length in minutes")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--parallel", type=int, default=16, help="requests in flight")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.csv", help="CSV of the samples")
    args = parser.parse_args(argv)

    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        command = [sys.executable, "-m", "runner", f"hydra.run.dir={folder}/run", "progress=false",
                   "model.sim_profile=fast", f"load.parallel={args.parallel}", f"load.number={UNBOUNDED_REQUESTS}",
                   "load.warmup=0", f"load.duration={seconds}", "request.max_tokens=64",
                   "dataset.min_prompt_length=64", "dataset.max_prompt_length=64", "dataset.num_prompts=256"]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        samples: list[tuple[float, int]] = []
        requests_path = Path(folder) / "run" / "requests.csv"
        while process.poll() is None:
            rss = rss_kib(process.pid)
            if rss is not None:
                samples.append((time.monotonic() - started, rss))
            time.sleep(args.interval)
        _, stderr = process.communicate()
        rows = max(len(requests_path.read_text().splitlines()) - 1, 0) if requests_path.exists() else 0
    if process.returncode != 0:
        print(f"runner failed with exit code {process.returncode}: {stderr[-2000:]}", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_kib"])
        writer.writerows((f"{t:.1f}", rss) for t, rss in samples)
    print(machine_line())
    print(f"requests: {rows} in {args.minutes:g} min at parallel {args.parallel}")
    if samples:
        # The first sample is taken during start-up, so the one after the load began is the baseline.
        baseline = samples[min(2, len(samples) - 1)]
        print(f"RSS start {samples[0][1] / 1024:.1f} MiB, at {baseline[0]:.0f} s {baseline[1] / 1024:.1f} MiB, "
              f"end {samples[-1][1] / 1024:.1f} MiB ({len(samples)} samples, written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
