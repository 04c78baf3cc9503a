"""Finding runs on disk: a single run folder, a sweep, or a folder of runs.

A run folder contains ``.hydra/`` (config.yaml, overrides.yaml) and the result files
(``summary.csv``, ``requests.csv``, ``sla_summary.csv``). A sweep folder (Hydra multirun) contains
``multirun.yaml`` and one numbered subfolder per job; a job that failed may contain only
``.hydra/`` and ``error.txt``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from runner.errors import RunnerError

log = logging.getLogger(__name__)

# The C loader parses the YAML files of a 200-job sweep several times faster when PyYAML has it.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Files whose presence marks a folder as a run (finished, partial or failed).
_RUN_MARKERS = ("summary.csv", "requests.csv", "error.txt", ".hydra")

_OVERRIDE = re.compile(r"^(?P<prefix>~|\+\+|\+)?(?P<key>[^=]+?)(?:=(?P<value>.*))?$", re.DOTALL)


@dataclass
class RunFolder:
    """One run on disk and the command-line overrides that made it."""

    path: Path
    # Name of the job subfolder in a sweep ("0", "1", ...); the folder name for a single run.
    name: str
    # Override key -> value as typed: "+sla=x" gives {"sla": "x"}.
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.path / ".hydra" / "config.yaml"


@dataclass
class Layout:
    """The kind of a report folder ("run" for one run, "sweep" for runs in subfolders) and its runs."""

    kind: str
    root: Path
    runs: list[RunFolder]
    # Jobs the sweep's command line asked for, from multirun.yaml; None when unknown.
    planned_jobs: Optional[int] = None


def parse_overrides(lines: list[Any]) -> dict[str, str]:
    """Map Hydra override strings to key -> value.

    ``model=a`` gives ``model: a``, ``+sla=x`` gives ``sla: x``, ``load.parallel=8`` gives
    ``load.parallel: 8``. A deletion (``~key``) gives an empty value. Values stay strings
    exactly as typed, so ``8`` and ``8.0`` remain distinguishable.
    """
    overrides: dict[str, str] = {}
    for line in lines:
        match = _OVERRIDE.match(str(line).strip())
        if match is None:
            continue
        overrides[match["key"].strip()] = match["value"] if match["value"] is not None else ""
    return overrides


def read_overrides(run_dir: Path) -> dict[str, str]:
    """Read ``.hydra/overrides.yaml``; a missing or malformed file gives no overrides."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        lines = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return parse_overrides(lines) if isinstance(lines, list) else {}


def read_config(run_dir: Path) -> dict[str, Any]:
    """Read ``.hydra/config.yaml`` as plain data; a missing or malformed file gives {}."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def read_text(path: Path, limit: int = 200_000) -> Optional[str]:
    """Return the text of ``path`` (at most ``limit`` characters) or None when it is missing."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return None


def _is_run(path: Path) -> bool:
    return any((path / marker).exists() for marker in _RUN_MARKERS)


def _has_results(path: Path) -> bool:
    return (path / "summary.csv").is_file() or (path / "requests.csv").is_file()


def _job_order(path: Path) -> tuple[int, int, str]:
    # Numbered jobs first, in numeric order (2 before 10), then other names alphabetically.
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_layout(root: Path) -> Layout:
    """Classify ``root`` as a run or a sweep; raise RunnerError when it contains no run.

    A folder with ``multirun.yaml`` or with run subfolders is a sweep, even when an earlier
    report left a ``summary.csv`` at its top. Only direct subfolders are searched.
    """
    if not root.is_dir():
        raise RunnerError(f"report folder not found: {root}; pass a run or sweep output folder")
    jobs = sorted(
        (child for child in root.iterdir() if child.is_dir() and not child.name.startswith(".") and _is_run(child)),
        key=_job_order,
    )
    if jobs or (root / "multirun.yaml").is_file():
        if not jobs:
            raise RunnerError(f"no job folders in sweep {root}; expected one numbered subfolder per job")
        runs = [RunFolder(path=job, name=job.name, overrides=read_overrides(job)) for job in jobs]
        return Layout(kind="sweep", root=root, runs=runs, planned_jobs=count_planned_jobs(root / "multirun.yaml"))
    if _has_results(root):
        return Layout(kind="run", root=root, runs=[RunFolder(path=root, name=root.name, overrides=read_overrides(root))])
    raise RunnerError(f"no run in {root}: expected summary.csv or requests.csv, or job subfolders holding them")


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def count_planned_jobs(path: Path) -> Optional[int]:
    """Return how many jobs the basic sweep recorded in multirun.yaml expands to.

    Returns None when the file is missing or unreadable, when another sweeper chose the jobs
    as it ran, or when an override needs the config search path to expand (``glob``).
    """
    if not path.is_file():
        return None
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    hydra_section = data.get("hydra") if isinstance(data, dict) else None
    if not isinstance(hydra_section, dict):
        return None
    sweeper = hydra_section.get("sweeper") or {}
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = sweeper.get("params") or {}
    task = (hydra_section.get("overrides") or {}).get("task") or []
    arguments = [f"{key}={value}" for key, value in params.items()] + [str(item) for item in task]

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, None)
    except (HydraException, ValueError, TypeError, AttributeError) as exc:
        log.info("cannot count the jobs of the sweep in %s: %s", path, exc)
        return None
    return sum(len(batch) for batch in batches)
