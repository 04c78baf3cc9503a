"""Benchmark scripts write files the product reads, so their columns follow the product's."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report_speed import write_job
from runner.metrics import REQUEST_COLUMNS


def test_report_speed_job_has_request_columns(tmp_path):
    write_job(tmp_path / "0", 0, 50, np.random.default_rng(0))

    frame = pd.read_csv(tmp_path / "0" / "requests.csv")

    assert list(frame.columns) == REQUEST_COLUMNS
    assert len(frame) == 50
    assert (tmp_path / "0" / "summary.csv").is_file()
