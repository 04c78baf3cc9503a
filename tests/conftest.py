import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from runner.tokenizer import load_tokenizer

    return load_tokenizer("qwen2.5")
