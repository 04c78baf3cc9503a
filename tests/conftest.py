import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from runner.tokenizer import load_tokenizer

    return load_tokenizer("qwen2.5")
