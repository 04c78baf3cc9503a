"""Engine timing model in virtual time: exact step schedules for known profiles."""

import asyncio
import math
import random

import pytest

from runner.sim.engine import Engine, EngineCore, Sequence, plan_output
from runner.sim.profile import SimProfile
from runner.sim.virtual import replay

# Step costs chosen so every duration is easy to compute by hand (seconds).
BASE = 0.010
PER_SEQ = 0.001
PER_PREFILL = 0.0001


def make_profile(**overrides) -> SimProfile:
    values = dict(
        step_base=BASE,
        step_per_seq=PER_SEQ,
        step_per_prefill_token=PER_PREFILL,
        max_num_seqs=8,
        kv_cache_tokens=100_000,
        max_batched_tokens=512,
    )
    values.update(overrides)
    return SimProfile(**values)


def make_seq(name: str, prompt: int, tokens: int, arrived_at: float = 0.0) -> Sequence:
    return Sequence(name, prompt_tokens=prompt, max_tokens=tokens, target_tokens=tokens, arrived_at=arrived_at)


def run_virtual(core: EngineCore, arrivals: list[Sequence]) -> list:
    """Run the core until all sequences finish; each joins at the first step start >= its arrival."""
    pending = sorted(arrivals, key=lambda seq: seq.arrived_at)
    steps = []
    now = 0.0
    while pending or not core.idle:
        if core.idle and pending:
            now = max(now, pending[0].arrived_at)
        while pending and pending[0].arrived_at <= now:
            core.add(pending.pop(0))
        step = core.start_step(now)
        assert step is not None
        steps.append(step)
        core.finish_step()
        now = step.started_at + step.duration
    return steps


def test_single_request_timeline():
    core = EngineCore(make_profile())
    seq = make_seq("a", prompt=100, tokens=5)
    steps = run_virtual(core, [seq])

    prefill_step = BASE + PER_SEQ + 100 * PER_PREFILL
    decode_step = BASE + PER_SEQ
    expected = [prefill_step + i * decode_step for i in range(5)]
    assert seq.admitted_at == 0.0
    assert seq.token_times == pytest.approx(expected, abs=1e-12)
    assert seq.finished_at == pytest.approx(expected[-1], abs=1e-12)
    assert len(steps) == 5
    assert steps[0].prefill_tokens == 100
    assert steps[1].decode_tokens == 1
    assert core.kv_used == 0


def test_chunked_prefill_steps():
    core = EngineCore(make_profile(max_batched_tokens=256))
    seq = make_seq("long", prompt=1000, tokens=3)
    steps = run_virtual(core, [seq])

    prefill_steps = math.ceil(1000 / 256)
    assert [step.prefill_tokens for step in steps[:prefill_steps]] == [256, 256, 256, 232]
    first_token_at = sum(step.duration for step in steps[:prefill_steps])
    assert seq.token_times[0] == pytest.approx(first_token_at, abs=1e-12)
    assert first_token_at == pytest.approx(prefill_steps * (BASE + PER_SEQ) + 1000 * PER_PREFILL, abs=1e-12)
    assert len(steps) == prefill_steps + 2


def test_queue_waits_for_free_slots():
    core = EngineCore(make_profile(max_num_seqs=2, step_per_prefill_token=0.0))
    seqs = [make_seq(f"r{i}", prompt=10, tokens=4) for i in range(4)]
    run_virtual(core, seqs)

    step = BASE + 2 * PER_SEQ
    assert seqs[0].admitted_at == 0.0
    assert seqs[1].admitted_at == 0.0
    assert seqs[0].finished_at == pytest.approx(4 * step)
    assert seqs[2].admitted_at == pytest.approx(seqs[0].finished_at)
    assert seqs[3].admitted_at == pytest.approx(seqs[1].finished_at)
    assert seqs[3].finished_at == pytest.approx(8 * step)


def test_kv_cache_limits_admission():
    # Room for two sequences of 10 + 4 tokens, not three.
    core = EngineCore(make_profile(kv_cache_tokens=30, step_per_prefill_token=0.0))
    seqs = [make_seq(f"r{i}", prompt=10, tokens=4) for i in range(3)]
    run_virtual(core, seqs)

    assert seqs[1].admitted_at == 0.0
    assert seqs[2].admitted_at == pytest.approx(seqs[0].finished_at)
    assert not core.fits_ever(27, 4)
    with pytest.raises(ValueError):
        core.add(make_seq("huge", prompt=27, tokens=4))


def test_late_arrival_joins_next_step():
    core = EngineCore(make_profile(step_per_prefill_token=0.0))
    first = make_seq("first", prompt=10, tokens=6)
    late = make_seq("late", prompt=10, tokens=2, arrived_at=0.015)
    run_virtual(core, [first, late])

    one_seq = BASE + PER_SEQ
    # Step 1 ends at 0.011, step 2 (still one sequence) at 0.022; the late one joins at 0.022.
    assert late.admitted_at == pytest.approx(2 * one_seq)
    assert first.token_times[2] - first.token_times[1] == pytest.approx(BASE + 2 * PER_SEQ)


def test_decode_and_prefill_share_budget():
    core = EngineCore(make_profile(max_batched_tokens=64, step_per_prefill_token=0.0))
    running = make_seq("running", prompt=4, tokens=20)
    long = make_seq("long", prompt=200, tokens=1, arrived_at=0.005)
    steps = run_virtual(core, [running, long])

    # One budget token goes to the decoding sequence, so the prompt gets 63 per step: 4 steps.
    assert [step.prefill_tokens for step in steps[1:5]] == [63, 63, 63, 11]
    assert [step.decode_tokens for step in steps[1:5]] == [1, 1, 1, 1]
    assert long.token_times[0] - long.admitted_at == pytest.approx(4 * (BASE + 2 * PER_SEQ))


def test_abort_frees_slot():
    core = EngineCore(make_profile(max_num_seqs=1, step_per_prefill_token=0.0))
    first = make_seq("first", prompt=10, tokens=100)
    second = make_seq("second", prompt=10, tokens=2)
    core.add(first)
    core.add(second)
    core.start_step(0.0)
    core.abort(first)
    assert core.finish_step() == []
    step = core.start_step(0.011)
    assert second.admitted_at == 0.011
    assert step.running == 1
    assert core.kv_used == second.kv_tokens


def test_plan_output_ignore_eos_uses_max_tokens():
    assert plan_output(random.Random(1), 50, 0, True, 0.5) == (50, "length")


def test_plan_output_stops_early_after_min_tokens():
    lengths = [plan_output(random.Random(seed), 100, 10, False, 0.2) for seed in range(200)]
    assert all(10 <= count <= 100 for count, _ in lengths)
    assert any(reason == "stop" for _, reason in lengths)
    assert all(reason == "stop" for count, reason in lengths if count < 100)
    assert plan_output(random.Random(7), 100, 10, False, 0.2) == plan_output(random.Random(7), 100, 10, False, 0.2)


async def test_engine_idles_without_work():
    engine = Engine(make_profile(step_base=0.002, step_per_seq=0.0, step_per_prefill_token=0.0))
    task = asyncio.create_task(engine.run())
    try:
        seq = make_seq("a", prompt=5, tokens=3)
        done = asyncio.Event()
        seq.on_token = lambda s: done.set() if s.done else None
        engine.submit(seq)
        async with asyncio.timeout(2):
            await done.wait()
        steps_after_work = engine.steps
        await asyncio.sleep(0.05)
        assert steps_after_work == 3
        assert engine.steps == steps_after_work
        # Tokens sit on an absolute grid: step ends are exactly 2 ms apart in engine time.
        gaps = [b - a for a, b in zip(seq.token_times, seq.token_times[1:])]
        assert gaps == pytest.approx([0.002, 0.002], abs=1e-9)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_step_admits_only_arrived_sequences():
    core = EngineCore(make_profile(step_per_prefill_token=0.0))
    first = make_seq("first", prompt=10, tokens=6)
    late = make_seq("late", prompt=10, tokens=2, arrived_at=0.005)
    core.add(first)
    core.add(late)

    # A step that starts before the arrival (as when the real-time driver catches up) leaves it waiting.
    step = core.start_step(0.0)
    assert step.running == 1
    assert late.admitted_at is None
    core.finish_step()

    core.start_step(BASE + PER_SEQ)
    assert late.admitted_at == BASE + PER_SEQ


def test_no_step_before_first_arrival():
    core = EngineCore(make_profile())
    core.add(make_seq("later", prompt=10, tokens=2, arrived_at=1.0))
    assert core.start_step(0.5) is None
    assert core.start_step(1.0).running == 1


def test_replay_matches_hand_timeline():
    profile = make_profile(max_num_seqs=1, step_per_prefill_token=0.0)
    # Prompt 10, 2 tokens each; the second arrives while the first runs and waits for its slot.
    first, second = replay(profile, [(0.0, 10, 2), (0.005, 10, 2)])

    one_seq = BASE + PER_SEQ
    assert first.token_times == pytest.approx([one_seq, 2 * one_seq], abs=1e-12)
    assert second.admitted_at == pytest.approx(2 * one_seq, abs=1e-12)
    assert second.token_times == pytest.approx([3 * one_seq, 4 * one_seq], abs=1e-12)


def test_replay_idle_engine_starts_at_arrival():
    (seq,) = replay(make_profile(step_per_prefill_token=0.0), [(2.5, 10, 1)])
    assert seq.admitted_at == 2.5
    assert seq.token_times == pytest.approx([2.5 + BASE + PER_SEQ], abs=1e-12)


def test_replay_keeps_input_order():
    profile = make_profile(step_per_prefill_token=0.0)
    late, early = replay(profile, [(1.0, 10, 1), (0.0, 10, 1)])
    assert late.arrived_at == 1.0
    assert early.token_times == pytest.approx([BASE + PER_SEQ], abs=1e-12)
