"""Continue an interrupted SLA tune: ``python -m runner.resume RUN_DIR [key=value ...]``.

The run folder's ``.hydra/config.yaml`` gives the settings, ``probes.jsonl`` the repeats
that finished and ``requests.csv`` their requests. Finished repeats are loaded into the
prober's cache; rows of a repeat cut by the interruption are removed from requests.csv
(the old file is kept as ``requests.csv.before-resume``) and that repeat is measured again.
The tuner then runs its search from the start, and the cache makes every point measured
before free, so no probe is lost and none is measured twice. New rows are appended.
The resume is logged to the folder's runner.log and listed under ``resumes`` in
manifest.json: when it ran, which repeats it reused and which it discarded.

Secret header values were redacted from config.yaml, so pass them again as overrides
(``endpoint.headers.Authorization=...``). Only settings that do not change what is measured
can be overridden (see RESUMABLE_KEYS): new repeats are pooled with the old ones, so a
different request shape, load or search would mix two experiments in one result.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import RunConfig, SearchVariable
from runner.errors import ConfigError, DataError, RunnerError
from runner.interrupt import Interrupted, install_handlers
from runner.manifest import now_iso
from runner.output import read_requests
from runner.prober import PROBES_FILE
from runner.redact import check_not_redacted, redact_argv, secret_values

# Named, because ``python -m runner.resume`` runs this module as __main__.
log = logging.getLogger("runner.resume")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

BACKUP_SUFFIX = ".before-resume"


# Keys (or key prefixes ending in ".") that a resume may override: where the server is and
# how to authenticate, plus the progress display.
RESUMABLE_KEYS = ("endpoint.headers.", "endpoint.url", "endpoint.api_key_env", "progress")


def check_overrides(overrides: list[str]) -> None:
    """Raise ConfigError for an override that would change what the resumed run measures."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_KEYS):
            raise ConfigError(
                f"cannot override {key} when resuming: the new repeats would be pooled with repeats measured "
                f"under the saved value; resume may override only endpoint.headers.*, endpoint.url, "
                f"endpoint.api_key_env and progress, so start a new run to change {key}"
            )


def load_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """Rebuild the typed settings of a run folder, with ``overrides`` merged over them."""
    from runner.__main__ import to_run_config

    check_overrides(overrides)

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise DataError(f"{path} not found; pass a run folder written by python -m runner")
    try:
        saved = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), saved, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot apply {path} and the overrides: {str(exc).splitlines()[0]}") from None
    config = to_run_config(merged)
    endpoint = config.endpoint
    check_not_redacted(endpoint.headers, endpoint.url, endpoint.api_key_env, path)
    return config


def read_probes(path: Path) -> dict[tuple[float, int], dict[str, Any]]:
    """Return the finished repeats listed in probes.jsonl by (value, repeat)."""
    probes: dict[tuple[float, int], dict[str, Any]] = {}
    if not path.is_file():
        return probes
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            probes[(float(item["value"]), int(item["repeat"]))] = item
        except (ValueError, KeyError, TypeError):
            # A line cut by the interruption; its repeat counts as unfinished.
            log.warning("%s line %s is incomplete; its repeat will be measured again", path, number)
    return probes


def _row_key(row: dict[str, str]) -> tuple[float, int]:
    return float(row["value"]), int(row["repeat"])


def _read_rows(requests_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Return the header of requests.csv and its rows that belong to a repeat."""
    with requests_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row.get("repeat") not in (None, "")]
        return list(reader.fieldnames or []), rows


def _finished_repeats(probes: dict[tuple[float, int], dict[str, Any]],
                      rows: list[dict[str, str]]) -> dict[tuple[float, int], dict[str, Any]]:
    """Return the probes.jsonl lines whose repeat has all its rows in requests.csv."""
    counts: dict[tuple[float, int], int] = {}
    for row in rows:
        counts[_row_key(row)] = counts.get(_row_key(row), 0) + 1
    return {key: item for key, item in probes.items() if counts.get(key) == int(item["requests"])}


def finished_already(run_dir: Path, config: RunConfig) -> bool:
    """Return True when the tune in ``run_dir`` ended by itself and left nothing to measure.

    The tune is finished when manifest.json names no signal, sla_summary.csv has one row per
    rule group and none of them is marked interrupted, and every repeat in requests.csv has
    its line in probes.jsonl with all its rows.
    """
    from runner.sla.probe import INTERRUPTED_NOTE
    from runner.sla.rules import parse_rules

    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        answers = list(csv.DictReader((run_dir / "sla_summary.csv").open(newline="", encoding="utf-8")))
        header, rows = _read_rows(run_dir / "requests.csv")
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("interrupted_by") or not manifest.get("ended_at"):
        return False
    if len(answers) != len(parse_rules(config.sla.rules)) or any(
            (answer.get("note") or "").startswith(INTERRUPTED_NOTE) for answer in answers):
        return False
    probes = read_probes(run_dir / PROBES_FILE)
    started = {_row_key(row) for row in rows}
    return bool(probes) and set(_finished_repeats(probes, rows)) == started == set(probes)


def prune(run_dir: Path) -> tuple[dict[tuple[float, int], dict[str, Any]], int, dict[tuple[float, int], int]]:
    """Drop rows and probe lines of unfinished repeats.

    Returns the finished repeats, the next free request id and the number of rows dropped
    for each unfinished (value, repeat).
    """
    requests_path = run_dir / "requests.csv"
    probes_path = run_dir / PROBES_FILE
    if not requests_path.is_file():
        raise DataError(f"{requests_path} not found; nothing to resume")
    probes = read_probes(probes_path)
    header, rows = _read_rows(requests_path)
    counts: dict[tuple[float, int], int] = {}
    for row in rows:
        counts[_row_key(row)] = counts.get(_row_key(row), 0) + 1
    finished = _finished_repeats(probes, rows)
    next_id = max((int(row["request_id"]) for row in rows), default=-1) + 1
    next_id = max([next_id] + [int(item.get("last_id", -1)) + 1 for item in probes.values()])

    kept = [row for row in rows if _row_key(row) in finished]
    dropped = {key: count for key, count in counts.items() if key not in finished}
    if len(kept) != len(rows) or len(finished) != len(probes):
        shutil.copyfile(requests_path, requests_path.with_name(requests_path.name + BACKUP_SUFFIX))
        with requests_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        with probes_path.open("w", encoding="utf-8") as handle:
            for item in finished.values():
                handle.write(json.dumps(item) + "\n")
        log.info("dropped %s rows of unfinished repeats from %s and kept the previous file as %s%s",
                 len(rows) - len(kept), requests_path, requests_path.name, BACKUP_SUFFIX)
    return finished, next_id, dropped


def _load_value(value: float, config: RunConfig) -> float:
    """Return a load value as the search uses it: an int concurrency for a parallel search."""
    return int(value) if config.search.variable is SearchVariable.parallel else value


def _repeats_text(repeats: dict[float, list[int]], variable: str) -> str:
    """Return "parallel=2 #0 #1, parallel=4 #0" for the repeats of each load value, or "none"."""
    points = (f"{variable}={value:g} " + " ".join(f"#{number}" for number in numbers)
              for value, numbers in sorted(repeats.items()))
    return ", ".join(points) or "none"


def _by_value(pairs: Iterable[tuple[float, int]], config: RunConfig) -> dict[float, list[int]]:
    grouped: dict[float, list[int]] = {}
    for value, repeat in pairs:
        grouped.setdefault(_load_value(value, config), []).append(repeat)
    return {value: sorted(repeats) for value, repeats in sorted(grouped.items())}


def _restore(resumed: Any, run_dir: Path, finished: dict[tuple[float, int], dict[str, Any]],
             config: RunConfig) -> list[tuple[float, int]]:
    """Load the finished repeats into ``resumed``; return the (value, repeat) pairs reused."""
    frame = read_requests(run_dir / "requests.csv")
    reused: list[tuple[float, int]] = []
    for value in sorted({value for value, _ in finished}):
        repeats = sorted(repeat for v, repeat in finished if v == value)
        # Only a run of repeats 0..n-1 can be reused as it is; a gap is measured again.
        count = next((i for i, repeat in enumerate(repeats) if repeat != i), len(repeats))
        selected = frame[(frame["value"] == value) & (frame["repeat"] < count)]
        lag = [sample for repeat in range(count) for sample in finished[(value, repeat)].get("loop_lag", [])]
        # Keys typed as the search uses them, so summary.csv and the tables show 16, not 16.0.
        resumed.points[_load_value(value, config)] = (count, selected.to_dict("records"), lag)
        reused += [(value, repeat) for repeat in range(count)]
    return reused


def load_tune_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """Return the settings of the SLA tune in ``run_dir``; raise ConfigError for a plain run."""
    config = load_config(run_dir, overrides)
    if config.sla is None:
        raise ConfigError(f"{run_dir} is not an SLA tune (no sla in its config); only tunes can be resumed")
    return config


def resume(run_dir: Path, config: RunConfig) -> int:
    from runner.run import Resumed, execute

    started_at = now_iso()
    finished, next_id, dropped = prune(run_dir)
    resumed = Resumed(next_id=next_id)
    kept = _by_value(_restore(resumed, run_dir, finished, config), config)
    # NOTE: a finished repeat after a gap is neither reused nor removed from requests.csv, so
    # if the search measures it again, requests.csv contains both copies.
    discarded = _by_value(dropped, config)
    variable = config.search.variable.value
    secrets = secret_values(config.endpoint.headers, config.endpoint.api_key_env, config.endpoint.url)
    resumed.record = {
        "command": [Path(sys.executable).name, "-m", "runner.resume", *redact_argv(sys.argv[1:], secrets)],
        "variable": variable,
        # Load value -> repeat numbers.
        "kept_repeats": {f"{value:g}": repeats for value, repeats in kept.items()},
        "discarded_repeats": {f"{value:g}": repeats for value, repeats in discarded.items()},
        "dropped_rows": sum(dropped.values()),
        "requests_backup": f"requests.csv{BACKUP_SUFFIX}" if dropped else None,
    }
    log.info("resuming %s at %s: reusing the finished repeats %s and discarding the unfinished repeats %s, "
             "which the search measures again if it needs them", run_dir, started_at,
             _repeats_text(kept, variable), _repeats_text(discarded, variable))
    return execute(config, run_dir, resumed=resumed)


def _log_to_run_folder(run_dir: Path) -> None:
    """Append this process's log records to the run folder's runner.log, as the first run wrote them."""
    if not run_dir.is_dir():
        return  # load_config reports the missing folder
    handler = logging.FileHandler(run_dir / "runner.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.resume", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder of the interrupted SLA tune")
    parser.add_argument("overrides", nargs="*",
                        help="key=value settings merged over the saved config: endpoint.headers.*, endpoint.url, "
                             "endpoint.api_key_env or progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=LOG_FORMAT)
    install_handlers()
    try:
        config = load_tune_config(args.run_dir, args.overrides)
        # Checked before anything is logged to the folder, which a finished tune keeps as it is.
        if finished_already(args.run_dir, config):
            print(f"{args.run_dir} finished already; nothing to resume")
            return 0
        _log_to_run_folder(args.run_dir)
        return resume(args.run_dir, config)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        return 130
    except Interrupted as exc:
        print(f"interrupted by {exc.args[0]}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
