"""Command line: ``python -m runner.replay RUN_DIR``; runs an archived experiment again.

Everything comes from the run folder: the composed config in ``.hydra/config.yaml`` and the
prompts in ``prompts.jsonl``. The dataset is switched to those archived prompts (kind
``replay``), so the new run sends byte-identical prompts even when the tokenizer or the
dataset code changed since. The new folder gets the config it ran with, a copy of the
original overrides and ``replay.json``, which names the original run.
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


def replay_config(run_dir: Path) -> tuple[DictConfig, RunConfig]:
    """Load the archived config with the dataset switched to the archived prompts.

    Returns the config as Hydra would have composed it and the checked ``RunConfig``. Raises
    RunnerError with one line when the folder or its config is unusable.
    """
    from runner.__main__ import to_run_config  # imports Hydra, so only when a replay starts

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
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {key}: {message}" if key else f"{path}: {message}") from None
    try:
        return composed, to_run_config(composed)
    except RunnerError as exc:
        raise ConfigError(f"{path}: {exc}") from None


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


def write_archive(composed: DictConfig, run_dir: Path, out_dir: Path) -> None:
    """Write the replay's ``.hydra/`` and ``replay.json`` before any load is sent."""
    (out_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(composed, out_dir / CONFIG_FILE)
    if (run_dir / OVERRIDES_FILE).is_file():
        # The original overrides, so reports label the replay like the run it repeats.
        shutil.copyfile(run_dir / OVERRIDES_FILE, out_dir / OVERRIDES_FILE)
    record = {
        "replay_of": str(run_dir.resolve()),
        "original_dataset": _original_dataset(run_dir),
        "command": [Path(sys.executable).name, "-m", "runner.replay", *sys.argv[1:]],
    }
    (out_dir / REPLAY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def replay(run_dir: Path, out_dir: Optional[Path] = None) -> tuple[int, Path]:
    """Run the experiment archived in ``run_dir`` again; return the exit code and the new folder.

    Raises RunnerError with one line when the folder cannot be replayed or the run fails.
    """
    from runner.run import execute  # pulls in the client and the tokenizer

    composed, config = replay_config(run_dir)
    out_dir = make_out_dir(out_dir)
    _log_to_file(out_dir / "runner.log")
    write_archive(composed, run_dir, out_dir)
    log.info("replaying %s into %s", run_dir, out_dir)
    # NOTE: execute() records "python -m runner" plus this command's arguments as manifest.json's
    # runner_command; replay.json contains the command that was actually run.
    return execute(config, out_dir), out_dir


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
            "The new run folder gets replay.json naming the original run."
        ),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by python -m runner")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="folder to write the new run into (default: outputs/replay/<date>/<time with microseconds>)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        code, out_dir = replay(args.run_dir, args.out)
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
