"""Paths of the repository, for tests that compose the real config tree or read test data."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
DATA_DIR = Path(__file__).resolve().parent / "data"
