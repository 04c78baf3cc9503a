"""python -m runner.compare on run folders written here, so every difference is known exactly."""

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from rich.console import Console

from runner.compare import compare, write_files
from runner.compare.__main__ import main
from runner.config import RunConfig

from paths import CONF_DIR

FINGERPRINT = "a" * 64


def write_run(path: Path, rows: list[dict], *, config: dict | None = None, fingerprint: str | None = FINGERPRINT,
              sla_rows: list[dict] | None = None, completion_tokens: list[int] | None = None) -> Path:
    """Write a run folder: summary.csv from ``rows``, config.yaml, manifest.json and optional extras."""
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "summary.csv", index=False)
    (path / ".hydra").mkdir()
    composed = OmegaConf.merge(OmegaConf.structured(RunConfig), config or {})
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(composed), encoding="utf-8")
    if fingerprint is not None:
        (path / "manifest.json").write_text(json.dumps({"dataset": {"fingerprint": fingerprint}}), encoding="utf-8")
    if sla_rows is not None:
        pd.DataFrame(sla_rows).to_csv(path / "sla_summary.csv", index=False)
    if completion_tokens is not None:
        requests = pd.DataFrame({"warmup": False, "success": True, "completion_tokens": completion_tokens})
        requests.to_csv(path / "requests.csv", index=False)
    return path


def point(parallel, rate=math.nan, **metrics) -> dict:
    row = {"parallel": parallel, "rate": rate, "requests": 100, "rps": 10.0, "tps": 1280.0, "p99_latency": 2.0,
           "failures": 0, "duration": 10.0, "client_bound": False, "client_note": ""}
    return row | metrics


def metric(comparison, metric_name: str, parallel=None, rate=None) -> pd.Series:
    frame = comparison.metrics
    selected = frame[(frame["metric"] == metric_name)
                     & (frame["parallel"].isna() if parallel is None else frame["parallel"] == parallel)
                     & (frame["rate"].isna() if rate is None else frame["rate"] == rate)]
    assert len(selected) == 1, frame
    return selected.iloc[0]


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "a", [point(1), point(2), point(4)],
                  sla_rows=[{"criteria": "p99_ttft <= 0.1", "variable": "parallel", "max_satisfied": 16,
                             "note": "Satisfied"},
                            {"criteria": "tps -> max", "variable": "parallel", "max_satisfied": 8, "note": "Best"}])
    b = write_run(tmp_path / "b", [point(1, rps=12.5, tps=1600.0, p99_latency=1.5, failures=2), point(2), point(8)],
                  sla_rows=[{"criteria": "tps -> max", "variable": "parallel", "max_satisfied": 12, "note": "Best"},
                            {"criteria": "p99_ttft <= 0.1", "variable": "parallel", "max_satisfied": None,
                             "note": "No load met it"},
                            {"criteria": "p99_latency <= 2", "variable": "parallel", "max_satisfied": 4,
                             "note": "Satisfied"}])
    return a, b


def test_metric_deltas_exact(two_runs):
    comparison = compare(*two_runs)
    rps = metric(comparison, "rps", parallel=1)
    assert (rps["a"], rps["b"], rps["change"], rps["relative_change"]) == (10.0, 12.5, 2.5, 0.25)
    latency = metric(comparison, "p99_latency", parallel=1)
    assert (latency["change"], latency["relative_change"]) == (-0.5, -0.25)
    unchanged = metric(comparison, "tps", parallel=2)
    assert (unchanged["change"], unchanged["relative_change"]) == (0.0, 0.0)


def test_zero_baseline_has_no_relative_change(two_runs):
    failures = metric(compare(*two_runs), "failures", parallel=1)
    assert failures["change"] == 2
    assert math.isnan(failures["relative_change"])


def test_only_common_load_points(two_runs):
    comparison = compare(*two_runs)
    assert sorted(set(comparison.metrics["parallel"])) == [1.0, 2.0]
    assert comparison.only_in == {"A": ["parallel=4"], "B": ["parallel=8"]}


def test_non_numeric_columns_skipped(two_runs):
    metrics = set(compare(*two_runs).metrics["metric"])
    assert metrics == {"requests", "rps", "tps", "p99_latency", "failures", "duration"}


def test_rate_points_match_on_rate(tmp_path):
    a = write_run(tmp_path / "a", [point(math.nan, 2.0), point(math.nan, 4.0, rps=3.9)])
    b = write_run(tmp_path / "b", [point(math.nan, 4.0, rps=3.5), point(math.nan, 2.0000001)])
    comparison = compare(a, b)
    assert metric(comparison, "rps", rate=4.0)["change"] == pytest.approx(-0.4)
    assert metric(comparison, "rps", rate=2.0)["change"] == 0.0
    assert comparison.only_in == {"A": [], "B": []}


def test_sla_results_matched_on_criteria(two_runs):
    sla = compare(*two_runs).sla.set_index("criteria")
    assert list(sla.index) == ["p99_ttft <= 0.1", "tps -> max", "p99_latency <= 2"]
    assert (sla.loc["tps -> max", "a"], sla.loc["tps -> max", "b"], sla.loc["tps -> max", "change"]) == (8, 12, 4)
    assert sla.loc["p99_ttft <= 0.1", "a"] == 16
    assert math.isnan(sla.loc["p99_ttft <= 0.1", "b"])
    assert sla.loc["p99_ttft <= 0.1", "note_b"] == "No load met it"
    assert sla.loc["p99_latency <= 2", "note_a"] == "not in run A"
    assert sla.loc["p99_latency <= 2", "b"] == 4


def test_same_settings_no_warnings(two_runs):
    assert compare(*two_runs).warnings == []


def test_different_fingerprint_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)])
    b = write_run(tmp_path / "b", [point(1)], fingerprint="b" * 64)
    assert compare(a, b).warnings == ["different prompts: dataset fingerprint aaaaaaaaaaaa (A) vs bbbbbbbbbbbb (B)"]


def test_missing_fingerprint_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)])
    b = write_run(tmp_path / "b", [point(1)], fingerprint=None)
    assert compare(a, b).warnings == ["no dataset fingerprint in manifest.json of run B: prompts cannot be checked"]


def test_different_max_tokens_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], config={"request": {"max_tokens": 128}})
    b = write_run(tmp_path / "b", [point(1)], config={"request": {"max_tokens": 256, "stream": False}})
    assert compare(a, b).warnings == [
        "different request settings: request.max_tokens 128 vs 256; request.stream True vs False"]


def test_different_api_path_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)])
    b = write_run(tmp_path / "b", [point(1)], config={"endpoint": {"url": "/v1/completions"}})
    assert compare(a, b).warnings == [
        "different request settings: API path '/v1/chat/completions' vs '/v1/completions'"]


def test_different_model_and_load_warn(tmp_path):
    a = write_run(tmp_path / "a", [point(1)])
    b = write_run(tmp_path / "b", [point(1)], config={"model": {"name": "other"}, "load": {"number": 50}})
    assert compare(a, b).warnings == [
        "different load settings: load.number 100 vs 50",
        "different models: model.name 'qwen2.5-0.5b-instruct' (A) vs 'other' (B)",
    ]


def composed(*overrides: str):
    """Compose conf/ as the command line would, with the runner's schema registered."""
    import runner.__main__  # noqa: F401  registers the run_schema the config tree extends
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_different_sim_profile_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], config=composed())
    b = write_run(tmp_path / "b", [point(1)], config=composed("model.sim_profile=batch8-slow", "endpoint.sim_seed=3"))
    assert compare(a, b).warnings == [
        "different simulated servers: model.sim_profile 'default' vs 'batch8-slow'; endpoint.sim_seed 0 vs 3"]


def test_sim_profile_ignored_for_real_servers(tmp_path):
    real = ["endpoint=openai", "endpoint.url=http://127.0.0.1:8000/v1/chat/completions"]
    a = write_run(tmp_path / "a", [point(1)], config=composed(*real))
    b = write_run(tmp_path / "b", [point(1)], config=composed(*real, "model.sim_profile=batch8-slow"))
    assert compare(a, b).warnings == []
    c = write_run(tmp_path / "c", [point(1)], config=composed())
    assert compare(a, c).warnings == ["different servers: endpoint.kind 'openai' (A) vs 'sim' (B)"]


def test_arrival_checked_in_open_loop_only(tmp_path):
    closed = [write_run(tmp_path / name, [point(1)], config={"load": {"arrival": arrival}})
              for name, arrival in (("a", "poisson"), ("b", "constant"))]
    assert compare(*closed).warnings == []
    opened = [write_run(tmp_path / name, [point(1)], config={"load": {"arrival": arrival, "rate": 2.0}})
              for name, arrival in (("c", "poisson"), ("d", "constant"))]
    assert compare(*opened).warnings == ["different load settings: load.arrival 'poisson' vs 'constant'"]


def test_output_length_from_requests_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], completion_tokens=[100, 100])
    b = write_run(tmp_path / "b", [point(1)], completion_tokens=[100, 112])
    assert compare(a, b).warnings == [
        "different output lengths: 100.0 (A) vs 106.0 (B) mean completion tokens per request (requests.csv), "
        "more than 5% apart"]
    c = write_run(tmp_path / "c", [point(1)], completion_tokens=[100, 108])
    assert compare(a, c).warnings == []


def test_output_length_from_summary_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1, tps=1280.0, rps=10.0)])
    b = write_run(tmp_path / "b", [point(1, tps=640.0, rps=10.0)])
    assert compare(a, b).warnings == [
        "different output lengths: 128.0 (A) vs 64.0 (B) mean completion tokens per request "
        "(summary.csv tps / rps), more than 5% apart"]


def test_client_bound_point_warns(tmp_path):
    a = write_run(tmp_path / "a", [point(1, client_bound=True, client_note="event-loop lag p99 40.0 ms")])
    b = write_run(tmp_path / "b", [point(1)])
    assert compare(a, b).warnings == [
        "parallel=1 is client-bound in run A (event-loop lag p99 40.0 ms): its numbers describe the client, "
        "not the server"]


def test_files_hold_rows_and_warnings(tmp_path, two_runs):
    a, b = two_runs
    (b / "manifest.json").write_text(json.dumps({"dataset": {"fingerprint": "b" * 64}}))
    paths = write_files(compare(a, b), tmp_path / "out")
    assert paths == [tmp_path / "out" / "compare.csv", tmp_path / "out" / "compare.md"]
    frame = pd.read_csv(paths[0])
    assert frame["kind"].iloc[0] == "warning"
    assert frame["message"].iloc[0].startswith("different prompts")
    rps = frame[(frame["kind"] == "metric") & (frame["metric"] == "rps") & (frame["parallel"] == 1)].iloc[0]
    assert (rps["a"], rps["b"], rps["change"], rps["relative_change"]) == (10.0, 12.5, 2.5, 0.25)
    sla = frame[frame["kind"] == "sla"]
    assert list(sla["criteria"]) == ["p99_ttft <= 0.1", "tps -> max", "p99_latency <= 2"]
    assert list(sla["metric"].unique()) == ["max_satisfied (parallel)"]
    markdown = paths[1].read_text(encoding="utf-8")
    assert "- different prompts: dataset fingerprint" in markdown
    assert "| parallel=1 | rps | 10 | 12.5 | 2.5 | +25.0% |" in markdown
    assert "| tps -\\> max | parallel | 8 | 12 | 4 | Best | Best |" in markdown
    assert "Load points only in run A: parallel=4" in markdown


def test_cli_prints_warning_and_exits_0(tmp_path, capsys):
    a = write_run(tmp_path / "a", [point(1)], config={"request": {"max_tokens": 128}})
    b = write_run(tmp_path / "b", [point(1)], config={"request": {"max_tokens": 64}})
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=True, color_system="standard")
    assert main([str(a), str(b), "--out", str(tmp_path / "out")], console=console) == 0
    printed = buffer.getvalue()
    assert "\x1b[33mwarning: different request settings: request.max_tokens 128 vs 64" in printed  # yellow
    assert "Metrics per load point" in printed
    assert (tmp_path / "out" / "compare.csv").is_file()


def test_cli_default_out_folder(tmp_path, monkeypatch):
    a = write_run(tmp_path / "a", [point(1)])
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(a)], console=Console(file=io.StringIO())) == 0
    written = list((tmp_path / "outputs" / "compare").glob("*/*/compare.csv"))
    assert len(written) == 1


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_folder_exits_2(tmp_path, capsys):
    a = write_run(tmp_path / "a", [point(1)])
    assert main([str(a), str(tmp_path / "nope")]) == 2
    assert f"run B folder not found: {tmp_path / 'nope'}" in error_line(capsys)


def test_missing_summary_exits_2(tmp_path, capsys):
    a = write_run(tmp_path / "a", [point(1)])
    (a / "summary.csv").unlink()
    (a / "requests.csv").write_text("warmup,success,completion_tokens\n")
    assert main([str(a), str(a)]) == 2
    assert f"has no summary.csv; python -m runner.report {a} rebuilds it" in error_line(capsys)


def test_sweep_folder_exits_2(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", [point(1)])
    write_run(tmp_path / "sweep" / "1", [point(2)])
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    assert main([str(tmp_path / "sweep"), str(tmp_path / "sweep" / "0")]) == 2
    line = error_line(capsys)
    assert "contains runs in subfolders (a sweep), not a run" in line
    assert str(tmp_path / "sweep" / "1") in line


def test_summary_without_load_columns_exits_2(tmp_path, capsys):
    a = write_run(tmp_path / "a", [{"rps": 1.0}])
    assert main([str(a), str(a)]) == 2
    assert "lacks the column(s) parallel, rate" in error_line(capsys)


def test_empty_summary_exits_2(tmp_path, capsys):
    a = write_run(tmp_path / "a", [point(1)])
    (a / "summary.csv").write_text("")
    assert main([str(a), str(a)]) == 2
    assert "summary.csv cannot be read" in error_line(capsys)


def test_sweep_folder_with_summary_rejected(tmp_path, capsys):
    from runner.compare.__main__ import main

    run_a = tmp_path / "a"
    sweep = tmp_path / "sweep"
    for folder in (run_a, sweep / "0", sweep / "1"):
        (folder / ".hydra").mkdir(parents=True)
        (folder / "summary.csv").write_text("parallel,rate,rps\n4,,1.0\n")
    # The aggregation writes a summary.csv at the sweep's top too.
    (sweep / "summary.csv").write_text("job,parallel,rate,rps\n0,4,,1.0\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    assert main([str(run_a), str(sweep)]) == 2
    assert "contains runs in subfolders (a sweep)" in capsys.readouterr().err


def test_different_search_bounds_warn(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], config=composed("+sla=ttft_strict"))
    b = write_run(tmp_path / "b", [point(1)], config=composed("+sla=ttft_strict", "search.upper_bound=64",
                                                              "search.parallel_resolution=2"))
    assert compare(a, b).warnings == [
        "different search settings, so the SLA answers are not comparable: search.upper_bound 512 vs 64; "
        "search.parallel_resolution 1 vs 2"]


def test_search_bounds_ignored_without_sla(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], config=composed())
    b = write_run(tmp_path / "b", [point(1)], config=composed("search.upper_bound=64"))
    assert compare(a, b).warnings == []


def test_cli_warning_stays_on_one_line(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], config=composed())
    b = write_run(tmp_path / "b", [point(1)], config=composed("model.sim_profile=batch8-slow"))
    buffer = io.StringIO()
    assert main([str(a), str(b), "--out", str(tmp_path / "out")], console=Console(file=buffer, width=40)) == 0
    assert ("warning: different simulated servers: model.sim_profile 'default' vs 'batch8-slow'"
            in buffer.getvalue().splitlines())


def test_interrupted_sla_answer_shown(tmp_path):
    a = write_run(tmp_path / "a", [point(1)], sla_rows=[
        {"criteria": "p99_ttft <= 0.1", "variable": "parallel", "max_satisfied": 16, "note": "Satisfied"}])
    b = write_run(tmp_path / "b", [point(1)], sla_rows=[
        {"criteria": "p99_ttft <= 0.1", "variable": "parallel", "max_satisfied": None,
         "note": "interrupted: at least 8 passed"}])
    write_files(compare(a, b), tmp_path / "out")
    markdown = (tmp_path / "out" / "compare.md").read_text(encoding="utf-8")
    assert "| p99_ttft \\<= 0.1 | parallel | 16 | interrupted |  | Satisfied | interrupted: at least 8 passed |" in markdown
