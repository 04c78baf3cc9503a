"""Memory benchmark: resident memory of one long load point, against the requests completed.

    python -m bench.memory                                   # 100,000 requests
    python -m bench.memory --baseline ../runner-main         # and an older checkout beside it

Runs ``python -m runner`` against the embedded simulated server (fast profile, closed loop,
64 prompt and 64 output tokens) for --requests measured requests. Every --interval seconds
it reads the runner's resident set size (VmRSS in /proc) and the rows in requests.csv so
far. With --baseline, the runner of that checkout runs at the same time, under the same
machine load. Writes bench/results/memory-100k.csv (variant, seconds, requests, rss_kib,
peak_kib) and prints the RSS at 10,000, 50,000 and 100,000 requests and the peak of the
whole run. The peak is VmHWM, the kernel's high-water mark of the resident set, so it also
catches a short rise between two samples (the summary, plots and report after the load).
Linux only, because it reads /proc. Each run stops by itself
after its requests, and is stopped after --timeout-minutes at the latest.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, RESULTS, machine_line

MARKS = (10_000, 50_000, 100_000)


def memory_kib(pid: int) -> tuple[int, int] | None:
    """Return the VmRSS and VmHWM of a process in KiB, or None once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if "VmRSS" not in fields or "VmHWM" not in fields:
        return None  # a zombie has no memory lines
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class Variant:
    """One runner process under watch, and the samples taken of it."""

    label: str
    checkout: Path
    process: subprocess.Popen
    requests_path: Path
    # (seconds since start, requests.csv rows so far, VmRSS in KiB, VmHWM in KiB)
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    rows: int = 0
    offset: int = 0
    ended_at: float | None = None

    def count_new_rows(self) -> int:
        """Count the rows appended to requests.csv since the last call (the header excluded)."""
        if not self.requests_path.exists():
            return self.rows
        with self.requests_path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        # A row being written has no newline yet; it is counted on the next call.
        complete = chunk.rfind(b"\n") + 1
        newlines = chunk.count(b"\n", 0, complete)
        if self.offset == 0 and newlines:
            newlines -= 1  # the header
        self.offset += complete
        self.rows += newlines
        return self.rows


def start(label: str, checkout: Path, folder: Path, requests: int, parallel: int, duration: float) -> Variant:
    """Start ``python -m runner`` of ``checkout`` (its own code, this interpreter's packages)."""
    run_dir = folder / label
    command = [sys.executable, "-m", "runner", f"hydra.run.dir={run_dir}", "progress=false",
               "model.sim_profile=fast", f"load.parallel={parallel}", f"load.number={requests}", "load.warmup=0",
               f"load.duration={duration}", "request.max_tokens=64", "dataset.min_prompt_length=64",
               "dataset.max_prompt_length=64", "dataset.num_prompts=256"]
    # `python -m` puts the working directory first on sys.path, so the checkout's runner is the one imported.
    process = subprocess.Popen(command, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return Variant(label, checkout, process, run_dir / "requests.csv")


def at_mark(samples: list[tuple[float, int, int, int]], mark: int) -> tuple[float, int, int, int] | None:
    """Return the first sample taken with at least ``mark`` requests done."""
    return next((sample for sample in samples if sample[1] >= mark), None)


def report(variant: Variant, requests: int) -> str:
    parts = []
    for mark in (mark for mark in MARKS if mark <= requests):
        sample = at_mark(variant.samples, mark)
        if sample is not None:
            parts.append(f"{mark:,} requests {sample[2] / 1024:.1f} MiB (at {sample[0]:.0f} s)")
    if variant.samples:
        parts.append(f"peak of the run {max(sample[3] for sample in variant.samples) / 1024:.1f} MiB")
    return f"{variant.label}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="measured requests of the load point")
    parser.add_argument("--parallel", type=int, default=16, help="requests in flight")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--baseline", type=Path, help="another checkout whose runner runs beside this one")
    parser.add_argument("--timeout-minutes", type=float, default=90.0, help="stop a run still going after this")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory-100k.csv", help="CSV of the samples")
    args = parser.parse_args(argv)

    timeout = args.timeout_minutes * 60
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="memory-") as name:
        folder = Path(name)
        variants = [start("current", REPO, folder, args.requests, args.parallel, timeout)]
        if args.baseline is not None:
            variants.append(start("baseline", args.baseline.resolve(), folder, args.requests, args.parallel, timeout))
        started = time.monotonic()
        while any(variant.ended_at is None for variant in variants):
            elapsed = time.monotonic() - started
            for variant in variants:
                if variant.ended_at is not None:
                    continue
                if variant.process.poll() is not None:
                    variant.ended_at = elapsed
                    continue
                if elapsed > timeout + 120:
                    variant.process.terminate()  # load.duration should have stopped it already
                memory = memory_kib(variant.process.pid)
                if memory is not None:
                    variant.samples.append((elapsed, variant.count_new_rows(), *memory))
            time.sleep(args.interval)
        failed = []
        for variant in variants:
            _, stderr = variant.process.communicate()
            variant.count_new_rows()
            if variant.process.returncode != 0:
                failed.append(f"{variant.label} runner failed with exit code {variant.process.returncode}: "
                              f"{stderr[-2000:]}")
    for message in failed:
        print(message, file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seconds", "requests", "rss_kib", "peak_kib"])
        for variant in variants:
            writer.writerows((variant.label, f"{t:.1f}", *sample) for t, *sample in variant.samples)
    print(machine_line())
    for variant in variants:
        print(f"{report(variant, args.requests)}; {variant.rows:,} rows in requests.csv; "
              f"ended at {variant.ended_at or 0:.0f} s ({variant.checkout})")
    print(f"samples written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
