"""Command line: ``python -m runner.replay RUN_DIR [KEY=VALUE ...]``; runs an archived experiment again.

Everything comes from the run folder: the composed config in ``.hydra/config.yaml`` and the
prompts in ``prompts.jsonl``. The dataset is switched to those archived prompts (kind
``replay``), so the new run sends byte-identical prompts even when the tokenizer or the
dataset code changed since. Overrides in Hydra's syntax (``endpoint.url=...``) change the
archived config before it runs. The new folder gets the config it ran with, the original
overrides followed by the replay's own, and ``replay.json``, which names the original run.
Its manifest.json records the replay command and the overrides too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import DatasetKind, RunConfig
from runner.errors import ConfigError, RunnerError
from runner.redact import (check_not_redacted, redact_argv, redact_hydra_files, secret_values,
                           secrets_from_overrides)

log = logging.getLogger(__name__)

CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
PROMPTS_FILE = "prompts.jsonl"
REPLAY_FILE = "replay.json"
# Files whose presence means a folder already contains a run, which a replay must not overwrite.
RUN_FILES = ("manifest.json", "summary.csv", "requests.csv", ".hydra")


def sweep_jobs(folder: Path) -> list[str]:
    """Return the names of the job folders when ``folder`` is a sweep (Hydra multirun), else []."""
    jobs = sorted(
        (child.name for child in folder.iterdir() if child.is_dir() and (child / CONFIG_FILE).is_file()),
        key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name),
    )
    if jobs or (folder / "multirun.yaml").is_file():
        return jobs
    return []


def check_run_folder(run_dir: Path) -> None:
    """Raise RunnerError with one line when ``run_dir`` cannot be replayed."""
    if not run_dir.is_dir():
        raise RunnerError(f"run folder not found: {run_dir}; pass a folder written by python -m runner")
    if not (run_dir / CONFIG_FILE).is_file():
        jobs = sweep_jobs(run_dir)
        if jobs or (run_dir / "multirun.yaml").is_file():
            listed = ", ".join(str(run_dir / job) for job in jobs) or "none"
            raise RunnerError(f"{run_dir} contains runs in subfolders (a sweep), not a run; replay one of its job folders: {listed}")
        raise RunnerError(f"{run_dir / CONFIG_FILE} not found; pass a run folder written by python -m runner")
    if not (run_dir / PROMPTS_FILE).is_file():
        raise RunnerError(f"{run_dir / PROMPTS_FILE} not found; only runs that archived their prompts can be replayed")


def replay_config(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, RunConfig]:
    """Load the archived config with the dataset switched to the archived prompts, then apply ``overrides``.

    Returns the config as Hydra would have composed it and the checked ``RunConfig``. Raises
    RunnerError with one line when the folder, its config or an override is unusable, or when
    a header or the URL is still redacted after the overrides.
    """
    from runner.__main__ import apply_overrides, to_run_config  # imports Hydra, so only when a replay starts

    check_run_folder(run_dir)
    path = run_dir / CONFIG_FILE
    try:
        archived = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} cannot be read: {first_line}") from None
    if not isinstance(archived, DictConfig):
        raise ConfigError(f"{path} must contain a mapping of config groups, got a {type(archived).__name__}")

    prompts = (run_dir / PROMPTS_FILE).resolve()
    try:
        composed = OmegaConf.merge(OmegaConf.structured(RunConfig), archived)
        composed.dataset.kind = DatasetKind.replay
        composed.dataset.path = str(prompts)
        # The archived file contains every prompt of the run, so none is drawn or repeated.
        composed.dataset.num_prompts = None
        # The archived prompts already carry the shared prefix and each prompt's max_tokens,
        # and the replay dataset rejects these random- and ShareGPT-only keys.
        composed.dataset.prefix_length = 0
        composed.dataset.use_reply_length = False
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {key}: {message}" if key else f"{path}: {message}") from None
    try:
        config = to_run_config(composed)
    except RunnerError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        apply_overrides(composed, overrides)
        config = to_run_config(composed)
    endpoint = config.endpoint
    check_not_redacted(endpoint.headers, endpoint.url, endpoint.api_key_env, path)
    return composed, config


def default_out_dir(now: Optional[dt.datetime] = None) -> Path:
    """Return ``outputs/replay/<date>/<time with microseconds>`` under the current folder."""
    now = now or dt.datetime.now()
    return Path("outputs") / "replay" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")


def make_out_dir(out_dir: Optional[Path]) -> Path:
    """Create the folder the replay writes into; raise RunnerError when it already contains a run."""
    if out_dir is None:
        out_dir = default_out_dir()
        if out_dir.exists():
            # Another replay started in the same microsecond: the process id distinguishes them.
            out_dir = out_dir.with_name(f"{out_dir.name}-{os.getpid()}")
    taken = [name for name in RUN_FILES if (out_dir / name).exists()]
    if taken:
        raise RunnerError(f"--out {out_dir} already contains a run ({', '.join(taken)}); pass a new or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"--out {out_dir} cannot be created: {exc.strerror}; pass a writable folder") from None
    return out_dir


def _original_dataset(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    dataset = manifest.get("dataset") if isinstance(manifest, dict) else None
    return dataset if isinstance(dataset, dict) else None


def write_archive(composed: DictConfig, run_dir: Path, out_dir: Path, overrides: Sequence[str],
                  secrets: Sequence[str]) -> dict[str, Any]:
    """Write the replay's ``.hydra/`` and ``replay.json`` before any load is sent; return the record."""
    (out_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(composed, out_dir / CONFIG_FILE)
    redacted = redact_argv(overrides, secrets)
    if (run_dir / OVERRIDES_FILE).is_file():
        # The original overrides, so reports label the replay like the run it repeats.
        shutil.copyfile(run_dir / OVERRIDES_FILE, out_dir / OVERRIDES_FILE)
    if overrides:
        # Plain YAML, because OmegaConf would resolve a ${...} inside an override's value.
        path = out_dir / OVERRIDES_FILE
        original = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        combined = [*(original if isinstance(original, list) else []), *redacted]
        path.write_text(yaml.safe_dump(combined, sort_keys=False, allow_unicode=True), encoding="utf-8")
    redact_hydra_files(out_dir / ".hydra", secrets)
    record = {
        "replay_of": str(run_dir.resolve()),
        "original_dataset": _original_dataset(run_dir),
        "overrides": redacted,
        "command": [Path(sys.executable).name, "-m", "runner.replay", *redact_argv(sys.argv[1:], secrets)],
    }
    (out_dir / REPLAY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _record_in_manifest(out_dir: Path, record: dict[str, Any]) -> None:
    """Put the replay command and its overrides into the manifest.json that the run wrote."""
    path = out_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the run stopped before it wrote a manifest
    manifest["runner_command"] = record["command"]
    manifest["replay"] = {key: record[key] for key in ("replay_of", "overrides")}
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")


def replay(run_dir: Path, out_dir: Optional[Path] = None, overrides: Sequence[str] = ()) -> tuple[int, Path]:
    """Run the experiment archived in ``run_dir`` again, changed by ``overrides``.

    Returns the exit code and the new folder. Raises RunnerError with one line when the
    folder cannot be replayed or the run fails.
    """
    from runner.run import execute  # pulls in the client and the tokenizer

    composed, config = replay_config(run_dir, overrides)
    out_dir = make_out_dir(out_dir)
    _log_to_file(out_dir / "runner.log")
    endpoint = config.endpoint
    secrets = secret_values(endpoint.headers, endpoint.api_key_env, endpoint.url) + secrets_from_overrides(overrides)
    record = write_archive(composed, run_dir, out_dir, overrides, secrets)
    log.info("replaying %s into %s", run_dir, out_dir)
    try:
        return execute(config, out_dir), out_dir
    finally:
        _record_in_manifest(out_dir, record)


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner.replay",
        description=(
            "Run an archived experiment again from its run folder alone: the composed config in "
            ".hydra/config.yaml and the prompts in prompts.jsonl, sent byte for byte as before. "
            "Overrides change the archived config first. The new run folder gets replay.json naming "
            "the original run and the overrides."
        ),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by python -m runner")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="changes to the archived config in Hydra's override syntax, for example "
             "endpoint.kind=openai endpoint.url=http://127.0.0.1:8000/v1/chat/completions load.parallel=8",
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="folder to write the new run into (default: outputs/replay/<date>/<time with microseconds>)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        code, out_dir = replay(args.run_dir, args.out, args.overrides)
    except RunnerError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        # KeyboardInterrupt, or the runner's own exception for SIGTERM, which carries its exit code.
        code = 130 if isinstance(exc, KeyboardInterrupt) else getattr(exc, "exit_code", None)
        if not isinstance(code, int):
            raise
        print(f"interrupted by {exc or 'SIGINT'}: what was measured is in the replay folder", file=sys.stderr)
        return code
    print(f"replay of {args.run_dir} written to {out_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
