"""Command line: ``python -m runner [overrides]``; the only module that imports Hydra.

It registers the typed schema, lets Hydra compose ``conf/``, turns the result into
``RunConfig`` and hands it to ``runner.run.execute``. Errors the user can fix print as
one line and exit with status 2; ``debug=true`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from runner.config import RunConfig
from runner.errors import RunnerError


log = logging.getLogger("runner")

ConfigStore.instance().store(name="run_schema", node=RunConfig)
# `${pid:}` in hydra.sweep.dir keeps two sweeps started in the same microsecond apart.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Build typed settings from a composed config; raise RunnerError with one line on bad values."""
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


# Name of the file in which a multirun job leaves its one-line error for the aggregation.
JOB_ERROR_FILE = "error.txt"


class AggregateReports(Callback):
    """Build the sweep's aggregated CSVs, plots and report.html when a multirun ends.

    Hydra 1.3 skips ``on_multirun_end`` when a job raises, so jobs never raise: a failed job
    leaves ``error.txt`` in its folder, and this callback lists it and exits non-zero after
    the aggregation.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from runner.report import build_report

        sweep_dir = Path(config.hydra.sweep.dir)
        for path in build_report(sweep_dir):
            print(f"wrote {path}")
        failed = sorted(p.parent.name for p in sweep_dir.glob(f"*/{JOB_ERROR_FILE}"))
        if failed:
            print(f"error: {len(failed)} job(s) failed: {', '.join(failed)}; see {JOB_ERROR_FILE} in each",
                  file=sys.stderr)
            sys.exit(1)


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


def _is_hydra_error(exc: BaseException) -> bool:
    """Return True for errors in the command line or config tree, False for bugs in the runner."""
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return True
    # Hydra raises a plain ValueError for misused flags (--cfg with -m), and OmegaConf an
    # AssertionError for an override below a null key (sla.rules=... without +sla=NAME).
    if isinstance(exc, (ValueError, AssertionError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and any(part in frames[-1].filename for part in ("/hydra/", "/omegaconf/"))
    return False


_EXPECTED_TYPES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}
_MISSING_OPTION = re.compile(r"Could not find '([^'/]+)/([^']+)'")
_CONVERSION = re.compile(r"could not be converted to (\w+)")


def _schema_keys(dotted: str) -> list[str]:
    """Return the keys allowed at the dotted path of ``RunConfig`` (empty when it is not a section)."""
    cls: Any = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return []
        cls = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _override_for(key: str) -> str:
    for arg in sys.argv[1:]:
        if arg.lstrip("+~").split("=", 1)[0] == key:
            return arg
    return key


def hydra_error_line(exc: BaseException) -> str:
    """Collapse a Hydra or OmegaConf error (several lines and a cause) into one line with the fix."""
    cause = exc.__cause__
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if isinstance(exc, OverrideParseException):
        return (f"invalid override {exc.override!r}: {str(exc).splitlines()[0]}; "
                f"see https://hydra.cc/docs/advanced/override_grammar/basic/ for the syntax")
    if isinstance(exc, MissingConfigException):
        match = _MISSING_OPTION.search(str(exc))
        if match:
            group, option = match.groups()
            options = re.findall(r"^\t(\S+)$", str(exc).split("Config search path")[0], re.MULTILINE)
            return (f"{group}={option}: no such option in config group {group}; "
                    f"pass one of: {', '.join(options) or 'none found'}")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parent = key.rpartition(".")[0]
        allowed = _schema_keys(parent)
        hint = f"valid keys of {parent or 'the config'}: {', '.join(allowed)}" if allowed else "check the spelling"
        return f"{_override_for(key)}: unknown key {key}; {hint}"
    if isinstance(cause, ValidationError) and key:
        reason = str(cause).splitlines()[0]
        match = _CONVERSION.search(reason)
        if match:
            fix = f"pass {_EXPECTED_TYPES.get(match.group(1), match.group(1))}"
        elif "is not Optional" in reason:
            fix = f"pass a value for {key}, not null"
        elif "expected one of" in reason:
            fix = "pass one of the listed values"
        else:
            fix = f"fix the value of {key}"
        return f"{_override_for(key)}: {reason}; {fix}"
    if isinstance(exc, AssertionError):
        unset = [arg for arg in sys.argv[1:] if arg.startswith("sla.")]
        if unset:
            return f"{unset[0]}: no SLA rule set is selected; add +sla=custom (or another +sla=NAME) before it"
        return f"cannot apply the overrides {' '.join(sys.argv[1:])}: a parent key is null; set the parent first"
    text = str(exc).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
    return " ".join(lines) or type(exc).__name__


def _debug_requested(argv: list[str]) -> bool:
    return any(arg.lower() in ("debug=true", "debug=1", "debug=yes", "debug=on") for arg in argv)


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
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        sys.exit(130)
    except Interrupted as exc:
        print(f"interrupted by {signal.Signals(exc.signum).name}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (HydraException, OmegaConfBaseException, ValueError, AssertionError) as exc:
        if debug or not _is_hydra_error(exc):
            raise
        from runner.redact import redact_text, secrets_from_overrides

        # The line may quote an override that carries a secret header value.
        line = redact_text(hydra_error_line(exc), secrets_from_overrides(sys.argv[1:]))
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
