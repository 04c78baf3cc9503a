"""The runner's command line against the real llama.cpp server: a benchmark and an SLA tune."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.engine

MAX_TOKENS = 32
PROMPT_TOKENS = 32
NUMBER = 20
WARMUP = 2


def endpoint_overrides(engine, output_dir) -> list[str]:
    return [
        "endpoint=openai",
        f"endpoint.url={engine.chat_url}",
        f"model.name={engine.model}",
        f"dataset.min_prompt_length={PROMPT_TOKENS}",
        f"dataset.max_prompt_length={PROMPT_TOKENS}",
        "request.ignore_eos=true",
        "progress=false",
        f"hydra.run.dir={output_dir}",
    ]


def test_benchmark_all_requests_succeed(engine, run_runner, tmp_path):
    run_runner(
        *endpoint_overrides(engine, tmp_path),
        "load.parallel=4",
        f"load.number={NUMBER}",
        f"load.warmup={WARMUP}",
        f"request.max_tokens={MAX_TOKENS}",
    )

    every = pd.read_csv(tmp_path / "requests.csv")
    # Cooldown requests only keep the slots busy until the last measured one ends; they are
    # cancelled then, so they are checked apart.
    requests = every[~every["cooldown"]]
    assert len(requests) == NUMBER + WARMUP
    assert every.loc[every["cooldown"] & ~every["success"], "error"].eq("cancelled").all()
    assert int(requests["warmup"].sum()) == WARMUP
    # llama-server closes the connection after every stream (see
    # test_stream_closes_connection), so a client that reuses it from its
    # pool fails here with "Can not write request body".
    failures = requests.loc[~requests["success"], ["request_id", "error"]]
    assert failures.empty, f"failed requests:\n{failures.to_string()}"
    assert (requests["completion_tokens"] == MAX_TOKENS).all()
    assert (requests["token_source"] == "usage").all()
    assert (requests["finish_reason"] == "length").all()
    # The chat template adds Qwen's default system prompt around the user's text.
    assert (requests["prompt_tokens"] > PROMPT_TOKENS).all()
    assert (requests["ttft"] > 0).all()
    assert (requests["latency"] >= requests["ttft"]).all()
    assert requests["tpot"].notna().all()

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["parallel"] == 4
    assert row["requests"] == NUMBER
    assert row["success_rate"] == 100.0
    assert row["tps"] > 0


def test_sla_tune_finds_max_parallel(engine, run_runner, tmp_path):
    # The server has 8 slots. Up to 8 streams, TTFT is one prompt pass plus a
    # decode step, tens of ms here. From 9 streams on, a request waits for a
    # free slot, which adds a whole 64-token generation (about 0.4 s). So the
    # 0.2 s bound is met at low concurrency and fails above 8.
    run_runner(
        *endpoint_overrides(engine, tmp_path),
        "+sla=custom",
        "sla.rules=[{p99_ttft: '<=0.2'}]",
        "load.parallel=1",
        "load.warmup=0",
        "request.max_tokens=64",
        "search.lower_bound=1",
        "search.upper_bound=16",
        "search.num_runs=1",
        "search.min_requests=16",
        "search.requests_per_unit=2",
        "search.max_requests=32",
        "search.max_extra_runs=0",
        timeout=240,
    )

    sla = pd.read_csv(tmp_path / "sla_summary.csv")
    assert len(sla) == 1
    max_satisfied = sla.iloc[0]["max_satisfied"]
    assert pd.notna(max_satisfied), f"no load met the rule: {sla.iloc[0].to_dict()}"
    assert 1 <= max_satisfied <= 8

    requests = pd.read_csv(tmp_path / "requests.csv")
    assert requests.loc[~requests["cooldown"], "success"].all()
    # The search must have seen the rule fail, at 16 at the latest.
    assert requests["value"].max() > max_satisfied
