"""Synthetic run and sweep folders for the report tests (helpers only, no tests).

Summary values follow simple formulas of the load value, so tests can state exact numbers:
rps = 0.9 * load, tps = 50 * load, p99_latency = base + 0.1 * load, p99_ttft = 0.01 * load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import yaml
from omegaconf import OmegaConf

from runner.client.record import RequestRecord
from runner.metrics import SUMMARY_COLUMNS
from runner.output import RequestsWriter, record_row, write_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parent.parent


def summary_row(load: float, *, variable: str = "parallel", base: float = 1.0, tpot: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {column: math.nan for column in SUMMARY_COLUMNS}
    row |= {
        "parallel": load if variable == "parallel" else 64,
        "rate": load if variable == "rate" else math.nan,
        "requests": 100, "success_rate": 100.0,
        "rps": 0.9 * load, "tps": 50.0 * load, "total_tps": 150.0 * load, "goodput": 0.9 * load,
        "runs": 1, "warmup": 4, "failures": 0, "empty_outputs": 0, "duration": 10.0,
        "client_bound": False, "client_note": "",
    }
    for stat, factor in (("avg", 0.5), ("p50", 0.5), ("p90", 0.9), ("p99", 1.0)):
        row[f"{stat}_latency"] = factor * (base + 0.1 * load)
        row[f"{stat}_ttft"] = factor * 0.01 * load
        row[f"{stat}_tpot"] = factor * 0.001 * load if tpot else math.nan
        row[f"{stat}_itl"] = factor * 0.001 * load if tpot else math.nan
    return row


def write_hydra(run_dir: Path, overrides: Sequence[str], config: Optional[dict[str, Any]] = None) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    composed = {"model": {"name": "qwen2.5-7b"}, "load": {"parallel": 4, "rate": None}} | (config or {})
    OmegaConf.save(OmegaConf.create(composed), hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)), encoding="utf-8")


def make_run(
    run_dir: Path,
    *,
    loads: Sequence[float] = (1, 2, 4, 8),
    overrides: Sequence[str] = (),
    config: Optional[dict[str, Any]] = None,
    variable: str = "parallel",
    base: float = 1.0,
    tpot: bool = True,
    sla_rows: Optional[list[dict[str, Any]]] = None,
) -> Path:
    """Write a finished run folder: .hydra, summary.csv and, with ``sla_rows``, sla_summary.csv."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_hydra(run_dir, overrides, config)
    write_summary([summary_row(v, variable=variable, base=base, tpot=tpot) for v in loads], run_dir / "summary.csv")
    if sla_rows is not None:
        columns = ["criteria", "variable", "max_satisfied", "note", "probes", "seconds", "last_pass", "first_fail"]
        pd.DataFrame(sla_rows, columns=columns).to_csv(run_dir / "sla_summary.csv", index=False)
    (run_dir / "performance_summary.txt").write_text("Detailed Performance Metrics\n", encoding="utf-8")
    return run_dir


def sla_row(criteria: str, max_satisfied: Optional[float], variable: str = "parallel") -> dict[str, Any]:
    return {
        "criteria": criteria, "variable": variable, "max_satisfied": max_satisfied,
        "note": "" if max_satisfied is not None else "no load met the rules",
        "probes": 6, "seconds": 12.5,
        "last_pass": max_satisfied, "first_fail": None if max_satisfied is None else max_satisfied + 1,
    }


def make_failed_job(job_dir: Path, overrides: Sequence[str], error: Optional[str]) -> Path:
    write_hydra(job_dir, overrides)
    if error is not None:
        (job_dir / "error.txt").write_text(error, encoding="utf-8")
    return job_dir


def write_requests(run_dir: Path, points: dict[float, list[tuple[float, float, int]]], variable: str = "parallel") -> Path:
    """Write requests.csv with the real writer; each request is (sent, ended, completion tokens).

    Every request succeeds, its first token arrives 0.1 s after sending, and one warmup
    request per load point (sent at 0, ended at 100) must be left out of every statistic.
    """
    path = run_dir / "requests.csv"
    request_id = 0
    with RequestsWriter(path) as writer:
        for value, requests in points.items():
            for warmup, (sent, ended, tokens) in [(True, (0.0, 100.0, 5))] + [(False, r) for r in requests]:
                record = RequestRecord(request_id=request_id, warmup=warmup, scheduled_at=sent, sent_at=sent,
                                       first_token_at=sent + 0.1, last_token_at=ended, ended_at=ended, status=200,
                                       prompt_tokens=10, completion_tokens=tokens, token_source="usage",
                                       finish_reason="stop", success=True)
                writer.add(record_row(record, [0.05] * (tokens - 1), origin=0.0, variable=variable, value=value,
                                      repeat=0))
                request_id += 1
    return path


def is_png(path: Path, min_bytes: int = 5000) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) >= min_bytes
