"""Bad configuration and data stop the command line with one line on stderr and no traceback.

Each case runs ``python -m runner`` as a subprocess. The expected fragments are the key or
file, the bad value and the fix that the line must name.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

BAD_JSONL = '{"prompt": "first prompt"}\n{"prompt": "second prompt"\n'
BAD_PROFILE = "step_base: [unclosed\n"

# (case id, overrides, fragments the error line must contain). "{tmp}" is the test's folder.
CASES = [
    ("unknown key", ["load.foo=1"], ["load.foo", "unknown key", "parallel"]),
    ("unknown top key", ["foo=1"], ["foo=1", "unknown key"]),
    ("added unknown key", ["+load.foo=1"], ["+load.foo=1: unknown key load.foo", "valid keys of load:", "parallel"]),
    ("added misspelt key", ["+load.paralel=2"], ["unknown key load.paralel", "did you mean load.parallel?"]),
    ("added unknown top key", ["+foo=1"], ["+foo=1: unknown key foo", "valid keys at the top level:", "load"]),
    ("added unknown sla key", ["+sla=custom", 'sla.rules=[{p99_ttft:"<=1"}]', "+sla.colour=blue"],
     ["+sla.colour=blue: unknown key sla.colour", "valid keys of sla: rules"]),
    ("header without plus", ["endpoint.headers.X-Team=infra"],
     ["endpoint.headers.X-Team=infra: unknown key", "+endpoint.headers.X-Team=VALUE"]),
    ("path for random dataset", ["dataset.path={tmp}/bad.jsonl"],
     ["dataset.path is set to", "dataset=random", "dataset.path=null"]),
    ("prefix for file dataset", ["dataset=jsonl", "dataset.path={tmp}/bad.jsonl", "dataset.prefix_length=4"],
     ["dataset.prefix_length", "dataset=jsonl", "dataset.prefix_length=0"]),
    ("wrong type int", ["load.parallel=abc"], ["load.parallel", "abc", "pass an integer"]),
    ("wrong type float", ["load.rate=fast"], ["load.rate", "fast", "pass a number"]),
    ("wrong enum", ["load.arrival=bad"], ["load.arrival", "bad", "poisson"]),
    ("null not allowed", ["model.name=null"], ["model.name", "not null"]),
    ("parse error", ["load.parallel=["], ["load.parallel=[", "syntax"]),
    ("zero parallel", ["load.parallel=0"], ["load.parallel", ">= 1", "got 0"]),
    ("negative parallel", ["load.parallel=-3"], ["load.parallel", "got -3"]),
    ("zero number", ["load.number=0"], ["load.number", "got 0"]),
    ("negative warmup", ["load.warmup=-1"], ["load.warmup", "got -1"]),
    ("zero rate", ["load.rate=0"], ["load.rate", "got 0"]),
    ("negative rate", ["load.rate=-2"], ["load.rate", "got -2"]),
    ("zero duration", ["load.duration=0"], ["load.duration", "got 0"]),
    ("zero burstiness", ["load.burstiness=0"], ["load.burstiness", "got 0"]),
    ("no parallel no rate", ["load.parallel=null"], ["load.parallel", "load.rate is null", "load.parallel=N"]),
    ("min above max", ["dataset.min_prompt_length=200", "dataset.max_prompt_length=100"],
     ["dataset.max_prompt_length", "200", "got 100"]),
    ("zero prompt length", ["dataset.min_prompt_length=0"], ["dataset.min_prompt_length", "got 0"]),
    ("missing dataset file", ["dataset=jsonl", "dataset.path={tmp}/missing.jsonl"],
     ["dataset.path", "missing.jsonl", "not found", "pass an existing file"]),
    ("dataset path is dir", ["dataset=sharegpt", "dataset.path={tmp}"], ["dataset.path", "is a directory"]),
    ("no dataset path", ["dataset=jsonl"], ["dataset.path", "required", "dataset.path="]),
    ("malformed jsonl", ["dataset=jsonl", "dataset.path={tmp}/bad.jsonl"], ["bad.jsonl", "line 2", "invalid JSON"]),
    ("sharegpt text not a string", ["dataset=sharegpt", "dataset.path={tmp}/number.json"],
     ["{tmp}/number.json item [0]: conversations[0].value must be a string, got 42"]),
    ("replay text not a string", ["dataset=replay", "dataset.path={tmp}/number_prompts.jsonl"],
     ["{tmp}/number_prompts.jsonl line 2: field 'text' must be a string, got 42"]),
    ("missing tokenizer", ["model.tokenizer=/no/such/tokenizer"], ["model.tokenizer", "/no/such/tokenizer"]),
    ("unknown metric", ["+sla=custom", 'sla.rules=[{p99_foo:"<=1"}]'], ["p99_foo", "allowed"]),
    ("unknown operator", ["+sla=custom", 'sla.rules=[{p99_ttft:"~1"}]'], ["p99_ttft", "~1"]),
    ("empty rule list", ["+sla=custom", "sla.rules=[]"], ["sla.rules", "empty", "rule group"]),
    ("rules without sla", ['sla.rules=[{p99_ttft:"<=1"}]'], ["sla.rules", "+sla=custom"]),
    ("rules added without sla", ['+sla.rules=[{p99_ttft:"<=1"}]'],
     ['+sla.rules=[{p99_ttft:"<=1"}]: sla is null because no SLA rule set is selected',
      """write +sla=custom 'sla.rules=[{p99_ttft:"<=1"}]' instead"""]),
    ("sla given as mapping", ['+sla={rules:[{p99_ttft:"<=1"}]}'],
     ["sla is a config group", """write +sla=custom 'sla.rules=[{p99_ttft: "<=1"}]'"""]),
    ("rules as mapping", ["+sla=custom", 'sla.rules={p99_ttft:"<=1"}'],
     ['sla.rules={p99_ttft:"<=1"}: sla.rules must be a list of rule groups, got a mapping',
      """'sla.rules=[{p99_ttft: "<=1"}]'"""]),
    ("rules as string", ["+sla=custom", "sla.rules=fast"],
     ["sla.rules=fast: sla.rules must be a list of rule groups", """'sla.rules=[{p99_ttft: "<=0.05"}]'"""]),
    ("rules as mapping in file", ["+sla=mapping_rules", "hydra.searchpath=[file://{tmp}/conf]"],
     ["sla=mapping_rules: rules in that config file must be a list", 'rules: [{p99_ttft: "<=0.05"}]']),
    ("headers as list", ["endpoint.headers=[a]"],
     ["endpoint.headers=[a]: endpoint.headers must be a mapping such as {NAME: VALUE}, got a list"]),
    ("rate search without rate", ["+sla=ttft_strict", "search.variable=rate"], ["load.rate", "search.variable=rate"]),
    ("start outside range", ["+sla=ttft_strict", "search.lower_bound=8", "load.parallel=4"],
     ["load.parallel", "search.lower_bound", "got 4"]),
    ("upper below lower", ["search.lower_bound=4", "search.upper_bound=2"], ["search.upper_bound", "got 2"]),
    ("zero runs", ["search.num_runs=0"], ["search.num_runs", "got 0"]),
    ("rate resolution above one", ["search.rate_resolution=2"], ["search.rate_resolution", "got 2"]),
    ("negative tail noise", ["search.tail_noise=-1"], ["search.tail_noise", ">= 0", "got -1"]),
    ("zero max tokens", ["request.max_tokens=0"], ["request.max_tokens", "got 0"]),
    ("min tokens above max", ["request.min_tokens=500"], ["request.min_tokens", "got 500"]),
    ("negative temperature", ["request.temperature=-1"], ["request.temperature", "got -1"]),
    ("zero read timeout", ["endpoint.read_timeout=0"], ["endpoint.read_timeout", "got 0"]),
    ("url not a url", ["endpoint=openai", "endpoint.url=notaurl"], ["endpoint.url", "notaurl", "http"]),
    ("wrong api path", ["endpoint.url=/v2/generate"], ["endpoint.url", "/v2/generate", "/v1/chat/completions"]),
    ("unset key variable", ["endpoint.api_key_env=RUNNER_TEST_UNSET_KEY"],
     ["endpoint.api_key_env", "RUNNER_TEST_UNSET_KEY", "export it"]),
    ("unknown group option", ["endpoint=nope"], ["endpoint=nope", "openai", "sim"]),
    ("unknown sla option", ["+sla=nope"], ["sla=nope", "ttft_strict"]),
    ("unknown sim profile", ["model.sim_profile=nope"], ["nope", "not found", "default"]),
    ("invalid sim profile file", ["model.sim_profile={tmp}/bad_profile.yaml"], ["bad_profile.yaml", "YAML"]),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "bad.jsonl").write_text(BAD_JSONL, encoding="utf-8")
    (tmp_path / "bad_profile.yaml").write_text(BAD_PROFILE, encoding="utf-8")
    (tmp_path / "number.json").write_text('[{"conversations": [{"from": "human", "value": 42}]}]\n', encoding="utf-8")
    (tmp_path / "number_prompts.jsonl").write_text('{"text": "first"}\n{"text": 42}\n', encoding="utf-8")
    # A rule set whose rules are a mapping instead of a list of groups.
    (tmp_path / "conf" / "sla").mkdir(parents=True)
    (tmp_path / "conf" / "sla" / "mapping_rules.yaml").write_text('rules:\n  p99_ttft: "<=1"\n', encoding="utf-8")
    return tmp_path


def run_cli(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in overrides]
    env = {key: value for key, value in os.environ.items() if key != "RUNNER_TEST_UNSET_KEY"}
    return subprocess.run([sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path}/run", "progress=false", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides,fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_one_line(bad_files, overrides, fragments):
    done = run_cli(bad_files, overrides)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(bad_files)) in lines[0]
    assert not (bad_files / "run" / "requests.csv").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides", [["load.parallel=0"], ["load.foo=1"]], ids=["config check", "hydra"])
def test_debug_shows_traceback(tmp_path, overrides):
    done = run_cli(tmp_path, [*overrides, "debug=true"])

    assert done.returncode != 0
    assert "Traceback" in done.stderr


RAY_INSTALLED = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(RAY_INSTALLED, reason="the ray extra is installed")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("override, line", [
    ("load.backend=ray", "error: load.backend=ray needs the ray package, which is not installed; "
                         "run pip install -e '.[ray]' in the runner's folder, or set load.backend=process"),
    ("load.ray_address=ray://127.0.0.1:10001",
     "error: load.ray_address=ray://127.0.0.1:10001 needs the ray package, which is not installed; "
     "run pip install -e '.[ray]' in the runner's folder, or set load.ray_address=null"),
], ids=["backend", "address"])
def test_missing_ray_rejected_before_setup(tmp_path, override, line):
    done = run_cli(tmp_path, [override])

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [line]
    # Rejected before the simulated server started, and the empty run folder is gone.
    assert "simulated server" not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()


def module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


JOBLIB_INSTALLED = module_installed("hydra_plugins.hydra_joblib_launcher")


@pytest.mark.skipif(JOBLIB_INSTALLED, reason="hydra-joblib-launcher is installed")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [[], ["-m"]], ids=["run", "multirun"])
def test_missing_launcher_plugin_one_line(tmp_path, mode):
    done = subprocess.run([sys.executable, "-m", "runner", *mode, f"hydra.run.dir={tmp_path}/run",
                           f"hydra.sweep.dir={tmp_path}/sweep", "progress=false", "hydra/launcher=joblib"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: hydra/launcher=joblib needs the Hydra launcher plugin hydra-joblib-launcher, which is not "
        "installed; run pip install hydra-joblib-launcher (or pip install -e '.[launchers]' in the runner's folder)"
    ]
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "sweep").exists()


def test_cases_cover_thirty_inputs():
    assert len(CASES) >= 30
