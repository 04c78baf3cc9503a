"""Command line: ``python -m runner [overrides]``; the only module that imports Hydra.

It registers the typed schema, lets Hydra compose ``conf/``, turns the result into
``RunConfig`` and hands it to ``runner.run.execute``. Errors the user can fix print as
one line and exit with status 2; ``debug=true`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import RunConfig
from runner.errors import RunnerError

log = logging.getLogger("runner")

ConfigStore.instance().store(name="run_schema", node=RunConfig)


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.run import execute  # after Hydra's own start-up, so `--help` stays quick

    debug = bool(cfg.get("debug", False))
    hydra_config = HydraConfig.get()
    out_dir = Path(hydra_config.runtime.output_dir)
    in_sweep = hydra_config.mode is RunMode.MULTIRUN
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
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial results were written", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
