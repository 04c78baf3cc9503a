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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.run import execute  # after Hydra's own start-up, so `--help` stays quick

    debug = bool(cfg.get("debug", False))
    try:
        config = to_run_config(cfg)
        code = execute(config, Path(HydraConfig.get().runtime.output_dir))
    except RunnerError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial results were written", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
