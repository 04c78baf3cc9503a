"""Sweep aggregation: stacked CSVs with override columns, comparison tables, failed jobs."""

import json
import math
import time

import pandas as pd
import pytest

from runner.metrics import REQUEST_COLUMNS
from runner.report import aggregate, build_report
from runner.report.aggregate import combine_runs, load_run
from runner.report.folders import RunFolder, find_layout, parse_overrides
from runner.report.tables import best_points, markdown_table, sla_comparison
from test_report_synthetic import make_failed_job, make_run, sla_row, write_hydra, write_requests

MODELS = ("qwen2.5-7b", "qwen2.5-0.5b")
SLA_SETS = {"ttft_strict": "p99_ttft <= 0.05", "tps_max": "tps -> max"}
# max_satisfied of each (model, sla set); None means no load met the rules.
ANSWERS = {
    ("qwen2.5-7b", "ttft_strict"): 4.0,
    ("qwen2.5-7b", "tps_max"): 8.0,
    ("qwen2.5-0.5b", "ttft_strict"): None,
    ("qwen2.5-0.5b", "tps_max"): 16.0,
}


@pytest.fixture
def sweep(tmp_path):
    """A 2 models x 2 SLA sets sweep plus a fifth job that failed."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n", encoding="utf-8")
    job = 0
    for model in MODELS:
        for sla, criteria in SLA_SETS.items():
            make_run(root / str(job), loads=(1, 2, 4, 8, 16)[: 3 + job % 3],
                     overrides=[f"model={model}", f"+sla={sla}", "load.parallel=8"],
                     sla_rows=[sla_row(criteria, ANSWERS[model, sla])])
            job += 1
    make_failed_job(root / "4", ["model=broken", "+sla=ttft_strict", "load.parallel=8"],
                    "EndpointError: connection refused at 127.0.0.1:9\nTraceback line two")
    return root


def test_parse_overrides_keys_and_values():
    parsed = parse_overrides([
        "model=qwen2.5-7b", "+sla=ttft_strict", "load.parallel=8", "++request.stream=false",
        "~dataset.path", 'sla.rules=[{p99_ttft:"<=0.05"}]',
    ])
    assert parsed == {
        "model": "qwen2.5-7b", "sla": "ttft_strict", "load.parallel": "8", "request.stream": "false",
        "dataset.path": "", "sla.rules": '[{p99_ttft:"<=0.05"}]',
    }


def test_layout_numbered_jobs_in_order(tmp_path):
    for job in ("10", "2", "0", "extra"):
        make_run(tmp_path / job, loads=(1,))
    layout = find_layout(tmp_path)
    assert layout.kind == "sweep"
    assert [run.name for run in layout.runs] == ["0", "2", "10", "extra"]


def test_layout_sweep_with_old_top_summary(sweep):
    build_report(sweep, run_plots=False)
    assert (sweep / "summary.csv").is_file()
    assert find_layout(sweep).kind == "sweep"


def test_summary_csv_has_every_job_row(sweep):
    written = build_report(sweep, run_plots=False)
    assert sweep / "summary.csv" in written
    summary = pd.read_csv(sweep / "summary.csv", dtype={"job": str, "model": str, "sla": str, "load.parallel": str})
    assert list(summary.columns[:4]) == ["job", "model", "sla", "load.parallel"]
    assert summary["job"].tolist() == ["0"] * 3 + ["1"] * 4 + ["2"] * 5 + ["3"] * 3
    assert summary.groupby("job")["model"].first().to_dict() == {
        "0": "qwen2.5-7b", "1": "qwen2.5-7b", "2": "qwen2.5-0.5b", "3": "qwen2.5-0.5b"}
    assert summary.groupby("job")["sla"].first().to_dict() == {
        "0": "ttft_strict", "1": "tps_max", "2": "ttft_strict", "3": "tps_max"}
    assert set(summary["load.parallel"]) == {"8"}
    job2 = summary[summary["job"] == "2"]
    assert job2["parallel"].tolist() == [1, 2, 4, 8, 16]
    assert job2["tps"].tolist() == [50.0, 100.0, 200.0, 400.0, 800.0]
    assert job2["p99_latency"].tolist() == pytest.approx([1.1, 1.2, 1.4, 1.8, 2.6])


def test_sla_summary_csv_has_every_job_row(sweep):
    build_report(sweep, run_plots=False)
    sla = pd.read_csv(sweep / "sla_summary.csv", dtype={"job": str})
    assert sla["job"].tolist() == ["0", "1", "2", "3"]
    assert sla["model"].tolist() == [m for m in MODELS for _ in SLA_SETS]
    assert sla["sla"].tolist() == list(SLA_SETS) * 2
    assert sla["criteria"].tolist() == list(SLA_SETS.values()) * 2
    assert sla["max_satisfied"].iloc[[0, 1, 3]].tolist() == [4.0, 8.0, 16.0]
    assert math.isnan(sla["max_satisfied"].iloc[2])


def test_comparison_model_by_sla_set(sweep):
    results = [load_run(run) for run in find_layout(sweep).runs]
    tables = combine_runs(results)
    table = sla_comparison(tables.sla, tables.override_columns)
    assert list(table.columns) == ["model", "ttft_strict", "tps_max"]
    rows = table.set_index("model").to_dict("index")
    assert rows["qwen2.5-7b"] == {"ttft_strict": 4.0, "tps_max": 8.0}
    assert rows["qwen2.5-0.5b"] == {"ttft_strict": "none", "tps_max": 16.0}


def test_comparison_marks_pairs_not_run():
    sla = pd.DataFrame({
        "job": ["0", "1", "2"], "model": ["a", "a", "b"], "sla": ["x", "y", "x"],
        "criteria": ["p99_ttft <= 0.05", "tps -> max", "p99_ttft <= 0.05"],
        "variable": ["parallel"] * 3, "max_satisfied": [2.0, 8.0, 4.0],
    })
    table = sla_comparison(sla, {"model": "model", "sla": "sla"}).set_index("model")
    assert table.loc["b", "x"] == 4.0
    assert pd.isna(table.loc["b", "y"])


def test_comparison_several_groups_per_set():
    sla = pd.DataFrame({
        "job": ["0", "0"], "model": ["a", "a"], "sla": ["mixed", "mixed"],
        "criteria": ["p99_latency <= 2", "tps -> max"], "variable": ["rate"] * 2, "max_satisfied": [3.5, 6.0],
    })
    table = sla_comparison(sla, {"model": "model", "sla": "sla"})
    assert list(table.columns) == ["runs", "mixed: p99_latency <= 2", "mixed: tps -> max"]
    assert table.iloc[0].tolist() == ["all", 3.5, 6.0]


def test_best_points_pick_highest_tps(sweep):
    tables = combine_runs([load_run(run) for run in find_layout(sweep).runs])
    best = best_points(tables.summary, tables.override_columns)
    assert best["job"].tolist() == ["0", "1", "2", "3"]
    assert best["parallel"].tolist() == [4, 8, 16, 4]
    assert best["tps"].tolist() == [200.0, 400.0, 800.0, 200.0]


def test_failed_job_listed_and_skipped(sweep):
    build_report(sweep, run_plots=False)
    summary = pd.read_csv(sweep / "summary.csv", dtype={"job": str})
    assert "4" not in set(summary["job"])
    markdown = (sweep / "summary.md").read_text(encoding="utf-8")
    assert "| 4 | broken | ttft_strict | failed | 0 | 0 | EndpointError: connection refused at 127.0.0.1:9 |" in markdown
    assert "- job 4: EndpointError: connection refused at 127.0.0.1:9" in markdown
    assert "5 jobs: 4 with results, 1 failed." in markdown


def test_shared_overrides_listed_once(sweep):
    build_report(sweep, run_plots=False)
    markdown = (sweep / "summary.md").read_text(encoding="utf-8")
    assert "Overrides shared by every job: `load.parallel=8`" in markdown
    assert "| job | model | sla | status | load points | SLA groups | error |" in markdown
    summary = pd.read_csv(sweep / "summary.csv")
    assert "load.parallel" in summary.columns


def test_failed_job_without_error_file(tmp_path):
    make_run(tmp_path / "0", loads=(1, 2))
    make_failed_job(tmp_path / "1", ["model=x"], error=None)
    build_report(tmp_path, run_plots=False)
    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "- job 1: no summary.csv: the job did not finish" in markdown


def test_summary_markdown_tables(sweep):
    build_report(sweep, run_plots=False)
    markdown = (sweep / "summary.md").read_text(encoding="utf-8")
    assert "| model | ttft_strict | tps_max |" in markdown
    assert "| qwen2.5-7b | 4 | 8 |" in markdown
    assert "| qwen2.5-0.5b | none | 16 |" in markdown


def test_markdown_table_escapes_cells():
    frame = pd.DataFrame({"name": ["a|b", "<b>", "two\nlines"], "value": [1.0, 0.123456, math.nan]})
    assert markdown_table(frame).splitlines() == [
        "| name | value |",
        "| --- | ---: |",
        "| a\\|b | 1 |",
        "| \\<b\\> | 0.1235 |",
        "| two lines |  |",
    ]


def test_override_clashing_with_column(tmp_path):
    make_run(tmp_path / "0", loads=(1,), overrides=["+tps=7", "+job=x"])
    build_report(tmp_path, run_plots=False)
    summary = pd.read_csv(tmp_path / "summary.csv", dtype=str)
    assert summary.loc[0, "override.tps"] == "7"
    assert summary.loc[0, "override.job"] == "x"
    assert summary.loc[0, "job"] == "0"
    assert float(summary.loc[0, "tps"]) == 50.0


def test_summary_rebuilt_from_requests(tmp_path):
    write_hydra(tmp_path, ["load.parallel=2"])
    # parallel 1: requests sent at 1 and 2, ended at 3 and 5: latencies 2 and 3, so the one
    # slot was busy 5 s. parallel 2: one request from 0 to 1 with 3 tokens: 1 s over 2 slots.
    write_requests(tmp_path, {1: [(1.0, 3.0, 10), (2.0, 5.0, 20)], 2: [(0.0, 1.0, 3)]})
    written = build_report(tmp_path)
    assert tmp_path / "summary.csv" in written
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["parallel"].tolist() == [1.0, 2.0]
    assert summary["requests"].tolist() == [2, 1]
    assert summary["warmup"].tolist() == [1, 1]
    assert summary["rps"].tolist() == pytest.approx([2 / 5, 1 / 0.5])
    assert summary["tps"].tolist() == pytest.approx([30 / 5, 3 / 0.5])
    assert summary["avg_latency"].tolist() == pytest.approx([2.5, 1.0])
    assert summary["p99_latency"].tolist() == pytest.approx([2.99, 1.0])
    assert summary["avg_ttft"].tolist() == pytest.approx([0.1, 0.1])
    # TPOT = (last token - first token) / (tokens - 1): (2 - 0.1) / 9 and (3 - 0.1) / 19.
    assert summary.loc[0, "avg_tpot"] == pytest.approx((1.9 / 9 + 2.9 / 19) / 2, abs=1e-6)


def test_rate_summary_rebuilt_with_cap(tmp_path):
    write_hydra(tmp_path, ["load.rate=2"], config={"load": {"parallel": 16, "rate": 2.0}})
    write_requests(tmp_path, {2.0: [(0.0, 1.0, 5), (0.5, 1.5, 5)]}, variable="rate")
    build_report(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.loc[0, "rate"] == 2.0
    assert summary.loc[0, "parallel"] == 16.0


def test_sweep_job_rebuilt_from_requests(tmp_path):
    make_run(tmp_path / "0", loads=(1,), overrides=["model=a"])
    write_hydra(tmp_path / "1", ["model=b"])
    write_requests(tmp_path / "1", {4: [(0.0, 2.0, 10)]})
    written = build_report(tmp_path, run_plots=False)
    assert tmp_path / "1" / "summary.csv" in written
    summary = pd.read_csv(tmp_path / "summary.csv", dtype={"job": str})
    assert summary["job"].tolist() == ["0", "1"]
    assert summary["parallel"].tolist() == [1, 4]
    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| 1 | b | rebuilt from requests.csv | 1 | 0 |  |" in markdown


def test_empty_requests_is_failed_job(tmp_path):
    make_run(tmp_path / "0", loads=(1,))
    write_hydra(tmp_path / "1", [])
    (tmp_path / "1" / "requests.csv").write_text("", encoding="utf-8")
    build_report(tmp_path, run_plots=False)
    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "- job 1: summary.csv missing and requests.csv unusable" in markdown


def test_large_sweep_reads_summaries_only(tmp_path, monkeypatch):
    for job in range(200):
        make_run(tmp_path / str(job), loads=(1, 2, 4, 8), overrides=[f"model=m{job % 4}", f"load.parallel={job}"])
        (tmp_path / str(job) / "requests.csv").write_text("not read\n", encoding="utf-8")

    def fail_read(path):
        raise AssertionError(f"requests.csv read: {path}")

    monkeypatch.setattr(aggregate, "read_requests_checked", fail_read)
    started = time.perf_counter()
    written = build_report(tmp_path, run_plots=None)
    elapsed = time.perf_counter() - started

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 800
    assert sorted(summary["load.parallel"].unique()) == list(range(200))
    assert not any(path.parent != tmp_path for path in written), "a 200-job sweep draws no per-job plots by default"
    # About 2 s on a shared 2-core VM; the bound leaves room for slower CI machines.
    assert elapsed < 15


def write_manifest(run_dir, interrupted_by):
    (run_dir / "manifest.json").write_text(json.dumps({"interrupted_by": interrupted_by}), encoding="utf-8")


def test_interrupted_job_marked(tmp_path):
    make_run(tmp_path / "0", loads=(1, 2), overrides=["model=a"])
    write_manifest(tmp_path / "0", None)
    make_run(tmp_path / "1", loads=(1,), overrides=["model=b"])
    write_manifest(tmp_path / "1", "SIGTERM")
    build_report(tmp_path, run_plots=False)

    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "2 jobs: 2 with results (1 of them interrupted, so their results are partial), 0 failed." in markdown
    assert "| 0 | a | ok | 2 | 0 |  |" in markdown
    assert "| 1 | b | interrupted by SIGTERM | 1 | 0 |  |" in markdown
    summary = pd.read_csv(tmp_path / "summary.csv", dtype={"job": str})
    assert summary["job_status"].tolist() == ["ok", "ok", "interrupted by SIGTERM"]
    assert list(summary.columns[:3]) == ["job", "model", "job_status"]


def test_job_stopped_before_first_request(tmp_path):
    # Ctrl-C during the preflight request: the job wrote requests.csv's header and a manifest
    # naming the signal, but no summary.csv and no error.txt, and jobs 2 and 3 never started.
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    params: null\n  overrides:\n    task:\n    - model=a,b\n    - load.parallel=2,4\n",
        encoding="utf-8")
    make_run(tmp_path / "0", loads=(2,), overrides=["model=a", "load.parallel=2"])
    write_hydra(tmp_path / "1", ["model=a", "load.parallel=4"])
    (tmp_path / "1" / "requests.csv").write_text(",".join(REQUEST_COLUMNS) + "\n", encoding="utf-8")
    write_manifest(tmp_path / "1", "SIGINT")
    build_report(tmp_path, run_plots=False)

    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "4 jobs: 1 with results, 1 interrupted before a request completed, 0 failed, 2 not started." in markdown
    assert "| 1 | 4 | interrupted by SIGINT, no complete request | 0 | 0 |  |" in markdown
    assert "## Failed jobs" not in markdown
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "2 not started" in html
    summary = pd.read_csv(tmp_path / "summary.csv", dtype={"job": str})
    assert summary["job"].tolist() == ["0"]


def test_job_stopped_during_warmup(tmp_path):
    # Only a warmup row: rebuilding the summary gives a row that counts no measured request.
    make_run(tmp_path / "0", loads=(2,), overrides=["model=a"])
    write_hydra(tmp_path / "1", ["model=b"])
    write_requests(tmp_path / "1", {2: []})
    write_manifest(tmp_path / "1", "SIGTERM")
    build_report(tmp_path, run_plots=False)

    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "2 jobs: 1 with results, 1 interrupted before a request completed, 0 failed." in markdown
    assert "| 1 | b | interrupted by SIGTERM, no complete request | 0 | 0 |  |" in markdown


def test_empty_requests_without_signal_failed(tmp_path):
    write_hydra(tmp_path / "0", ["model=a"])
    (tmp_path / "0" / "requests.csv").write_text(",".join(REQUEST_COLUMNS) + "\n", encoding="utf-8")
    write_manifest(tmp_path / "0", None)
    make_run(tmp_path / "1", loads=(1,), overrides=["model=b"])
    build_report(tmp_path, run_plots=False)

    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "2 jobs: 1 with results, 1 failed." in markdown
    assert "- job 0: summary.csv missing and requests.csv unusable: no complete request row" in markdown


def test_sweep_csv_loads_are_integers(tmp_path):
    # A resumed job's summary.csv held its concurrency as 16.000000, and an interrupted
    # group leaves first_fail empty, which pandas reads as a float column.
    make_run(tmp_path / "0", loads=(16,), overrides=["model=a"], sla_rows=[
        {**sla_row("p99_ttft <= 0.05", None), "note": "interrupted: at least 8 passed", "last_pass": 8,
         "first_fail": None}])
    text = (tmp_path / "0" / "summary.csv").read_text(encoding="utf-8")
    (tmp_path / "0" / "summary.csv").write_text(text.replace("\n16,", "\n16.000000,"), encoding="utf-8")
    build_report(tmp_path, run_plots=False)

    summary_lines = (tmp_path / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert summary_lines[1].startswith("0,a,ok,16,,100,")
    sla_lines = (tmp_path / "sla_summary.csv").read_text(encoding="utf-8").splitlines()
    assert sla_lines[0].endswith("last_pass,first_fail")
    assert sla_lines[1].endswith(",8,")


def test_comparison_shows_interrupted_search():
    sla = pd.DataFrame([
        {"job": "0", "model": "a", "criteria": "p99_ttft <= 0.05", "max_satisfied": math.nan,
         "note": "interrupted: at least 8 passed", "last_pass": 8.0},
        {"job": "1", "model": "b", "criteria": "p99_ttft <= 0.05", "max_satisfied": math.nan,
         "note": "interrupted", "last_pass": math.nan},
        {"job": "2", "model": "c", "criteria": "p99_ttft <= 0.05", "max_satisfied": math.nan,
         "note": "failed at lower bound", "last_pass": math.nan},
        {"job": "3", "model": "d", "criteria": "p99_ttft <= 0.05", "max_satisfied": 16.0,
         "note": "Satisfied", "last_pass": 16.0},
    ])
    table = sla_comparison(sla, {"model": "model"})
    assert table["p99_ttft <= 0.05"].tolist() == [
        "8 so far (interrupted)", "none so far (interrupted)", "none", 16.0]


def cut_requests(run_dir, keep_bytes_off: int) -> int:
    """Cut the last ``keep_bytes_off`` bytes off requests.csv; return its number of lines."""
    path = run_dir / "requests.csv"
    data = path.read_bytes()
    path.write_bytes(data[:-keep_bytes_off])
    return data.count(b"\n")


def test_cut_requests_line_left_out(tmp_path, caplog):
    write_hydra(tmp_path, ["load.parallel=1"])
    # Three requests at parallel 1; the last row loses its end, so two remain: latencies 2 and 3.
    write_requests(tmp_path, {1: [(1.0, 3.0, 10), (2.0, 5.0, 20), (5.0, 9.0, 30)]})
    lines = cut_requests(tmp_path, 20)
    written = build_report(tmp_path)

    assert tmp_path / "summary.csv" in written
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["requests"].tolist() == [2]
    assert summary["avg_latency"].tolist() == pytest.approx([2.5])
    expected = f"{tmp_path / 'requests.csv'} line {lines} is cut short because the file ends inside it"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{expected}, so the line is left out of the rebuilt summary.csv"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"requests.csv line {lines} is cut short because the file ends inside it" in html


def test_wrong_field_count_left_out(tmp_path, caplog):
    write_hydra(tmp_path, ["load.parallel=1"])
    write_requests(tmp_path, {1: [(1.0, 3.0, 10), (2.0, 5.0, 20)]})
    path = tmp_path / "requests.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(2, "parallel,1,0,99\r\n")  # after the header and the warmup row
    path.write_text("".join(lines), encoding="utf-8")
    build_report(tmp_path)

    assert pd.read_csv(tmp_path / "summary.csv")["requests"].tolist() == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path} line 3 has 4 fields instead of 25")


def test_cut_requests_with_summary_warns(tmp_path, caplog):
    make_run(tmp_path, loads=(1,))
    write_requests(tmp_path, {1: [(1.0, 3.0, 10), (2.0, 5.0, 20)]})
    lines = cut_requests(tmp_path, 5)
    build_report(tmp_path)

    assert pd.read_csv(tmp_path / "summary.csv")["requests"].tolist() == [100]  # summary.csv kept as it is
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'requests.csv'} line {lines} is cut short because the file ends inside it; "
        f"the report uses summary.csv as it is"]


def test_only_cut_requests_is_failed_job(tmp_path):
    make_run(tmp_path / "0", loads=(1,))
    write_hydra(tmp_path / "1", [])
    (tmp_path / "1" / "requests.csv").write_text(",".join(REQUEST_COLUMNS) + "\r\nparallel,1,", encoding="utf-8")
    build_report(tmp_path, run_plots=False)
    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert ("- job 1: summary.csv missing and requests.csv unusable: no complete request row "
            "(line 2 is cut short because the file ends inside it)") in markdown
