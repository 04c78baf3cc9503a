"""SLA search against a fake prober whose metrics are exact functions of the load."""

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Mapping

import pytest

from runner.config import LoadConfig, RunConfig, SearchConfig, SearchVariable, SlaConfig
from runner.errors import ConfigError
from runner.sla.probe import ProbeResult
from runner.sla.rules import parse_rules
from runner.sla.search import SlaTuner, TuneEvent, Verdict


def tps_curve(value: float) -> float:
    """Concave throughput curve with its peak at 300."""
    return 8000.0 - 0.05 * (value - 300.0) ** 2


class FakeProber:
    """Prober whose metrics depend only on the load value (and, if asked, on the repeats).

    It records every call, and keeps repeats the way a real prober does: asking again for
    fewer runs than exist returns what exists without running anything.
    """

    def __init__(
        self,
        *,
        ttft_per_unit: float = 0.01,
        success_rate: Callable[[float], float] = lambda value: 100.0,
        client_bound_from: float | None = None,
        metric_override: Callable[[float, int], dict[str, float]] | None = None,
        block_at: float | None = None,
    ) -> None:
        self.ttft_per_unit = ttft_per_unit
        self.success_rate = success_rate
        self.client_bound_from = client_bound_from
        self.metric_override = metric_override
        # Probing this value never finishes, so a test can cancel the search there.
        self.block_at = block_at
        self.blocked = asyncio.Event()
        self.calls: list[tuple[float, int]] = []
        self.runs_done: dict[float, int] = {}
        self.bounds_seen: list[dict[str, float]] = []

    @property
    def values(self) -> list[float]:
        """Load values in the order they were first measured."""
        seen: list[float] = []
        for value, _ in self.calls:
            if value not in seen:
                seen.append(value)
        return seen

    def _goodput(self, value: float, bounds: Mapping[str, float]) -> float:
        self.bounds_seen.append(dict(bounds))
        # Goodput rises with load, then falls as more requests miss the TTFT bound. The
        # peak lies at bounds["ttft"] / 0.002, which is 250 for a 0.5 s bound.
        return value * math.exp(-value * 0.002 / bounds["ttft"])

    async def probe(self, value: float, runs: int) -> ProbeResult:
        self.calls.append((value, runs))
        if value == self.block_at:
            self.blocked.set()
            await asyncio.Event().wait()
        done = max(self.runs_done.get(value, 0), runs)
        self.runs_done[value] = done
        metrics = {
            "p99_ttft": self.ttft_per_unit * value,
            "avg_ttft": self.ttft_per_unit * value / 2,
            "p99_latency": 1.0 + 0.01 * value,
            "tps": tps_curve(value),
            "rps": value / 2,
            "success_rate": self.success_rate(value),
            "requests": 100.0 * done,
        }
        if self.metric_override is not None:
            metrics.update(self.metric_override(value, done))
        client_bound = self.client_bound_from is not None and value >= self.client_bound_from
        return ProbeResult(
            value=value,
            runs=done,
            metrics=metrics,
            client_bound=client_bound,
            client_note="schedule lateness p99 0.4 s" if client_bound else "",
            goodput=lambda bounds: self._goodput(value, bounds),
        )


def make_tuner(rules, prober, **settings) -> SlaTuner:
    options = dict(
        variable=SearchVariable.parallel,
        start=2,
        lower_bound=1,
        upper_bound=64,
        num_runs=3,
        resolution=1,
        max_extra_runs=2,
        noise_band=0.0,
    )
    options.update(settings)
    return SlaTuner(parse_rules(rules), prober=prober, **options)


# -- constraint groups ---------------------------------------------------------------------


async def test_doubling_then_bisection():
    prober = FakeProber()
    # p99_ttft = 0.01 * value, so 37 passes (0.37) and 38 fails (0.38).
    (answer,) = await make_tuner([{"p99_ttft": "<=0.375"}], prober).run()
    assert prober.values == [2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert answer.max_satisfied == 37
    assert answer.note == "Satisfied"
    assert (answer.last_pass, answer.first_fail) == (37, 38)
    assert answer.probes == 11
    assert answer.criteria == "p99_ttft <= 0.375"
    assert answer.variable == "parallel"


async def test_probes_use_num_runs():
    prober = FakeProber()
    await make_tuner([{"p99_ttft": "<=0.375"}], prober).run()
    assert {runs for _, runs in prober.calls} == {3}
    assert all(isinstance(value, int) for value, _ in prober.calls)


async def test_doubling_clamps_to_upper_bound():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_ttft": "<=0.495"}], prober, start=3, upper_bound=50).run()
    assert prober.values == [3, 6, 12, 24, 48, 50, 49]
    assert answer.max_satisfied == 49


async def test_halving_path():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_ttft": "<=0.105"}], prober, start=64).run()
    assert prober.values == [64, 32, 16, 8, 12, 10, 11]
    assert answer.max_satisfied == 10
    assert answer.note == "Satisfied"
    assert (answer.last_pass, answer.first_fail) == (10, 11)


async def test_failed_at_lower_bound():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_ttft": "<=0.001"}], prober, start=5).run()
    assert prober.values == [5, 2, 1]
    assert answer.max_satisfied is None
    assert answer.note == "failed at lower bound"
    assert answer.to_row()["max_satisfied"] is None


async def test_upper_bound_reached():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_ttft": "<=5"}], prober, upper_bound=50).run()
    assert prober.values == [2, 4, 8, 16, 32, 50]
    assert answer.max_satisfied == 50
    assert answer.note == "upper bound reached"
    assert answer.first_fail is None


async def test_failed_requests_fail_probe():
    prober = FakeProber(success_rate=lambda value: 100.0 if value <= 20 else 100.0 * 999 / 1000)
    (answer,) = await make_tuner([{"p99_ttft": "<=5"}], prober).run()
    assert answer.max_satisfied == 20


async def test_nan_metric_fails_probe():
    def override(value: float, runs: int) -> dict[str, float]:
        return {"p99_tpot": math.nan if value > 10 else 0.01}

    prober = FakeProber(metric_override=override)
    (answer,) = await make_tuner([{"p99_tpot": "<=0.05"}], prober).run()
    assert answer.max_satisfied == 10


async def test_rate_with_relative_resolution():
    prober = FakeProber()
    # p99_ttft = 0.01 * rate, so the true limit is 23.45 requests/s.
    (answer,) = await make_tuner(
        [{"p99_ttft": "<=0.2345"}], prober, variable=SearchVariable.rate, start=1.5, resolution=0.05
    ).run()
    assert prober.values[:6] == [1.5, 3.0, 6.0, 12.0, 24.0, 18.0]
    assert answer.variable == "rate"
    assert answer.max_satisfied <= 23.45
    assert answer.max_satisfied >= 23.45 / 1.05
    assert answer.first_fail / answer.last_pass - 1 <= 0.05
    assert any(value != int(value) for value in prober.values)
    # Midpoints are rounded to 3 significant digits.
    assert all(float(f"{value:.3g}") == value for value in prober.values)


async def test_rate_halving_reaches_fractions():
    prober = FakeProber()
    (answer,) = await make_tuner(
        [{"p99_ttft": "<=0.004"}], prober, variable=SearchVariable.rate, start=2.0, lower_bound=0.1, resolution=0.05
    ).run()
    assert prober.values[:3] == [2.0, 1.0, 0.5]
    assert 0.4 / 1.05 <= answer.max_satisfied <= 0.4


async def test_groups_share_measured_points():
    prober = FakeProber()
    first, second = await make_tuner([{"p99_ttft": "<=0.375"}, {"p99_ttft": "<=0.205"}], prober).run()
    assert first.max_satisfied == 37
    assert second.max_satisfied == 20
    assert set(Counter(value for value, _ in prober.calls).values()) == {1}
    # The second group walked 2..32 again from the shared table, then bisected [16, 32].
    assert second.probes == len([2, 4, 8, 16, 32, 24, 20, 22, 21])


async def test_noise_band_repeats_probe():
    prober = FakeProber()
    # 36 (0.36) and 38 (0.38) lie within 5% of 0.37, but 2, 4 and 8 lie far from it.
    await make_tuner([{"p99_ttft": "<=0.37"}], prober, noise_band=0.05, max_extra_runs=2).run()
    assert (36, 4) in prober.calls
    assert (36, 5) in prober.calls
    assert max(runs for value, runs in prober.calls if value == 38) == 5
    assert max(runs for value, runs in prober.calls if value in (2, 4, 8)) == 3


async def test_pooled_repeats_decide_verdict():
    def override(value: float, runs: int) -> dict[str, float]:
        # At 37 the first three repeats look slow (0.3705), but pooled with more they pass.
        if value == 37:
            return {"p99_ttft": 0.3705 if runs <= 3 else 0.3695}
        return {}

    prober = FakeProber(metric_override=override)
    (answer,) = await make_tuner([{"p99_ttft": "<=0.37"}], prober, noise_band=0.01, max_extra_runs=2).run()
    assert (37, 4) in prober.calls
    assert answer.max_satisfied == 37


async def test_tail_noise_repeats_until_enough_tail_samples():
    prober = FakeProber()
    # The fake prober reports 100 requests per repeat, so a p99 rests on one tail sample per
    # repeat and the band after k repeats is 0.5 / sqrt(k). 32 (0.32) lies 14.7 % below 0.375,
    # which needs k = 12 (band 14.4 %); 48 (0.48) lies 28 % above it and needs k = 4.
    (answer,) = await make_tuner([{"p99_ttft": "<=0.375"}], prober, tail_noise=0.5, max_extra_runs=12).run()
    runs = {value: max(count for probed, count in prober.calls if probed == value) for value in prober.values}
    assert runs[16] == 3
    assert runs[32] == 12
    assert runs[48] == 4
    assert runs[64] == 3
    assert answer.max_satisfied == 37


async def test_tail_noise_capped_by_max_extra_runs():
    prober = FakeProber()
    await make_tuner([{"p99_ttft": "<=0.375"}], prober, tail_noise=0.5, max_extra_runs=2).run()
    assert max(runs for _, runs in prober.calls) == 5


async def test_tail_noise_ignores_average_rules():
    prober = FakeProber()
    # avg_ttft = 0.005 * value crosses 0.1875 between 37 and 38 too, but an average gets no tail band.
    await make_tuner([{"avg_ttft": "<=0.1875"}], prober, tail_noise=0.5, max_extra_runs=12).run()
    assert {runs for _, runs in prober.calls} == {3}


async def test_no_repeats_without_noise_budget():
    prober = FakeProber()
    await make_tuner([{"p99_ttft": "<=0.37"}], prober, noise_band=0.05, max_extra_runs=0).run()
    assert {runs for _, runs in prober.calls} == {3}


async def test_client_bound_limits_search():
    prober = FakeProber(client_bound_from=200)
    (answer,) = await make_tuner([{"p99_ttft": "<=5"}], prober, upper_bound=512).run()
    assert prober.values == [2, 4, 8, 16, 32, 64, 128, 256, 192, 224, 208, 200, 196, 198, 199]
    assert answer.max_satisfied == 199
    assert answer.note == "client-bound at 200: schedule lateness p99 0.4 s"
    assert answer.first_fail is None


async def test_client_bound_start_halves():
    prober = FakeProber(client_bound_from=20)
    (answer,) = await make_tuner([{"p99_ttft": "<=5"}], prober, start=32).run()
    assert prober.values[:3] == [32, 16, 24]
    assert answer.max_satisfied == 19
    assert answer.note.startswith("client-bound at 20: ")


async def test_server_fail_below_client_limit():
    prober = FakeProber(client_bound_from=300)
    (answer,) = await make_tuner([{"p99_ttft": "<=1.005"}], prober, upper_bound=512).run()
    assert answer.max_satisfied == 100
    assert answer.note == "Satisfied"


async def test_events_report_verdicts_and_bracket():
    events: list[TuneEvent] = []
    prober = FakeProber()
    await make_tuner([{"p99_ttft": "<=0.375"}], prober, on_event=events.append).run()
    verdicts = [event for event in events if event.kind == "verdict"]
    assert [event.value for event in verdicts] == prober.values
    sixty_four = verdicts[5]
    assert sixty_four.verdict is Verdict.failed
    assert sixty_four.violations == ("p99_ttft 0.64, needs <= 0.375",)
    assert (sixty_four.last_pass, sixty_four.first_fail) == (32, 64)
    assert events[0].kind == "probe"
    assert events[-1].kind == "answer"
    assert events[-1].answer.max_satisfied == 37


async def test_row_columns():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_ttft": "<=0.375"}], prober).run()
    row = answer.to_row()
    columns = ["criteria", "variable", "max_satisfied", "note", "probes", "seconds", "last_pass", "first_fail"]
    assert list(row) == columns
    assert row["max_satisfied"] == 37
    assert row["seconds"] >= 0


async def test_from_config_uses_search_settings():
    prober = FakeProber()
    config = RunConfig(
        load=LoadConfig(parallel=2),
        search=SearchConfig(variable=SearchVariable.parallel, lower_bound=1, upper_bound=64, num_runs=2, noise_band=0,
                            tail_noise=0),
        sla=SlaConfig(rules=[{"p99_ttft": "<=0.375"}]),
    )
    tuner = SlaTuner.from_config(parse_rules(config.sla.rules), config, prober)
    (answer,) = await tuner.run()
    assert prober.values[0] == 2
    assert answer.max_satisfied == 37
    assert {runs for _, runs in prober.calls} == {2}


async def test_from_config_rate_starts_at_load_rate():
    prober = FakeProber()
    config = RunConfig(
        load=LoadConfig(parallel=None, rate=1.5),
        search=SearchConfig(variable=SearchVariable.rate, lower_bound=0.5, upper_bound=64, noise_band=0, tail_noise=0),
        sla=SlaConfig(rules=[{"p99_ttft": "<=0.2345"}]),
    )
    tuner = SlaTuner.from_config(parse_rules(config.sla.rules), config, prober)
    (answer,) = await tuner.run()
    assert prober.values[0] == 1.5
    assert answer.variable == "rate"
    assert 23.45 / 1.05 <= answer.max_satisfied <= 23.45


# -- objective groups ----------------------------------------------------------------------


async def test_max_objective_peak_between_doublings():
    prober = FakeProber()
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=4, upper_bound=1024).run()
    assert prober.values[:8] == [4, 8, 16, 32, 64, 128, 256, 512]
    assert answer.max_satisfied == 300
    assert answer.note == "Best tps: 8000.0000"
    assert answer.best_metric == 8000.0
    assert answer.last_pass <= 300 <= answer.first_fail
    assert answer.first_fail - answer.last_pass <= 2
    assert len(prober.values) < 30


async def test_max_objective_peak_at_upper_bound():
    prober = FakeProber()
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=16, upper_bound=200).run()
    assert answer.max_satisfied == 200
    # Nothing above the upper bound was measured, so the bracket has no upper end.
    assert answer.first_fail is None
    assert answer.last_pass == 199


async def test_max_objective_skips_failed_probes():
    prober = FakeProber(success_rate=lambda value: 100.0 if value <= 280 else 99.0)
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=4, upper_bound=1024).run()
    assert answer.max_satisfied == 280


async def test_min_objective_goes_below_start():
    prober = FakeProber()
    (answer,) = await make_tuner([{"p99_latency": "min"}], prober, start=4).run()
    assert prober.values == [4, 8, 2, 1]
    assert answer.max_satisfied == 1
    assert answer.note == "Best p99_latency: 1.0100"


async def test_goodput_objective_uses_bounds():
    prober = FakeProber()
    (answer,) = await make_tuner(
        [{"goodput": "max", "p99_ttft": "<=0.5", "p99_tpot": "<=0.05"}], prober, start=4, upper_bound=1024
    ).run()
    assert prober.bounds_seen[0] == {"ttft": 0.5, "tpot": 0.05}
    assert answer.max_satisfied == 250
    assert answer.note.startswith("Best goodput: ")


async def test_objective_reports_client_bound():
    prober = FakeProber(client_bound_from=400)
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=4, upper_bound=1024).run()
    assert answer.max_satisfied == 300
    # The doubling step to 512 was the first (and lowest) client-bound probe.
    assert answer.note == "Best tps: 8000.0000; client-bound at 512: schedule lateness p99 0.4 s"


async def test_rate_objective():
    prober = FakeProber()
    (answer,) = await make_tuner(
        [{"tps": "max"}], prober, variable=SearchVariable.rate, start=4.0, upper_bound=1024.0, resolution=0.05
    ).run()
    assert abs(answer.max_satisfied / 300 - 1) <= 0.05


async def test_objective_without_any_pass():
    prober = FakeProber(success_rate=lambda value: 50.0)
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=4).run()
    assert prober.values == [4, 8, 2, 1]
    assert answer.max_satisfied is None
    assert answer.note == "no probe passed: success_rate 50 < 100 (some requests failed)"


# -- interruption --------------------------------------------------------------------------


async def test_cancel_returns_partial_answers():
    # Cancel during the first bisection probe, after 2..64 were measured.
    prober = FakeProber(block_at=48)
    tuner = make_tuner([{"p99_ttft": "<=0.375"}, {"tps": "max"}], prober)
    task = asyncio.create_task(tuner.run())
    await asyncio.wait_for(prober.blocked.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    first, second = tuner.answers()
    assert first.note == "interrupted: at least 32 passed"
    assert first.max_satisfied is None
    assert (first.last_pass, first.first_fail) == (32, 64)
    assert first.probes == 7
    assert first.seconds > 0
    assert second.note == "interrupted"
    assert second.probes == 0
    assert second.seconds == 0


async def test_answers_after_first_group_finished():
    # Group one never probes 128, so the search stops in group two, which passed 2..64.
    prober = FakeProber(block_at=128)
    tuner = make_tuner([{"p99_ttft": "<=0.375"}, {"p99_ttft": "<=5"}], prober, upper_bound=512)
    task = asyncio.create_task(tuner.run())
    await asyncio.wait_for(prober.blocked.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    first, second = tuner.answers()
    assert first.max_satisfied == 37
    assert first.note == "Satisfied"
    assert second.note == "interrupted: at least 64 passed"
    assert second.max_satisfied is None
    assert (second.last_pass, second.first_fail) == (64, None)
    assert second.probes == 7


async def test_objective_all_client_bound():
    prober = FakeProber(client_bound_from=1)
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=4).run()
    assert answer.max_satisfied is None
    assert answer.note == "no probe passed: client-bound at 1: schedule lateness p99 0.4 s"
    assert prober.values == [4, 8, 2, 1]


async def test_objective_halves_past_failures():
    prober = FakeProber(success_rate=lambda value: 100.0 if value <= 1 else 90.0)
    (answer,) = await make_tuner([{"tps": "max"}], prober, start=8).run()
    assert prober.values == [8, 16, 4, 2, 1]
    assert answer.max_satisfied == 1


def test_range_without_whole_number_rejected():
    with pytest.raises(ConfigError) as caught:
        make_tuner([{"p99_ttft": "<=1"}], FakeProber(), lower_bound=1.2, upper_bound=1.8)
    assert str(caught.value) == (
        "invalid search range [1.2, 1.8] for search.variable=parallel: pass search.lower_bound > 0 "
        "and search.upper_bound >= search.lower_bound with a whole number between them"
    )


async def test_interrupted_answers_in_table():
    from runner.console import render_text, sla_table

    prober = FakeProber(block_at=48)
    tuner = make_tuner([{"p99_ttft": "<=0.375"}, {"p99_ttft": "<=5"}], prober)
    task = asyncio.create_task(tuner.run())
    await asyncio.wait_for(prober.blocked.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    text = render_text([sla_table([answer.to_row() for answer in tuner.answers()])])
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "p99_ttft" in line]
    # Columns: criteria, variable, max satisfied, bracket, probes, note.
    assert [cells[2] for cells in rows] == ["32 so far (interrupted)", "none so far (interrupted)"]
    assert [cells[5] for cells in rows] == ["interrupted: at least 32 passed", "interrupted"]
