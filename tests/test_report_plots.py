"""Plots: valid PNG files, SLA lines where rules exist, and no crash on thin data."""

import math

import pandas as pd
import pytest

from runner.report import build_report, plots
from runner.report.plots import Boundary, Threshold
from test_report_synthetic import is_png, make_run, sla_row, summary_row

RUN_PNGS = ["latency_vs_load.png", "ttft_vs_load.png", "tpot_vs_load.png", "throughput_vs_load.png",
            "tps_vs_latency.png"]
SWEEP_PNGS = ["sweep_tps_vs_latency.png", "sweep_tps_vs_load.png", "sweep_p99_latency_vs_load.png",
              "sweep_p99_ttft_vs_load.png", "sweep_p99_tpot_vs_load.png"]


@pytest.fixture
def captured(monkeypatch):
    """Record each figure instead of only writing it, so tests can inspect the drawn lines."""
    figures = {}
    save = plots._save

    def keep(figure, path):
        figures[path.name] = figure
        save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_run_plots_are_pngs(tmp_path):
    make_run(tmp_path, loads=(1, 2, 4, 8))
    written = build_report(tmp_path)
    for name in RUN_PNGS:
        assert tmp_path / name in written
        assert is_png(tmp_path / name), name


def test_single_load_point_plots(tmp_path):
    make_run(tmp_path, loads=(4,))
    written = build_report(tmp_path)
    assert [p.name for p in written if p.suffix == ".png"] == RUN_PNGS
    for name in RUN_PNGS:
        assert is_png(tmp_path / name), name


def test_tpot_all_nan_skipped(tmp_path):
    make_run(tmp_path, loads=(1, 2), tpot=False)
    written = build_report(tmp_path)
    names = [p.name for p in written]
    assert "tpot_vs_load.png" not in names
    assert "latency_vs_load.png" in names


def test_no_data_writes_no_plot(tmp_path):
    empty = pd.DataFrame([summary_row(1)]).assign(avg_latency=math.nan, p50_latency=math.nan,
                                                   p90_latency=math.nan, p99_latency=math.nan)
    assert not plots.plot_percentiles(empty, "latency", tmp_path / "latency.png", "parallel")
    assert not plots.plot_tradeoff({"run": empty}, tmp_path / "tradeoff.png", "parallel")
    assert not (tmp_path / "latency.png").exists()
    assert not plots.plot_throughput(pd.DataFrame({"parallel": [1.0]}), tmp_path / "tp.png", "parallel")


def test_rule_thresholds_from_config():
    config = {"sla": {"rules": [{"p99_ttft": "<=0.05", "p99_tpot": "< 0.02"}, {"tps": "max"}, {"rps": ">=5"}]}}
    assert plots.rule_thresholds(config) == [
        Threshold("p99_ttft", "<=", 0.05), Threshold("p99_tpot", "<", 0.02), Threshold("rps", ">=", 5.0)]
    assert plots.rule_thresholds({}) == []
    assert plots.rule_thresholds({"sla": None}) == []


def test_boundaries_from_sla_rows():
    sla = pd.DataFrame([sla_row("p99_ttft <= 0.05 and p99_tpot <= 0.05", 4.0), sla_row("tps -> max", 8.0),
                        sla_row("p99_latency <= 2", None), sla_row("goodput -> max where ttft <= 0.5", 6.0)])
    assert plots.sla_boundaries(sla) == [
        Boundary(4.0, "p99_ttft <= 0.05 and p99_tpot <= 0.05", frozenset({"ttft", "tpot"})),
        Boundary(8.0, "tps -> max", frozenset({"throughput"})),
        Boundary(6.0, "goodput -> max where ttft <= 0.5", frozenset({"ttft", "throughput"})),
    ]


def test_ttft_plot_draws_sla_lines(tmp_path, captured):
    make_run(tmp_path, loads=(1, 2, 4, 8), config={"sla": {"rules": [{"p99_ttft": "<=0.05"}]}},
             sla_rows=[sla_row("p99_ttft <= 0.05", 4.0)])
    build_report(tmp_path)
    (ax,) = captured["ttft_vs_load.png"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"avg", "p50", "p90", "p99", "SLA p99_ttft <= 0.05", "max satisfied 4: p99_ttft <= 0.05"}
    assert list(lines["SLA p99_ttft <= 0.05"].get_ydata()) == [0.05, 0.05]
    assert list(lines["max satisfied 4: p99_ttft <= 0.05"].get_xdata()) == [4.0, 4.0]
    assert list(lines["p99"].get_xdata()) == [1, 2, 4, 8]
    assert list(lines["p99"].get_ydata()) == pytest.approx([0.01, 0.02, 0.04, 0.08])
    # The latency plot has no rule on latency, so it shows neither line.
    (latency_ax,) = captured["latency_vs_load.png"].axes
    assert {line.get_label() for line in latency_ax.get_lines()} == {"avg", "p50", "p90", "p99"}


def test_rate_run_plots_against_rate(tmp_path, captured):
    make_run(tmp_path, loads=(0.5, 1, 2, 4, 8, 16), variable="rate")
    build_report(tmp_path)
    (ax,) = captured["latency_vs_load.png"].axes
    assert ax.get_xlabel() == "Request rate (req/s)"
    # 0.5 to 16 req/s spans 32x, so the axis is logarithmic.
    assert ax.get_xscale() == "log"


def test_choose_load_axis():
    closed = pd.DataFrame({"parallel": [1.0, 2.0], "rate": [math.nan, math.nan]})
    open_loop = pd.DataFrame({"parallel": [64.0, 64.0], "rate": [1.0, 2.0]})
    single_rate = pd.DataFrame({"parallel": [64.0], "rate": [3.0]})
    assert plots.choose_load_axis(closed) == "parallel"
    assert plots.choose_load_axis(open_loop) == "rate"
    assert plots.choose_load_axis(single_rate) == "rate"
    assert plots.choose_load_axis(open_loop, preferred="parallel") == "parallel"
    assert plots.choose_load_axis(closed, preferred="rate") == "parallel"


def line_data(figure) -> dict[str, tuple[list, list]]:
    (ax,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_sweep_plots_one_line_per_job(tmp_path, captured):
    # Two jobs per model, one per SLA set; each job's latency is offset by its own base.
    bases = {("a", "x"): 1.0, ("a", "y"): 1.5, ("b", "x"): 2.0, ("b", "y"): 2.5}
    for job, ((model, sla), base) in enumerate(bases.items()):
        make_run(tmp_path / str(job), loads=(1, 2, 4), overrides=[f"model={model}", f"+sla={sla}"], base=base)
    written = build_report(tmp_path, run_plots=False)
    for name in SWEEP_PNGS:
        assert tmp_path / name in written
        assert is_png(tmp_path / name), name
    lines = line_data(captured["sweep_tps_vs_latency.png"])
    assert sorted(lines) == ["model=a, sla=x", "model=a, sla=y", "model=b, sla=x", "model=b, sla=y"]
    assert lines["model=a, sla=y"][0] == pytest.approx([1.6, 1.7, 1.9])
    assert lines["model=b, sla=x"][0] == pytest.approx([2.1, 2.2, 2.4])
    assert lines["model=b, sla=x"][1] == [50.0, 100.0, 200.0]
    assert captured["sweep_tps_vs_latency.png"].axes[0].get_legend().get_title().get_text() == ""


def test_sweep_plots_join_load_override(tmp_path, captured):
    job = 0
    for model in ("a", "b"):
        for parallel in (1, 2):
            make_run(tmp_path / str(job), loads=(parallel,), overrides=[f"model={model}", f"load.parallel={parallel}"])
            job += 1
    build_report(tmp_path, run_plots=False)
    lines = line_data(captured["sweep_tps_vs_load.png"])
    assert lines == {"model=a": ([1, 2], [50.0, 100.0]), "model=b": ([1, 2], [50.0, 100.0])}


def test_sweep_plots_join_without_other_override(tmp_path, captured):
    for job, parallel in enumerate((1, 2)):
        make_run(tmp_path / str(job), loads=(parallel,), overrides=[f"load.parallel={parallel}"])
    build_report(tmp_path, run_plots=False)
    assert line_data(captured["sweep_tps_vs_load.png"]) == {"all jobs": ([1, 2], [50.0, 100.0])}


def test_sweep_plots_split_repeated_loads(tmp_path, captured):
    # Two SLA searches that start at different loads measure the same load values.
    for job, parallel in enumerate((1, 2)):
        make_run(tmp_path / str(job), loads=(1, 2, 4), overrides=[f"load.parallel={parallel}", "+sla=x"])
    build_report(tmp_path, run_plots=False)
    lines = line_data(captured["sweep_tps_vs_load.png"])
    assert lines == {"job 0": ([1, 2, 4], [50.0, 100.0, 200.0]), "job 1": ([1, 2, 4], [50.0, 100.0, 200.0])}


def test_sweep_job_plots_by_default(tmp_path):
    make_run(tmp_path / "0", loads=(1, 2), overrides=["model=a"])
    make_run(tmp_path / "1", loads=(1,), overrides=["model=b"])
    written = build_report(tmp_path)
    for job in ("0", "1"):
        assert tmp_path / job / "report.html" in written
        assert is_png(tmp_path / job / "latency_vs_load.png")
    written = build_report(tmp_path, run_plots=False)
    assert all(path.parent == tmp_path for path in written)


def test_linear_concurrency_axis_has_whole_ticks():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ax.plot([2, 3, 4], [1.0, 2.0, 3.0])
    plots._set_load_axis(ax, [2, 3, 4], "parallel")
    ticks = [tick for tick in ax.get_xticks() if 2 <= tick <= 4]

    assert ax.get_xscale() == "linear"
    assert ticks == [2.0, 3.0, 4.0]
