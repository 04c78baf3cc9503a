"""Statistics of one load point, checked against values computed by hand."""

import math

import pandas as pd
import pytest

from runner.metrics import count_checks, describe, meets_bounds, summarize


def row(request_id, *, sent, ended, ttft=None, tpot=None, tokens=10, prompt=100, success=True,
        warmup=False, repeat=0, itl=(), scheduled=None):
    return {
        "request_id": request_id, "repeat": repeat, "warmup": warmup, "success": success,
        "scheduled_at": sent if scheduled is None else scheduled, "sent_at": sent, "ended_at": ended,
        "latency": ended - sent if success else None, "ttft": ttft, "tpot": tpot,
        "completion_tokens": tokens, "prompt_tokens": prompt, "itl": list(itl),
    }


def test_describe_linear_percentiles():
    stats = describe([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], "ttft")
    assert stats["avg_ttft"] == pytest.approx(5.5)
    assert stats["p50_ttft"] == pytest.approx(5.5)
    assert stats["p90_ttft"] == pytest.approx(9.1)
    assert stats["p99_ttft"] == pytest.approx(9.91)


def test_describe_skips_undefined():
    stats = describe([math.nan, 2.0, math.nan, 4.0], "tpot")
    assert stats["avg_tpot"] == pytest.approx(3.0)
    assert math.isnan(describe([math.nan], "tpot")["p99_tpot"])


def test_summary_excludes_warmup_and_failures():
    frame = pd.DataFrame([
        row(0, sent=0.0, ended=50.0, ttft=45.0, tpot=0.5, warmup=True),
        row(1, sent=1.0, ended=3.0, ttft=1.0, tpot=0.1, itl=[0.1, 0.1]),
        row(2, sent=2.0, ended=5.0, ttft=1.0, tpot=0.2, itl=[0.2, 0.2, 0.2]),
        row(3, sent=3.0, ended=4.0, success=False, tokens=2),
    ])
    summary = summarize(frame)
    assert summary["requests"] == 3
    assert summary["warmup"] == 1
    assert summary["failures"] == 1
    assert summary["success_rate"] == pytest.approx(200 / 3)
    # Window: first measured send (1.0) to last measured end (5.0).
    assert summary["duration"] == pytest.approx(4.0)
    assert summary["rps"] == pytest.approx(2 / 4.0)
    assert summary["tps"] == pytest.approx(20 / 4.0)
    assert summary["total_tps"] == pytest.approx(220 / 4.0)
    assert summary["p99_ttft"] == pytest.approx(1.0)
    assert summary["avg_latency"] == pytest.approx(2.5)
    assert summary["avg_itl"] == pytest.approx(0.16)
    assert summary["goodput"] == pytest.approx(summary["rps"])


def test_repeats_pool_samples_and_windows():
    frame = pd.DataFrame([
        row(0, sent=0.0, ended=1.0, ttft=0.1, repeat=0),
        row(1, sent=0.5, ended=2.0, ttft=0.2, repeat=0),
        row(2, sent=10.0, ended=11.0, ttft=0.3, repeat=1),
        row(3, sent=10.0, ended=13.0, ttft=0.4, repeat=1),
    ])
    summary = summarize(frame)
    # Windows 2.0 + 3.0; the idle gap between repeats does not count.
    assert summary["duration"] == pytest.approx(5.0)
    assert summary["rps"] == pytest.approx(4 / 5.0)
    # Pooled samples [0.1, 0.2, 0.3, 0.4], never the mean of per-repeat percentiles.
    assert summary["p50_ttft"] == pytest.approx(0.25)
    assert summary["p99_ttft"] == pytest.approx(0.397)
    assert summary["runs"] == 2


def test_goodput_counts_requests_within_bounds():
    frame = pd.DataFrame([
        row(0, sent=0.0, ended=2.0, ttft=0.1, tpot=0.01),
        row(1, sent=0.0, ended=2.0, ttft=0.6, tpot=0.01),
        row(2, sent=0.0, ended=2.0, ttft=0.2, tpot=0.09),
        row(3, sent=0.0, ended=2.0, ttft=0.2, tpot=None, tokens=1),
    ])
    passing = meets_bounds(frame, {"ttft": 0.5, "tpot": 0.05})
    assert passing.tolist() == [True, False, False, True]
    assert summarize(frame, {"ttft": 0.5, "tpot": 0.05})["goodput"] == pytest.approx(2 / 2.0)


def test_lateness_percentiles():
    frame = pd.DataFrame([row(i, sent=i + 0.01 * i, ended=i + 5.0, scheduled=float(i)) for i in range(11)])
    summary = summarize(frame)
    assert summary["lateness_p50"] == pytest.approx(0.05)
    assert summary["lateness_p99"] == pytest.approx(0.099)


def test_count_checks_flag_disagreements():
    frame = pd.DataFrame({
        "completion_tokens": [128, 100, 128, 64],
        "max_tokens": [128, 128, 128, 128],
        "prompt_tokens": [157, 157, 190, 157],
        "expected_prompt_tokens": [157, 158, 157, None],
        "tokenizer_tokens": [128, 100, 120, None],
    })
    checks = count_checks(frame)
    # 100 and 64 of 128 are below 90 %.
    assert checks["short_outputs"] == 2
    # 190 against 157 is off by 33 tokens; 158 against 157 is within 2 tokens.
    assert checks["prompt_tokens_mismatch"] == 1
    # 120 against 128 is off by 8, more than 5 % of 128 (6.4).
    assert checks["completion_tokens_mismatch"] == 1


def test_closed_loop_rps_from_slot_time():
    # Two slots; each request occupies its slot from scheduled_at to ended_at.
    frame = pd.DataFrame([
        row(0, sent=0.0, ended=1.0, ttft=0.1, scheduled=0.0),
        row(1, sent=0.0, ended=1.0, ttft=0.1, scheduled=0.0),
        row(2, sent=1.0, ended=2.0, ttft=0.1, scheduled=1.0),
        # The last wave has one measured request; a cooldown request filled the other slot.
        row(3, sent=2.0, ended=3.0, ttft=0.1, scheduled=2.0),
    ])
    summary = summarize(frame, parallel=2)
    # 4 requests over 4 slot-seconds / 2 slots = 2 req/s, whatever the wave count.
    assert summary["rps"] == pytest.approx(2.0)
    # The span from first send to last end (3 s) would give 1.33 req/s.
    assert summarize(frame)["rps"] == pytest.approx(4 / 3)


def test_open_loop_rps_from_send_span():
    frame = pd.DataFrame([row(i, sent=0.5 * i, ended=0.5 * i + 2.0, ttft=0.1) for i in range(5)])
    # Five sends 0.5 s apart span five gaps (2.5 s); draining the last one is left out.
    assert summarize(frame, open_loop=True)["rps"] == pytest.approx(5 / 2.5)


def test_recommendation_names_saturation():
    from runner.console import recommendations

    flat = pd.DataFrame({"parallel": [4, 8, 16, 32], "rate": [math.nan] * 4, "rps": [16.0, 25.0, 33.5, 34.3],
                         "success_rate": [100.0] * 4})
    assert recommendations(flat) == [
        "Throughput saturates near parallel 16 (34.30 req/s at most); higher load only adds latency"]
    climbing = flat.assign(rps=[10.0, 20.0, 30.0, 40.0])
    assert recommendations(climbing) == [
        "The system seems not to have reached its performance bottleneck, try a higher parallel"]


# A parallel tune whose throughput still climbs at the highest load probed.
CLIMBING = pd.DataFrame({"parallel": [4, 5, 6, 8], "rate": [math.nan] * 4, "rps": [10.0, 12.5, 15.0, 20.0],
                         "success_rate": [100.0] * 4})


def sla_row(criteria, max_satisfied, last_pass, first_fail, note):
    return {"criteria": criteria, "variable": "parallel", "max_satisfied": max_satisfied, "note": note,
            "probes": 4, "seconds": 1.0, "last_pass": last_pass, "first_fail": first_fail}


def test_tune_advice_without_higher_load():
    from runner.console import SearchRange, recommendations

    rows = [sla_row("p99_ttft <= 0.03", 5, 5, 6, "Satisfied")]

    assert recommendations(CLIMBING, rows, SearchRange("parallel", 1, 16)) == []


@pytest.mark.parametrize(("row", "search", "line"), [
    (sla_row("p99_ttft <= 0.15", 8, 8, None, "upper bound reached"), ("parallel", 1, 8),
     "SLA 1 (p99_ttft <= 0.15): every probe passed up to the upper bound 8; raise search.upper_bound (now 8) "
     "to look further up"),
    (sla_row("p99_ttft <= 0.001", None, None, 1, "failed at lower bound"), ("parallel", 1, 8),
     "SLA 1 (p99_ttft <= 0.001): no load passed, not even parallel 1, so no concurrency meets these rules; "
     "relax the rules or check the server"),
    (sla_row("p99_ttft <= 0.001", None, None, 4, "failed at lower bound"), ("parallel", 4, 8),
     "SLA 1 (p99_ttft <= 0.001): no load passed down to parallel 4; lower search.lower_bound (now 4) "
     "to look further down"),
    (sla_row("tps -> max", 8, 7, None, "Best tps: 617.4176"), ("parallel", 1, 8),
     "SLA 1 (tps -> max): the best load is the upper bound 8; raise search.upper_bound (now 8) to look further up"),
    (sla_row("tps -> max", 2, 2, 3, "Best tps: 617.4176"), ("parallel", 2, 8),
     "SLA 1 (tps -> max): the best load is the lower bound 2; lower search.lower_bound (now 2) to look further down"),
], ids=["upper bound reached", "nothing passed at 1", "nothing passed at 4", "objective at upper", "objective at lower"])
def test_tune_advice_names_bound(row, search, line):
    from runner.console import SearchRange, recommendations

    assert recommendations(CLIMBING, [row], SearchRange(*search)) == [line]


@pytest.mark.parametrize("note", ["client-bound at 8: schedule lateness p99 0.4 s", "interrupted: at least 4 passed"])
def test_tune_advice_skips_client_bound(note):
    from runner.console import SearchRange, recommendations

    rows = [sla_row("p99_ttft <= 0.15", 4, 4, None, note)]

    assert recommendations(CLIMBING, rows, SearchRange("parallel", 1, 8)) == []


def test_sla_table_bracket_without_fail():
    from runner.console import render_text, sla_table

    text = render_text([sla_table([sla_row("p99_ttft <= 0.15", 8, 8, None, "upper bound reached"),
                                   sla_row("p99_ttft <= 0.03", 5, 5, 6, "Satisfied")])])

    assert "│ none failed up to 8 │" in text
    assert "│ [5, 6)              │" in text


def test_progress_counts_probes_without_total():
    import io

    from rich.console import Console

    from runner.console import make_progress

    buffer = io.StringIO()
    with make_progress(Console(file=buffer, width=120, force_terminal=True, color_system=None), True) as progress:
        search = progress.add_task("SLA search", total=None, status="", unit="probes")
        repeat = progress.add_task("parallel 4 run 1", total=40, status="")
        progress.update(search, advance=3)
        progress.update(repeat, advance=12)

    final = buffer.getvalue().rsplit("\r", 1)[-1]
    assert "3 probes done" in final
    assert "12/40" in final
    assert "/?" not in buffer.getvalue()
