"""Load plans of SLA probe repeats: sizes, warmup and arrival-schedule seeds."""

from runner.config import LoadConfig, RunConfig, SearchConfig, SearchVariable, SlaConfig
from runner.load import arrival_offsets
from runner.prober import probe_plan, repeat_seed

RULES = SlaConfig(rules=[{"p99_ttft": "<=0.15"}])


def rate_config(seed: int = 7) -> RunConfig:
    return RunConfig(
        load=LoadConfig(parallel=None, rate=8.0, warmup=4, seed=seed),
        search=SearchConfig(variable=SearchVariable.rate, rate_repeat_seconds=10.0, rate_parallel_cap=64),
        sla=RULES,
    )


def test_repeat_seeds_are_stable():
    assert repeat_seed(7, 24.5, 3) == repeat_seed(7, 24.5, 3)


def test_repeat_seed_same_for_int_and_float_value():
    # A resumed run reads values back as floats.
    assert repeat_seed(7, 16, 0) == repeat_seed(7, 16.0, 0)


def test_repeat_seeds_never_shared():
    # Seeds 1, 2 and 3, two rates and 15 repeats each give 90 different schedules.
    seeds = [repeat_seed(seed, value, repeat) for seed in (1, 2, 3) for value in (24.0, 25.0) for repeat in range(15)]
    assert len(set(seeds)) == len(seeds)


def test_rate_probe_plan_size():
    plan = probe_plan(rate_config(), 24.5, 0, first_id=100)
    assert plan.rate == 24.5
    # 10 s of arrivals at 24.5 requests/s, after one second of warmup arrivals.
    assert plan.number == 245
    assert plan.warmup == 25
    assert plan.parallel == 64
    assert plan.first_id == 100
    assert plan.seed == repeat_seed(7, 24.5, 0)


def test_rate_repeat_schedules_differ_across_rates():
    config = rate_config()
    slow = arrival_offsets(probe_plan(config, 10.0, 2))
    fast = arrival_offsets(probe_plan(config, 20.0, 2))
    # Scaled by the rate, the gaps of one schedule would repeat those of the other.
    assert fast[1:50] != [offset / 2 for offset in slow[1:50]]


def test_parallel_probe_plan_size():
    config = RunConfig(
        load=LoadConfig(parallel=4, warmup=4, seed=3),
        search=SearchConfig(variable=SearchVariable.parallel, requests_per_unit=4.0, min_requests=100),
        sla=RULES,
    )
    plan = probe_plan(config, 32, 1)
    assert plan.parallel == 32
    assert plan.rate is None
    assert plan.number == 128
    assert plan.warmup == 32
    assert plan.seed == repeat_seed(3, 32, 1)


def test_plain_run_plan_uses_load_seed():
    config = RunConfig(load=LoadConfig(parallel=4, number=50, warmup=2, seed=9))
    plan = probe_plan(config, 4, 0)
    assert (plan.parallel, plan.number, plan.warmup, plan.seed) == (4, 50, 2, 9)
