"""Warmup requests stay out of every statistic, through the real command line."""

import asyncio
import subprocess
import sys

import pandas as pd
import pytest

from paths import REPO
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline

# The first 10 requests wait 4.5 s for their first token and every later one 0.1 s,
# then 4 tokens follow 10 ms apart.
SLOW = Reply(writes=token_timeline(ttft=4.5, tokens=4, gap=0.01))
FAST = Reply(writes=token_timeline(ttft=0.1, tokens=4, gap=0.01))


@pytest.mark.slow
async def test_warmup_excluded_from_statistics(tmp_path):
    # The server's first request is the runner's one-request preflight check.
    script = [FAST] + [SLOW] * 10 + [FAST]
    async with ScriptedServerProcess(script) as server:
        command = [
            sys.executable, "-m", "runner", "endpoint=openai",
            f"endpoint.url={server.base_url}/v1/chat/completions", "load.parallel=10", "load.number=90",
            "load.warmup=10", "request.max_tokens=4", "dataset.min_prompt_length=8", "dataset.max_prompt_length=8",
            "progress=false", f"hydra.run.dir={tmp_path}",
        ]
        completed = await asyncio.to_thread(subprocess.run, command, cwd=REPO, capture_output=True, text=True,
                                            timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert summary["requests"] == 90
    assert summary["warmup"] == 10
    assert summary["p50_ttft"] == pytest.approx(0.1, abs=0.02)
    assert summary["p99_ttft"] == pytest.approx(0.1, abs=0.02)
    requests = pd.read_csv(tmp_path / "requests.csv")
    assert int(requests["warmup"].sum()) == 10
    assert (requests.loc[requests["warmup"], "ttft"] > 4.4).all()
    measured = requests[~requests["warmup"] & ~requests["cooldown"]]
    assert len(measured) == 90
    assert (measured["ttft"] < 0.2).all()
