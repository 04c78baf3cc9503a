"""python -m runner.replay: re-running an archived run from its folder alone."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from runner.compare import compare
from runner.config import DatasetKind, RunConfig
from runner.data import replay_prompts
from runner.errors import DataError
from runner.replay import main, replay_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# A short run on the simulated server's default profile: 12 measured requests of 16 prompt
# and 16 output tokens at concurrency 4, about 0.1 s per request.
SHORT_RUN = ["load.number=12", "request.max_tokens=16", "dataset.min_prompt_length=16",
             "dataset.max_prompt_length=16", "progress=false"]

# On the default profile (16 batch slots) p99 TTFT is about 35 ms at concurrency 16 and above
# 0.15 s at 17, where one request always waits for a slot, so the search returns exactly 16.
# With margins this wide, tail_noise=0 keeps every probe to one repeat.
SLA_RUN = ["+sla=custom", 'sla.rules=[{p99_ttft:"<=0.1"}]', "load.parallel=16", "search.lower_bound=8",
           "search.upper_bound=20", "search.num_runs=1", "search.min_requests=24", "search.requests_per_unit=0",
           "search.max_requests=48", "search.tail_noise=0", "request.max_tokens=16", "dataset.min_prompt_length=16",
           "dataset.max_prompt_length=16", "progress=false"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def run_benchmark(overrides: list[str], run_dir: Path) -> Path:
    result = run_cli("-m", "runner", *overrides, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return run_dir


def run_replay(run_dir: Path, out_dir: Path) -> Path:
    result = run_cli("-m", "runner.replay", str(run_dir), "--out", str(out_dir), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return out_dir


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def original_and_replay(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    original = run_benchmark(SHORT_RUN, root / "original")
    return original, run_replay(original, root / "replay")


def test_replay_sends_identical_prompts(original_and_replay):
    original, replayed = original_and_replay
    assert (replayed / "prompts.jsonl").read_bytes() == (original / "prompts.jsonl").read_bytes()
    assert manifest(replayed)["dataset"]["fingerprint"] == manifest(original)["dataset"]["fingerprint"]
    assert manifest(replayed)["dataset"]["kind"] == "replay"


def test_replay_records_original(original_and_replay):
    original, replayed = original_and_replay
    record = json.loads((replayed / "replay.json").read_text(encoding="utf-8"))
    assert record["replay_of"] == str(original.resolve())
    assert record["original_dataset"]["fingerprint"] == manifest(original)["dataset"]["fingerprint"]
    assert (replayed / ".hydra" / "overrides.yaml").read_text() == (original / ".hydra" / "overrides.yaml").read_text()
    config = OmegaConf.load(replayed / ".hydra" / "config.yaml")
    assert config.dataset.kind == "replay"
    assert config.dataset.path == str((original / "prompts.jsonl").resolve())
    assert config.request.max_tokens == 16
    assert config.load.number == 12


def test_replay_reproduces_summary(original_and_replay):
    original, replayed = original_and_replay
    before = pd.read_csv(original / "summary.csv").iloc[0]
    after = pd.read_csv(replayed / "summary.csv").iloc[0]
    for column in ("parallel", "requests", "success_rate", "failures", "warmup", "runs"):
        assert after[column] == before[column], column
    # Timings come from a real clock, on a machine that may be running other work, so the
    # simulated engine's step times make them close, not equal. Medians resist one slow request.
    for column in ("p50_latency", "p50_tpot", "rps"):
        assert after[column] == pytest.approx(before[column], rel=0.5), column


def test_replay_same_token_counts(original_and_replay):
    original, replayed = original_and_replay
    columns = ["request_id", "warmup", "prompt_tokens", "completion_tokens", "success"]

    def sent_rows(run: Path) -> pd.DataFrame:
        # Cooldown requests are cancelled at a moment that depends on timing, so they differ.
        frame = pd.read_csv(run / "requests.csv")
        return frame[~frame["cooldown"]][columns].sort_values("request_id", ignore_index=True)

    pd.testing.assert_frame_equal(sent_rows(replayed), sent_rows(original))


def test_compare_replay_has_no_setting_warnings(original_and_replay):
    original, replayed = original_and_replay
    comparison = compare(original, replayed)
    assert [w for w in comparison.warnings if w.startswith(("different", "no "))] == []
    assert set(comparison.metrics["metric"]) >= {"rps", "p99_latency", "p99_ttft"}


# The secret must never reach a file of the new run folder.
SECRET = "s3cret-replay-token"


@pytest.fixture(scope="module")
def replay_with_overrides(original_and_replay, tmp_path_factory):
    original, _ = original_and_replay
    out_dir = tmp_path_factory.mktemp("replay-overrides") / "run"
    overrides = ["load.parallel=2", "load.number=8", f"+endpoint.headers.Authorization=Bearer {SECRET}"]
    result = run_cli("-m", "runner.replay", str(original), *overrides, "--out", str(out_dir), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return original, out_dir


def test_replay_overrides_change_run(replay_with_overrides):
    original, replayed = replay_with_overrides
    summary = pd.read_csv(replayed / "summary.csv").iloc[0]
    assert summary["parallel"] == 2
    assert summary["requests"] == 8
    # The prompts are still the archived ones.
    assert manifest(replayed)["dataset"]["fingerprint"] == manifest(original)["dataset"]["fingerprint"]


def test_replay_overrides_recorded(replay_with_overrides):
    original, replayed = replay_with_overrides
    recorded = ["load.parallel=2", "load.number=8", "+endpoint.headers.Authorization=<redacted>"]
    record = manifest(replayed)
    assert record["replay"] == {"replay_of": str(original.resolve()), "overrides": recorded}
    assert record["runner_command"][1:3] == ["-m", "runner.replay"]
    assert json.loads((replayed / "replay.json").read_text(encoding="utf-8"))["overrides"] == recorded
    original_overrides = OmegaConf.to_container(OmegaConf.load(original / ".hydra" / "overrides.yaml"))
    assert OmegaConf.to_container(OmegaConf.load(replayed / ".hydra" / "overrides.yaml")) == [
        *original_overrides, *recorded]
    config = OmegaConf.load(replayed / ".hydra" / "config.yaml")
    assert config.load.parallel == 2
    assert config.endpoint.headers.Authorization == "<redacted>"


def test_replay_overrides_keep_secret_out(replay_with_overrides):
    _, replayed = replay_with_overrides
    for path in replayed.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path


def test_compare_warns_about_replay_overrides(replay_with_overrides):
    comparison = compare(*replay_with_overrides)
    assert "different load settings: load.number 12 vs 8" in comparison.warnings


@pytest.mark.slow
def test_replay_sla_same_answer(tmp_path):
    original = run_benchmark(SLA_RUN, tmp_path / "original")
    replayed = run_replay(original, tmp_path / "replay")
    before = pd.read_csv(original / "sla_summary.csv")
    after = pd.read_csv(replayed / "sla_summary.csv")
    assert list(after["criteria"]) == list(before["criteria"]) == ["p99_ttft <= 0.1"]
    assert before["max_satisfied"][0] == 16
    # search.parallel_resolution (1) is the search's own uncertainty.
    assert abs(after["max_satisfied"][0] - before["max_satisfied"][0]) <= 1
    assert (replayed / "prompts.jsonl").read_bytes() == (original / "prompts.jsonl").read_bytes()


# Bad input, on folders written here: each fails before any load is sent.

def write_run_folder(path: Path, changes: dict | None = None, prompts: bool = True) -> Path:
    config = OmegaConf.merge(OmegaConf.structured(RunConfig), changes or {})
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config), encoding="utf-8")
    if prompts:
        (path / "prompts.jsonl").write_text('{"text": "hello", "prompt_tokens": 1}\n', encoding="utf-8")
    return path


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_config_switches_to_archived_prompts(tmp_path):
    run_dir = write_run_folder(tmp_path / "run", {"request": {"max_tokens": 16}, "dataset": {"num_prompts": 3},
                                                  "sla": {"rules": [{"p99_ttft": "<=0.1"}]}})
    composed, config = replay_config(run_dir)
    assert config.dataset.kind is DatasetKind.replay
    assert config.dataset.path == str((run_dir / "prompts.jsonl").resolve())
    assert config.dataset.num_prompts is None
    assert config.request.max_tokens == 16
    assert config.sla.rules == [{"p99_ttft": "<=0.1"}]
    assert composed.dataset.kind == DatasetKind.replay


def test_missing_folder_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "run folder not found" in error_line(capsys)


def test_missing_config_exits_2(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    assert main([str(tmp_path)]) == 2
    assert ".hydra/config.yaml not found" in error_line(capsys)


def test_missing_prompts_exits_2(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path / "run", prompts=False)
    assert main([str(run_dir)]) == 2
    assert "prompts.jsonl not found" in error_line(capsys)


def test_invalid_config_exits_2(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path / "run")
    path = run_dir / ".hydra" / "config.yaml"
    path.write_text(path.read_text().replace("max_tokens: 128", "max_tokens: 0"))
    assert main([str(run_dir)]) == 2
    assert "request.max_tokens must be >= 1, got 0" in error_line(capsys)


def test_unknown_config_key_exits_2(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path / "run")
    with (run_dir / ".hydra" / "config.yaml").open("a") as handle:
        handle.write("colour: blue\n")
    assert main([str(run_dir)]) == 2
    assert "colour" in error_line(capsys)


def test_sweep_folder_lists_jobs(tmp_path, capsys):
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    for job in ("0", "1"):
        write_run_folder(tmp_path / job)
    assert main([str(tmp_path)]) == 2
    line = error_line(capsys)
    assert "contains runs in subfolders (a sweep), not a run" in line
    assert f"{tmp_path / '0'}, {tmp_path / '1'}" in line


def test_out_folder_with_run_exits_2(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path / "run")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "summary.csv").write_text("parallel\n")
    assert main([str(run_dir), "--out", str(taken)]) == 2
    assert "already contains a run (summary.csv)" in error_line(capsys)


def test_overrides_applied_to_archive(tmp_path):
    run_dir = write_run_folder(tmp_path / "run", {"dataset": {"prefix_length": 16}})
    url = "http://127.0.0.1:8000/v1/completions"
    _, config = replay_config(run_dir, ["endpoint.kind=openai", f"endpoint.url={url}", "load.parallel=8",
                                        '++sla={rules: [{p99_ttft: "<=0.5"}]}'])
    assert config.endpoint.url == url
    assert config.endpoint.api.value == "completions"
    assert config.load.parallel == 8
    assert config.sla.rules == [{"p99_ttft": "<=0.5"}]
    # The archived prompts already contain the random dataset's prefix.
    assert config.dataset.prefix_length == 0


@pytest.mark.parametrize("overrides, line", [
    (["endpoint=openai"],
     "error: endpoint=openai: config-group options cannot be picked here, only keys; set the keys of endpoint "
     "instead, for example endpoint.kind=openai (keys of endpoint: api_key_env, connect_timeout, headers, kind, "
     "read_timeout, request_timeout, sim_seed, url)"),
    (["load.parallel=1,2"], "error: load.parallel=1,2: a sweep cannot be applied to one run; pass a single value"),
    (["load.paralel=2"], "error: load.paralel=2: unknown key load.paralel; did you mean load.parallel? valid keys "
                         "of load: arrival, backend, burstiness, calibrate, calibrate_min_requests, calibrate_seconds, "
                         "duration, max_ceiling_fraction, max_client_delay, number, parallel, rate, ray_address, seed, "
                         "warmup, workers"),
    (["load.parallel=0"], "error: load.parallel must be >= 1 (or null in open loop), got 0"),
    (['sla.rules=[{p99_ttft:"<=1"}]'],
     "error: sla.rules=[{p99_ttft:\"<=1\"}]: sla is null in this config; set it as a whole, for example "
     "'++sla={KEY: VALUE}'"),
    (["dataset.prefix_length=4"],
     "error: dataset.prefix_length applies only to dataset=random, got 4 with dataset=replay; "
     "pass dataset.prefix_length=0"),
], ids=["group option", "sweep", "unknown key", "bad value", "null parent", "unused dataset key"])
def test_bad_override_exits_2(tmp_path, capsys, monkeypatch, overrides, line):
    run_dir = write_run_folder(tmp_path / "run")
    argv = [str(run_dir), *overrides, "--out", str(tmp_path / "out")]
    # Error lines quote the override as typed on the command line.
    monkeypatch.setattr(sys, "argv", ["runner.replay", *argv])
    assert main(argv) == 2
    assert error_line(capsys) == line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not valid JSON"),
    ("[1, 2]", "line 2 is not a JSON object"),
    ('{"text": "a", "colour": 1}', "line 2 has unknown fields ['colour']"),
    ('{"text": 5}', "line 2: field 'text' must be a string, got 5; fix the line"),
    ('{"text": "a", "token_ids": "12"}', """line 2: field 'token_ids' must be a list of integers or null, got "12";"""),
    ('{"text": "a", "token_ids": [1, 2.5]}', "line 2: field 'token_ids' must be a list of integers or null, got [1, 2.5]"),
    ('{"text": "a", "prompt_tokens": true}', "line 2: field 'prompt_tokens' must be an integer, got true"),
    ('{"text": "a", "max_tokens": "16"}', """line 2: field 'max_tokens' must be an integer or null, got "16";"""),
    ('{"text": "a", "messages": "hi"}', """line 2: field 'messages' must be a list of message objects or null, got "hi";"""),
])
def test_damaged_prompts_raise(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        replay_prompts(path)


def test_empty_prompts_raise(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no prompts"):
        replay_prompts(path)
