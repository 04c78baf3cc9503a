"""The load testers the peer benchmark compares: how to install, run and read each one.

Each peer is pinned to one version and installed from PyPI into its own virtual
environment under `.bench/venvs/<name>`. An environment whose marker file names the same
pinned requirements is reused. The command lines follow each tool's documented options for
that version: a closed loop at a fixed concurrency, and where the tool has one, a fixed
request rate. Every tool runs offline with a local tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from bench.common import REPO

VENVS = REPO / ".bench" / "venvs"
TOKENIZER = REPO / "runner" / "tokenizers" / "qwen2.5"
MODEL = "bench"
PROMPT_TOKENS = 100
# Seconds one `pip install` may take; the largest (guidellm with torch) took about 2 minutes.
INSTALL_TIMEOUT = 1200
# aiperf 0.13 in offline mode treats a tokenizer directory as a hub repository id, so the
# tokenizer is placed as a local hub-cache entry under this id.
AIPERF_TOKENIZER_ID = "local/qwen2.5"
NULL_REVISION = "0" * 40


@dataclass
class Timing:
    """A tool's own TTFT and token-gap statistics, in seconds."""

    ttft_mean: float
    ttft_p99: float
    # The tool's inter-token latency: the mean gap between output tokens, first token excluded.
    itl_mean: float


class Tool:
    """One load tester; subclasses give its install, command lines and result readers."""

    name = ""
    # pip requirement lists, installed in order (guidellm needs the CPU torch first).
    requirements: list[list[str]] = []
    # Whether its fixed-rate schedule is evenly spaced, so server arrivals can be checked against it.
    constant_rate = True

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    def installed(self) -> bool:
        marker = self.venv / ".installed"
        return marker.exists() and marker.read_text() == json.dumps(self.requirements)

    def install(self) -> None:
        """Create the tool's virtual environment and install its pinned packages (skipped if done)."""
        if self.installed():
            return
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(self.venv)], check=True, timeout=300)
        pip = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, timeout=INSTALL_TIMEOUT)
        for requirement in self.requirements:
            subprocess.run([*pip, *requirement], check=True, timeout=INSTALL_TIMEOUT)
        (self.venv / ".installed").write_text(json.dumps(self.requirements))

    def version(self) -> str:
        package = self.requirements[-1][0].split("[")[0].split("=")[0]
        found = sorted(self.venv.glob(f"lib/python*/site-packages/{package}-*.dist-info"))
        return found[-1].name.removesuffix(".dist-info").split("-")[1] if found else "not installed"

    def closed_loop(self, base_url: str, concurrency: int, number: int, tokens: int, out: Path) -> list[str]:
        raise NotImplementedError

    def fixed_rate(self, base_url: str, rate: float, number: int, tokens: int, out: Path) -> Optional[list[str]]:
        """Return the fixed-rate command line, or None when the tool has no fixed-rate mode."""
        return None

    def timing(self, out: Path) -> Timing:
        raise NotImplementedError

    def client_lateness(self, out: Path) -> Optional[np.ndarray]:
        """Return per-request schedule lateness in seconds as the tool recorded it, if it does."""
        return None

    def client_bound(self, out: Path) -> Optional[bool]:
        """Return whether the tool flagged the run as limited by itself, if it flags runs at all."""
        return None


class Ours(Tool):
    name = "runner"

    def installed(self) -> bool:
        return True

    def install(self) -> None:
        pass

    def version(self) -> str:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return f"git {completed.stdout.strip() or 'unknown'}"

    def _base(self, base_url: str, number: int, tokens: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "runner", "endpoint=openai", f"endpoint.url={base_url}/v1/chat/completions",
                f"hydra.run.dir={out}", "progress=false", f"load.number={number}", "load.warmup=0",
                f"request.max_tokens={tokens}", f"dataset.min_prompt_length={PROMPT_TOKENS}",
                f"dataset.max_prompt_length={PROMPT_TOKENS}"]

    def closed_loop(self, base_url: str, concurrency: int, number: int, tokens: int, out: Path) -> list[str]:
        # Calibration off: the peers have no such step, and under load.calibrate=auto the
        # 2,000-request ceiling runs would add its fixed cost (bench/calibration.py) to their CPU.
        return [*self._base(base_url, number, tokens, out), f"load.parallel={concurrency}", "load.calibrate=false"]

    def fixed_rate(self, base_url: str, rate: float, number: int, tokens: int, out: Path) -> list[str]:
        # Calibration stays as users get it (auto: on from 1,000 requests), because its ceiling
        # is what flags rates the client cannot deliver. Its cost is in these rows' CPU.
        return [*self._base(base_url, number, tokens, out), f"load.rate={rate}", "load.arrival=constant",
                "load.parallel=null"]

    def timing(self, out: Path) -> Timing:
        summary = pd.read_csv(out / "summary.csv").iloc[0]
        return Timing(summary["avg_ttft"], summary["p99_ttft"], summary["avg_itl"])

    def client_lateness(self, out: Path) -> np.ndarray:
        requests = pd.read_csv(out / "requests.csv")
        return (requests["sent_at"] - requests["scheduled_at"]).dropna().to_numpy()

    def client_bound(self, out: Path) -> bool:
        return bool(pd.read_csv(out / "summary.csv").iloc[0]["client_bound"])


class Evalscope(Tool):
    name = "evalscope"
    requirements = [["evalscope[perf]==1.14.1"]]
    # evalscope 1.14's --rate draws Poisson inter-arrival gaps.
    constant_rate = False

    def _base(self, base_url: str, number: int, tokens: int, out: Path) -> list[str]:
        return [str(self.venv / "bin" / "evalscope"), "perf", "--model", MODEL,
                "--url", f"{base_url}/v1/chat/completions", "--api", "openai", "--tokenizer-path", str(TOKENIZER),
                "--dataset", "random", "--min-prompt-length", str(PROMPT_TOKENS),
                "--max-prompt-length", str(PROMPT_TOKENS), "--prefix-length", "0", "--max-tokens", str(tokens),
                "--number", str(number), "--stream", "--outputs-dir", str(out), "--no-timestamp"]

    def closed_loop(self, base_url: str, concurrency: int, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--parallel", str(concurrency)]

    def fixed_rate(self, base_url: str, rate: float, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--open-loop", "--rate", str(rate)]

    def timing(self, out: Path) -> Timing:
        summary_path = next(out.glob("*/*/benchmark_summary.json"))
        summary = json.loads(summary_path.read_text())
        percentiles = json.loads((summary_path.parent / "benchmark_percentile.json").read_text())
        p99 = next(row for row in percentiles if row["Percentiles"] == "99%")
        return Timing(summary["Avg TTFT (ms)"] / 1000, p99["TTFT (ms)"] / 1000, summary["Avg ITL (ms)"] / 1000)


class Aiperf(Tool):
    name = "aiperf"
    requirements = [["aiperf==0.13.0"]]

    def _base(self, base_url: str, number: int, tokens: int, out: Path) -> list[str]:
        return [str(self.venv / "bin" / "aiperf"), "profile", "--model", MODEL, "--url", base_url,
                "--endpoint-type", "chat", "--streaming", "--tokenizer", AIPERF_TOKENIZER_ID,
                "--isl", str(PROMPT_TOKENS), "--osl", str(tokens), "--request-count", str(number),
                "--ui", "none", "--artifact-dir", str(out)]

    def closed_loop(self, base_url: str, concurrency: int, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--concurrency", str(concurrency)]

    def fixed_rate(self, base_url: str, rate: float, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--request-rate", str(rate),
                "--arrival-pattern", "constant"]

    def timing(self, out: Path) -> Timing:
        data = json.loads((out / "profile_export_aiperf.json").read_text())
        ttft, itl = data["time_to_first_token"], data["inter_token_latency"]
        return Timing(ttft["avg"] / 1000, ttft["p99"] / 1000, itl["avg"] / 1000)

    def client_lateness(self, out: Path) -> Optional[np.ndarray]:
        # credit_issued_ns is when the timing process scheduled the request, request_start_ns
        # when a worker sent it.
        late = []
        for line in (out / "profile_export.jsonl").read_text().splitlines():
            meta = json.loads(line)["metadata"]
            late.append((meta["request_start_ns"] - meta["credit_issued_ns"]) / 1e9)
        return np.array(late)


class Guidellm(Tool):
    name = "guidellm"
    # guidellm depends on torch, which is installed first so that pip keeps it.
    # NOTE: on the benchmark machine pip's local wheel index resolves this pin to a CPU-only
    # build; plain PyPI serves the multi-gigabyte CUDA build for Linux instead.
    requirements = [["torch==2.13.0"], ["guidellm==0.8.1"]]

    def _base(self, base_url: str, number: int, tokens: int, out: Path) -> list[str]:
        return [str(self.venv / "bin" / "guidellm"), "run",
                # The scripted timing server handles only POST requests, so the GET /health check is off.
                "--backend", f"kind=openai_http,target={base_url},model={MODEL},"
                             "request_format=/v1/chat/completions,validate_backend=false",
                "--constraint", f"kind=max_requests,count={number}",
                "--tokenizer", f"kind=huggingface_auto,model={TOKENIZER}",
                "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={tokens}",
                "--output", f"kind=json,path={out / 'guidellm.json'}", "--disable-progress"]

    def closed_loop(self, base_url: str, concurrency: int, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--profile", f"kind=concurrent,streams={concurrency}"]

    def fixed_rate(self, base_url: str, rate: float, number: int, tokens: int, out: Path) -> list[str]:
        return [*self._base(base_url, number, tokens, out), "--profile", f"kind=constant,rate={rate}"]

    def _benchmark(self, out: Path) -> dict[str, Any]:
        return json.loads((out / "guidellm.json").read_text())["benchmarks"][0]

    def timing(self, out: Path) -> Timing:
        metrics = self._benchmark(out)["metrics"]
        ttft = metrics["time_to_first_token_ms"]["successful"]
        itl = metrics["inter_token_latency_ms"]["successful"]
        return Timing(ttft["mean"] / 1000, ttft["percentiles"]["p99"] / 1000, itl["mean"] / 1000)

    def client_lateness(self, out: Path) -> Optional[np.ndarray]:
        timings = [request["info"]["timings"] for request in self._benchmark(out)["requests"]["successful"]]
        late = [t["request_start"] - t["targeted_start"] for t in timings
                if t.get("request_start") is not None and t.get("targeted_start") is not None]
        return np.array(late)


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (Ours(), Evalscope(), Aiperf(), Guidellm())}


def offline_env(hf_home: Path) -> dict[str, str]:
    """Return the environment every tool runs in: offline, with a scratch HF_HOME holding the tokenizer."""
    snapshot = hf_home / "hub" / f"models--{AIPERF_TOKENIZER_ID.replace('/', '--')}" / "snapshots" / NULL_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).write_bytes((TOKENIZER / name).read_bytes())
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(NULL_REVISION)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(hf_home),
               TRANSFORMERS_VERBOSITY="error")
    return env
