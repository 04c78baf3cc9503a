"""Command line: ``python -m runner [overrides]``; the only module that imports Hydra.

It registers the typed schema, lets Hydra compose ``conf/``, turns the result into
``RunConfig`` and hands it to ``runner.run.execute``. Errors the user can fix print as
one line and exit with status 2; ``debug=true`` shows the traceback instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from runner import sweep
from runner.config import RunConfig
from runner.errors import ConfigError, RunnerError
from runner.hydra_errors import hydra_error_line, is_hydra_error, unknown_key_line
from runner.schema import find_unknown_key, schema_keys, section_schema
from runner.sweep import JOB_ERROR_FILE


log = logging.getLogger("runner")

ConfigStore.instance().store(name="run_schema", node=RunConfig)
# `${pid:}` in hydra.sweep.dir keeps two sweeps started in the same microsecond apart.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Build typed settings from a composed config; raise RunnerError with one line on bad values."""
    unknown = find_unknown_key(OmegaConf.to_container(cfg, resolve=False))
    if unknown is not None:
        raise ConfigError(unknown_key_line(unknown))
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, RunnerError) else None
        if cause is not None:
            raise cause from None
        message = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise RunnerError(f"{key}: {message}" if key else message) from exc
    assert isinstance(config, RunConfig)
    return config


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply command-line overrides to a composed config, with Hydra's syntax and rules.

    ``key=value`` changes a key the config has, ``+key=value`` adds one, ``++key=value`` adds
    or changes, and ``~key`` deletes. Config-group options (``endpoint=openai``) and sweeps
    (``a=1,2``) are rejected, because there is no config tree to compose them from. Raises
    ConfigError with one line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(hydra_error_line(exc)) from None
    for override in parsed:
        _check_single_override(override)
        try:
            _apply_override(override, cfg)
        except AssertionError:
            # OmegaConf asserts when a key is set below a parent that is null.
            parent = override.key_or_group.rpartition(".")[0] or override.key_or_group
            raise ConfigError(f"{override.input_line}: {parent} is null in this config; set it as a whole, "
                              f"for example '++{parent}={{KEY: VALUE}}'") from None
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(hydra_error_line(exc)) from None


def _check_single_override(override: Any) -> None:
    """Raise ConfigError for a sweep or a config-group option, which only a composition can apply."""
    line = override.input_line
    if override.is_sweep_override():
        raise ConfigError(f"{line}: a sweep cannot be applied to one run; pass a single value")
    key = override.key_or_group
    keys = schema_keys(key) if "." not in key else []
    if keys and isinstance(override.value(), str) and not override.is_delete():
        example = f", for example {key}.kind={override.value()}" if "kind" in keys else ""
        raise ConfigError(f"{line}: config-group options cannot be picked here, only keys; set the keys "
                          f"of {key} instead{example} (keys of {key}: {', '.join(keys)})")


def _apply_override(override: Any, cfg: DictConfig) -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    key, value = override.key_or_group, override.value()
    schema = section_schema(key) if "." not in key else None
    if schema is not None and isinstance(value, dict) and cfg.get(key) is None:
        # OmegaConf 2.3 fails to merge a mapping into a null section (sla when no rule set
        # was picked), so the section is built from its schema and assigned whole.
        try:
            cfg[key] = OmegaConf.merge(OmegaConf.structured(schema), value)
        except (ConfigAttributeError, ConfigKeyError) as exc:
            raise ConfigError(f"{override.input_line}: {unknown_key_line(f'{key}.{exc.full_key}')}") from None
        return
    # NOTE: a private helper of Hydra 1.3 (pyproject pins hydra-core < 1.4); it is the code
    # that applies command-line overrides when Hydra composes a config.
    ConfigLoaderImpl._apply_overrides_to_config([override], cfg)


class AggregateReports(Callback):
    """Check every job of a multirun before the first starts, and aggregate when it ends.

    Hydra 1.3 skips ``on_multirun_end`` when a job raises, so jobs raise only for a signal,
    after which ``main`` aggregates instead. A failed job leaves ``error.txt`` in its folder,
    and this callback lists it and exits with status 2 after the aggregation, the status
    each such job would have had as a single run.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        # Hydra turns an exception raised by a callback into a warning and goes on, so a
        # rejected sweep ends with SystemExit, which Hydra lets through.
        from runner.redact import redact_text, secrets_from_overrides

        problems = sweep_problems(config, debug=_debug_requested(sys.argv[1:]))
        if problems:
            # An error line may quote an override that sets a secret header.
            secrets = secrets_from_overrides(sys.argv[1:])
            for line in problems:
                print(f"error: {redact_text(line, secrets)}", file=sys.stderr)
            sys.exit(2)
        sweep.record_start(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        failed = sweep.aggregate(Path(config.hydra.sweep.dir))
        if failed:
            print(f"error: {len(failed)} job(s) failed: {', '.join(failed)}; see {JOB_ERROR_FILE} in each",
                  file=sys.stderr)
            sys.exit(2)


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Launchers whose jobs run on this machine, where files, environment variables and packages
# are the ones a job will see. Jobs of other launchers (Ray, SLURM) run on other nodes, so
# only their settings are checked up front.
LOCAL_LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
)
# Launcher plugin modules -> the pip package that provides each, and whether the runner's
# `launchers` extra installs it.
LAUNCHER_PACKAGES = {
    "hydra_plugins.hydra_joblib_launcher": ("hydra-joblib-launcher", True),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", True),
    "hydra_plugins.hydra_ray_launcher": ("hydra-ray-launcher", False),
}


def sweep_problems(config: DictConfig, debug: bool = False) -> list[str]:
    """Return one line per reason the multirun in ``config`` cannot start; empty when it can."""
    launcher = _launcher_problem(config)
    if launcher is not None:
        return [launcher]
    return _job_problems(config, debug)


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _launcher_problem(config: DictConfig) -> Optional[str]:
    """Return the error line for a launcher whose plugin package is not installed."""
    target = OmegaConf.select(config, "hydra.launcher._target_", default=None)
    if not target or _module_installed(target.rpartition(".")[0]):
        return None
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    choice = choices.get("hydra/launcher")
    key = f"hydra/launcher={choice}" if choice else "hydra.launcher._target_"
    for module, (package, in_extra) in LAUNCHER_PACKAGES.items():
        if target.startswith(module + "."):
            install = (f"pip install -e '.[launchers]' in the runner's folder, or pip install {package}"
                       if in_extra else f"pip install {package}")
            return f"{key} needs the Hydra launcher plugin {package}, which is not installed; run {install}"
    return f"{key}: the launcher {target} is not installed; install its plugin package or pick another launcher"


def _job_problems(config: DictConfig, debug: bool) -> list[str]:
    """Compose every job of a basic sweep and check it the way a single run would.

    Returns one line per distinct error, naming the jobs it hits, so a bad value in one job
    stops the sweep before any job sends load. Composition errors are left to Hydra, which
    reports them itself before it starts a job. Composing and checking took about 0.1 s per
    job (100 jobs in 12 s on a 2-core machine at load average 3.4).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import open_dict, read_write

    from runner.preflight import check_inputs
    from runner.redact import redact_argv
    from runner.sla.rules import parse_rules

    if OmegaConf.select(config, "hydra.sweeper._target_", default=None) != BASIC_SWEEPER:
        return []  # another sweeper chooses its jobs as it runs
    loader = GlobalHydra.instance().config_loader()
    # The same job list BasicSweeper.sweep builds: hydra.sweeper.params, then the command line.
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    swept = tuple(f"{override.get_key_element()}=" for override in parsed if override.is_sweep_override())
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    local = OmegaConf.select(config, "hydra.launcher._target_", default=None) in LOCAL_LAUNCHERS

    # Error line -> (job number, the job's swept overrides) of each job that fails with it.
    failures: dict[str, list[tuple[int, str]]] = {}
    for index, overrides in enumerate(jobs):
        try:
            job_config = loader.load_sweep_config(config, list(overrides))
        except (HydraException, OmegaConfBaseException):
            continue
        with read_write(job_config), open_dict(job_config):
            del job_config["hydra"]
        try:
            run_config = to_run_config(job_config)
            if local:
                check_inputs(run_config)
            elif run_config.sla is not None:
                parse_rules(run_config.sla.rules)
        except RunnerError as exc:
            if debug:
                traceback.print_exception(exc)
            label = " ".join(redact_argv(item for item in overrides if item.startswith(swept)))
            failures.setdefault(str(exc), []).append((index, label))
    return _failure_lines(failures, len(jobs))


def _failure_lines(failures: dict[str, list[tuple[int, str]]], job_count: int) -> list[str]:
    lines = []
    for message, failed in failures.items():
        if len(failed) == 1:
            index, label = failed[0]
            lines.append(f"job {index} ({label}): {message}" if label else f"job {index}: {message}")
        elif len(failed) == job_count:
            lines.append(f"all {job_count} jobs: {message}")
        else:
            lines.append(f"jobs {', '.join(str(index) for index, _ in failed)}: {message}")
    if lines:
        bad = sum(len(failed) for failed in failures.values())
        lines.append(f"no job was started: {bad} of {job_count} jobs have invalid settings")
    return lines


def _redact_hydra_output(cfg: DictConfig, out_dir: Path, hydra_config: Any) -> None:
    """Rewrite the YAML files Hydra wrote for this job without secret header values or the API key."""
    from runner.redact import redact_hydra_files, secret_values, secrets_from_overrides

    endpoint = cfg.get("endpoint") or {}
    headers = OmegaConf.to_container(endpoint.get("headers") or OmegaConf.create({}), resolve=False)
    secrets = secret_values(headers or {}, endpoint.get("api_key_env"), endpoint.get("url"))
    secrets += secrets_from_overrides(sys.argv[1:])
    if hydra_config.output_subdir is not None:
        folder = out_dir / hydra_config.output_subdir
        if folder.is_dir():
            redact_hydra_files(folder, secrets)
    if hydra_config.mode is RunMode.MULTIRUN:
        sweep_dir = Path(hydra_config.sweep.dir)
        if sweep_dir.is_dir():
            redact_hydra_files(sweep_dir, secrets)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from runner.interrupt import Interrupted
    from runner.run import execute  # after Hydra's own start-up, so `--help` stays quick

    debug = bool(cfg.get("debug", False))
    hydra_config = HydraConfig.get()
    out_dir = Path(hydra_config.runtime.output_dir)
    in_sweep = hydra_config.mode is RunMode.MULTIRUN
    _redact_hydra_output(cfg, out_dir, hydra_config)
    try:
        config = to_run_config(cfg)
        code = execute(config, out_dir)
    except RunnerError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        if in_sweep:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / JOB_ERROR_FILE).write_text(f"{exc}\n", encoding="utf-8")
            return
        _remove_if_unused(out_dir)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        if in_sweep:
            # main aggregates the sweep, which stops here, and names this job in its one line.
            sweep.record_interrupted_job(out_dir)
            raise
        print(f"interrupted by {signal.Signals(signum).name}: what was measured is in {out_dir}", file=sys.stderr)
        sys.exit(128 + signum)
    if code:
        sys.exit(code)


def _remove_if_unused(out_dir: Path) -> None:
    """Delete a run folder that holds only what Hydra wrote before the run was rejected."""
    if not out_dir.is_dir():
        return
    entries = {entry.name for entry in out_dir.iterdir()}
    log_file = out_dir / "runner.log"
    if entries <= {".hydra", "runner.log"} and (not log_file.exists() or log_file.stat().st_size == 0):
        shutil.rmtree(out_dir, ignore_errors=True)


def _debug_requested(argv: list[str]) -> bool:
    return any(arg.lower() in ("debug=true", "debug=1", "debug=yes", "debug=on") for arg in argv)


def _aggregate_interrupted_sweep(signum: int) -> bool:
    """Write the sweep-level report of a multirun that a signal stopped, from the jobs that ran.

    A second signal during the aggregation is held until it is written, like the reports of
    a single run. Returns True when it printed the line that names the signal.
    """
    from runner.interrupt import SignalStop, signals_deferred
    from runner.report.folders import count_planned_jobs

    sweep_dir = sweep.started_sweep()
    if sweep_dir is None or not sweep_dir.is_dir():
        return False  # not a multirun, or stopped before its first job
    with signals_deferred(SignalStop()):
        try:
            sweep.aggregate(sweep_dir)
        except RunnerError as exc:
            print(f"error: the interrupted sweep has no report: {exc}", file=sys.stderr)
            return False
    line = f"sweep interrupted by {signal.Signals(signum).name}"
    job_dir = sweep.interrupted_job()
    if job_dir is not None:
        line += f" during job {job_dir.name}, whose measurements are in {job_dir}"
    line += f": the report in {sweep_dir} covers the jobs that ran and marks the stopped job interrupted"
    planned = count_planned_jobs(sweep_dir / "multirun.yaml")
    started = len(sweep.job_folders(sweep_dir))
    if planned is not None and planned > started:
        missing = planned - started
        line += f"; {missing} job{'s' if missing > 1 else ''} not started"
    print(line, file=sys.stderr)
    return True


def main() -> None:
    """Entry point of ``python -m runner``: Hydra, with its errors on one line and signals handled."""
    from runner.interrupt import Interrupted, install_handlers

    from runner.redact import redact_hydra_logs

    install_handlers()
    redact_hydra_logs(sys.argv[1:])
    debug = _debug_requested(sys.argv[1:])
    # Hydra then re-raises composition errors instead of printing several lines and a hint
    # about this variable, so they can be printed here as one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        # The sweep's own line already names the signal.
        if not _aggregate_interrupted_sweep(signum):
            print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    except (HydraException, OmegaConfBaseException, ValueError, AssertionError, AttributeError) as exc:
        if debug or not is_hydra_error(exc):
            raise
        from runner.redact import redact_text, secrets_from_overrides

        # The line may quote an override that carries a secret header value.
        line = redact_text(hydra_error_line(exc), secrets_from_overrides(sys.argv[1:]))
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
