"""Report speed: `python -m runner.report` over a sweep of 200 runs of 5,000 requests each.

The sweep is synthetic: each job folder contains a requests.csv of 5,000 rows (64 ITL samples
per request), a summary.csv of one load point and Hydra's override file, as a real job
writes them. The benchmark times the aggregation in a child process, as a user runs it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.common import REPO, RESULTS, machine_line
from runner.metrics import REQUEST_COLUMNS, summarize

ITL_SAMPLES = 64


def write_job(job_dir: Path, index: int, requests: int, rng: np.random.Generator) -> None:
    job_dir.mkdir(parents=True)
    parallel = 2 ** (index % 8)
    sent = np.sort(rng.uniform(0, 60, requests))
    ttft = rng.gamma(4.0, 0.02, requests)
    itl = rng.gamma(8.0, 0.002, (requests, ITL_SAMPLES))
    ended = sent + ttft + itl.sum(axis=1)
    frame = pd.DataFrame({
        "variable": "parallel", "value": parallel, "repeat": 0, "request_id": np.arange(requests),
        "warmup": False, "cooldown": False, "scheduled_at": sent, "dispatched_at": sent, "sent_at": sent,
        "first_token_at": sent + ttft, "ended_at": ended, "ttft": ttft, "latency": ended - sent,
        "tpot": itl.mean(axis=1), "prompt_tokens": 128, "expected_prompt_tokens": 128,
        "completion_tokens": ITL_SAMPLES + 1, "tokenizer_tokens": ITL_SAMPLES + 1, "max_tokens": ITL_SAMPLES + 1,
        "token_source": "usage", "finish_reason": "length", "success": True, "error": "", "status": 200,
        "itl": [" ".join(f"{x:.6f}" for x in row) for row in itl],
    })[REQUEST_COLUMNS]
    frame.to_csv(job_dir / "requests.csv", index=False, float_format="%.6f")
    in_memory = frame.assign(itl=list(itl))
    row = {"parallel": parallel, "rate": float("nan")} | summarize(in_memory, parallel=parallel)
    pd.DataFrame([row]).to_csv(job_dir / "summary.csv", index=False, float_format="%.6f")
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir()
    overrides = [f"model=m{index % 2}", f"load.parallel={parallel}"]
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": f"m{index % 2}"}}), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--requests", type=int, default=5000, help="requests per run")
    args = parser.parse_args(argv)

    header = machine_line()
    with tempfile.TemporaryDirectory(prefix="report-speed-") as work:
        sweep = Path(work)
        rng = np.random.default_rng(0)
        started = time.monotonic()
        for index in range(args.runs):
            write_job(sweep / str(index), index, args.requests, rng)
        written = time.monotonic() - started
        size = sum(path.stat().st_size for path in sweep.rglob("*.csv"))

        started = time.monotonic()
        completed = subprocess.run([sys.executable, "-m", "runner.report", str(sweep)], cwd=REPO,
                                   capture_output=True, text=True)
        seconds = time.monotonic() - started
    if completed.returncode != 0:
        print(completed.stderr, file=sys.stderr)
        return completed.returncode
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = pd.DataFrame([{"runs": args.runs, "requests_per_run": args.requests, "csv_megabytes": size / 1e6,
                            "report_seconds": seconds}])
    result.to_csv(RESULTS / "report_speed.csv", index=False, float_format="%.2f")
    print(f"# report speed ({header})")
    print(f"wrote {args.runs} synthetic runs ({size / 1e6:.0f} MB of CSV) in {written:.0f} s")
    print(f"python -m runner.report over them: {seconds:.2f} s (includes interpreter start-up and plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
