"""File-based datasets: prompts, token counts and one-line errors, with the real Qwen2.5 tokenizer.

The token counts below are those of the bundled Qwen2.5 tokenizer. For /v1/completions the
text is encoded as it is. For the chat endpoint one user message is rendered with the chat
template, which adds 29 tokens: the default system prompt and the role markers.
"""

import json
import logging

import pytest
from hydra import compose, initialize_config_dir

from runner.__main__ import to_run_config
from runner.config import Api, DatasetConfig, DatasetKind
from runner.data import build_prompts
from runner.errors import ConfigError, DataError

from paths import CONF_DIR, REPO

DATA = REPO / "tests" / "data"
TEMPLATE_TOKENS = 29


def dataset(kind: DatasetKind, path, **overrides) -> DatasetConfig:
    settings = {"min_prompt_length": 1, "max_prompt_length": 1_000_000, **overrides}
    return DatasetConfig(kind=kind, path=str(path), **settings)


def by_text(prompts):
    return {prompt.text: prompt for prompt in prompts}


def data_error(config, tokenizer, count=3, api=Api.completions) -> str:
    with pytest.raises(DataError) as raised:
        build_prompts(config, tokenizer, count, api)
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- good files ------------------------------------------------------------------------------


def test_line_by_line_completions(qwen_tokenizer):
    prompts = build_prompts(dataset(DatasetKind.line_by_line, DATA / "prompts.txt"), qwen_tokenizer, 3,
                            Api.completions)
    assert len(prompts) == 3
    # Blank and whitespace-only lines are skipped; CRLF endings are removed.
    assert {text: p.prompt_tokens for text, p in by_text(prompts).items()} == {
        "Hello there": 2,
        "Write a haiku about the sea.": 8,
        "Explain TCP in one sentence.": 7,
    }
    assert all(prompt.messages is None for prompt in prompts)
    assert all(prompt.max_tokens is None for prompt in prompts)
    assert all(prompt.token_ids is None for prompt in prompts)


def test_line_by_line_chat_counts_template(qwen_tokenizer):
    prompts = build_prompts(dataset(DatasetKind.line_by_line, DATA / "prompts.txt"), qwen_tokenizer, 3, Api.chat)
    assert {text: p.prompt_tokens for text, p in by_text(prompts).items()} == {
        "Hello there": 2 + TEMPLATE_TOKENS,
        "Write a haiku about the sea.": 8 + TEMPLATE_TOKENS,
        "Explain TCP in one sentence.": 7 + TEMPLATE_TOKENS,
    }
    assert all(prompt.messages is None for prompt in prompts)


def test_jsonl_completions(qwen_tokenizer):
    prompts = build_prompts(dataset(DatasetKind.jsonl, DATA / "prompts.jsonl"), qwen_tokenizer, 3,
                            Api.completions)
    found = by_text(prompts)
    rendered = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(found) == {"Hello there", rendered, "Write a haiku about the sea."}
    assert (found["Hello there"].prompt_tokens, found["Hello there"].max_tokens) == (2, None)
    # /v1/completions takes no messages, so a chat line becomes its rendered template.
    assert (found[rendered].prompt_tokens, found[rendered].max_tokens) == (18, 16)
    assert found[rendered].messages is None
    assert (found["Write a haiku about the sea."].prompt_tokens, found["Write a haiku about the sea."].max_tokens) == (
        8, 32)


def test_jsonl_chat_keeps_messages(qwen_tokenizer):
    prompts = build_prompts(dataset(DatasetKind.jsonl, DATA / "prompts.jsonl"), qwen_tokenizer, 3, Api.chat)
    chat = [prompt for prompt in prompts if prompt.messages is not None]
    assert len(chat) == 1
    assert chat[0].messages == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    # The line's own system message replaces the template's default one.
    assert chat[0].prompt_tokens == 18
    assert chat[0].max_tokens == 16
    plain = by_text(prompt for prompt in prompts if prompt.messages is None)
    assert plain["Hello there"].prompt_tokens == 2 + TEMPLATE_TOKENS
    assert plain["Write a haiku about the sea."].prompt_tokens == 8 + TEMPLATE_TOKENS


@pytest.mark.parametrize("name", ["sharegpt.json", "sharegpt.jsonl"])
def test_sharegpt_first_human_turn(qwen_tokenizer, caplog, name):
    with caplog.at_level(logging.INFO, logger="runner.data.files"):
        prompts = build_prompts(dataset(DatasetKind.sharegpt, DATA / name), qwen_tokenizer, 3, Api.completions)
    assert {text: p.prompt_tokens for text, p in by_text(prompts).items()} == {
        "What is the capital of France?": 7,
        "Name three primary colors.": 5,
        "Tell me a joke.": 5,
    }
    assert all(prompt.max_tokens is None for prompt in prompts)
    assert f"{DATA / name}: skipped 1 of 4 conversations that have no human turn with text" in caplog.messages


@pytest.mark.parametrize("name", ["sharegpt.json", "sharegpt.jsonl"])
def test_sharegpt_reply_length(qwen_tokenizer, caplog, name):
    config = dataset(DatasetKind.sharegpt, DATA / name, use_reply_length=True)
    with caplog.at_level(logging.WARNING, logger="runner.data.files"):
        prompts = build_prompts(config, qwen_tokenizer, 3, Api.chat)
    found = by_text(prompts)
    assert found["What is the capital of France?"].max_tokens == 7  # "The capital of France is Paris."
    assert found["Name three primary colors."].max_tokens == 6  # "Red, yellow and blue."
    assert found["Tell me a joke."].max_tokens is None
    assert found["Tell me a joke."].prompt_tokens == 5 + TEMPLATE_TOKENS
    assert (
        f"{DATA / name}: no reply for 1 of the 3 prompts tokenized, so request.max_tokens applies to them"
        in caplog.messages
    )


def test_num_prompts_overrides_count(qwen_tokenizer):
    config = dataset(DatasetKind.line_by_line, DATA / "prompts.txt", num_prompts=2)
    assert len(build_prompts(config, qwen_tokenizer, 50)) == 2


# --- length filter -------------------------------------------------------------------------------


def test_filter_completions_plain_text(qwen_tokenizer):
    config = dataset(DatasetKind.line_by_line, DATA / "prompts.txt", min_prompt_length=7, max_prompt_length=7)
    prompts = build_prompts(config, qwen_tokenizer, 2, Api.completions)
    assert [prompt.text for prompt in prompts] == ["Explain TCP in one sentence."] * 2


def test_filter_chat_with_template(qwen_tokenizer):
    config = dataset(DatasetKind.line_by_line, DATA / "prompts.txt", min_prompt_length=31, max_prompt_length=36)
    prompts = build_prompts(config, qwen_tokenizer, 2, Api.chat)
    assert {prompt.text for prompt in prompts} == {"Hello there", "Explain TCP in one sentence."}
    assert sorted(prompt.prompt_tokens for prompt in prompts) == [31, 36]


def test_filter_removes_all(qwen_tokenizer):
    config = dataset(DatasetKind.line_by_line, DATA / "prompts.txt", min_prompt_length=31, max_prompt_length=36)
    assert data_error(config, qwen_tokenizer, api=Api.completions) == (
        f"{DATA / 'prompts.txt'}: none of the 3 prompts read has a length within [31, 36] tokens "
        "(they have 2 to 8 tokens, counted as plain text); "
        "relax dataset.min_prompt_length or dataset.max_prompt_length"
    )


# --- seeded sampling -----------------------------------------------------------------------------


@pytest.fixture
def fifty_lines(tmp_path):
    path = tmp_path / "fifty.txt"
    path.write_text("".join(f"Prompt number {i}\n" for i in range(50)), encoding="utf-8")
    return path


def test_sampling_same_seed_same_prompts(qwen_tokenizer, fifty_lines):
    first = build_prompts(dataset(DatasetKind.line_by_line, fifty_lines, seed=5), qwen_tokenizer, 10)
    again = build_prompts(dataset(DatasetKind.line_by_line, fifty_lines, seed=5), qwen_tokenizer, 10)
    assert [prompt.text for prompt in first] == [prompt.text for prompt in again]
    assert len({prompt.text for prompt in first}) == 10
    # Shuffled, so not simply the first ten lines.
    assert [prompt.text for prompt in first] != [f"Prompt number {i}" for i in range(10)]


def test_sampling_other_seed_differs(qwen_tokenizer, fifty_lines):
    first = build_prompts(dataset(DatasetKind.line_by_line, fifty_lines, seed=5), qwen_tokenizer, 10)
    other = build_prompts(dataset(DatasetKind.line_by_line, fifty_lines, seed=6), qwen_tokenizer, 10)
    assert [prompt.text for prompt in first] != [prompt.text for prompt in other]


def test_sampling_cycles_short_file(qwen_tokenizer, caplog):
    config = dataset(DatasetKind.line_by_line, DATA / "prompts.txt")
    with caplog.at_level(logging.WARNING, logger="runner.data.files"):
        prompts = build_prompts(config, qwen_tokenizer, 7)
    assert len(prompts) == 7
    assert len({prompt.text for prompt in prompts[:3]}) == 3
    assert [prompt.text for prompt in prompts] == [prompts[i % 3].text for i in range(7)]
    assert (
        f"{DATA / 'prompts.txt'}: only 3 prompts pass the length filter but 7 are requested; cycling through them"
        in caplog.messages
    )


# --- errors --------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.jsonl, DATA / "bad.jsonl"), qwen_tokenizer) == (
        f"{DATA / 'bad.jsonl'} line 3: invalid JSON (Expecting ',' delimiter); fix or remove the line"
    )


def test_sharegpt_malformed_line(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.sharegpt, DATA / "bad.jsonl"), qwen_tokenizer) == (
        f"{DATA / 'bad.jsonl'} line 1: expected an object with a 'conversations' (or 'messages') list "
        "(keys: prompt); fix or remove the conversation"
    )


def test_sharegpt_json_list_syntax_error(qwen_tokenizer, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n', encoding="utf-8")
    assert data_error(dataset(DatasetKind.sharegpt, path), qwen_tokenizer) == (
        f"{path} line 3 column 22: invalid JSON (Expecting value); fix the file"
    )


@pytest.mark.parametrize("kind", [DatasetKind.line_by_line, DatasetKind.jsonl, DatasetKind.sharegpt])
def test_empty_file(qwen_tokenizer, kind):
    assert data_error(dataset(kind, DATA / "empty.txt"), qwen_tokenizer) == (
        f"{DATA / 'empty.txt'} is empty; pass a file with at least one prompt"
    )


def test_blank_lines_only_is_empty(qwen_tokenizer, tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\t\n", encoding="utf-8")
    assert data_error(dataset(DatasetKind.line_by_line, path), qwen_tokenizer) == (
        f"{path} is empty; pass a file with at least one prompt"
    )


def test_missing_file(qwen_tokenizer):
    path = DATA / "does_not_exist.jsonl"
    assert data_error(dataset(DatasetKind.jsonl, path), qwen_tokenizer) == (
        f"dataset.path: file not found: {path}; pass an existing file"
    )


def test_directory_instead_of_file(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.line_by_line, DATA), qwen_tokenizer) == (
        f"dataset.path: {DATA} is a directory; pass a file"
    )


def test_invalid_utf8_names_line(qwen_tokenizer, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first\nsecond\ncaf\u00e9\n".encode("latin-1"))
    assert data_error(dataset(DatasetKind.line_by_line, path), qwen_tokenizer) == (
        f"{path} line 3: invalid UTF-8 (byte 0xe9); save the file as UTF-8"
    )


def test_line_without_prompt_or_messages(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.jsonl, DATA / "no_prompt.jsonl"), qwen_tokenizer) == (
        f"{DATA / 'no_prompt.jsonl'} line 2: missing 'prompt' or 'messages' (keys: text, id); "
        "add one of them or remove the line"
    )


def test_max_tokens_negative(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.jsonl, DATA / "bad_max_tokens.jsonl"), qwen_tokenizer) == (
        f"{DATA / 'bad_max_tokens.jsonl'} line 2: 'max_tokens' must be a positive integer, got -5; "
        "fix the value or remove the key"
    )


@pytest.mark.parametrize("value", ["0", "1.5", '"16"', "true", "[16]"])
def test_max_tokens_not_positive_integer(qwen_tokenizer, tmp_path, value):
    path = tmp_path / "max.jsonl"
    path.write_text(f'{{"prompt": "Hello there", "max_tokens": {value}}}\n', encoding="utf-8")
    assert data_error(dataset(DatasetKind.jsonl, path), qwen_tokenizer) == (
        f"{path} line 1: 'max_tokens' must be a positive integer, got {value}; fix the value or remove the key"
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('["Hello there"]', "expected a JSON object with 'prompt' or 'messages', got [\"Hello there\"]; "
                            "fix or remove the line"),
        ('{"prompt": "Hi", "messages": []}', "has both 'prompt' and 'messages'; keep one of them"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string, got \"\"; fix or remove the line"),
        ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with string 'role' and 'content', "
                                             "got {\"role\": \"user\"}; fix or remove the line"),
    ],
)
def test_jsonl_bad_line(qwen_tokenizer, tmp_path, line, problem):
    path = tmp_path / "lines.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert data_error(dataset(DatasetKind.jsonl, path), qwen_tokenizer) == f"{path} line 1: {problem}"


@pytest.mark.parametrize(("text", "problem"), [
    ('[{"conversations": [{"from": "human", "value": 42}]}]',
     "item [0]: conversations[0].value must be a string, got 42"),
    ('[{"conversations": [{"from": "human", "value": "hi"}]}, {"messages": [{"role": "user", "content": ["hi"]}]}]',
     'item [1]: messages[0].content must be a string, got ["hi"]'),
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": 1, "value": "hello"}]}]',
     "item [0]: conversations[1].from must be a string, got 1"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}\n{"conversations": [{"from": "gpt", "value": true}]}',
     "line 2: conversations[0].value must be a string, got true"),
], ids=["number text", "list content", "number speaker", "jsonl line"])
def test_sharegpt_wrong_field_type(qwen_tokenizer, tmp_path, text, problem):
    path = tmp_path / "conversations.json"
    path.write_text(text + "\n", encoding="utf-8")
    assert data_error(dataset(DatasetKind.sharegpt, path), qwen_tokenizer) == (
        f"{path} {problem}; fix or remove the conversation"
    )


def test_sharegpt_no_human_turn(qwen_tokenizer):
    assert data_error(dataset(DatasetKind.sharegpt, DATA / "no_human.json"), qwen_tokenizer) == (
        f"{DATA / 'no_human.json'}: none of the 2 conversations has a human turn with text; each needs a turn "
        'with "from": "human" (or "role": "user") and a non-empty value'
    )


# (dataset option, override of a key that option does not use, the whole error line)
UNUSED_KEYS = [
    ("random", "dataset.path=prompts.txt",
     "dataset.path is set to 'prompts.txt', but dataset=random generates its prompts and reads no file; "
     "pick a file dataset (dataset=sharegpt, line_by_line or jsonl) or set dataset.path=null"),
    ("random", "dataset.use_reply_length=true",
     "dataset.use_reply_length applies only to dataset=sharegpt, got dataset=random; "
     "pass dataset.use_reply_length=false, or set max_tokens per line in a jsonl file"),
    ("jsonl", "dataset.prefix_length=8",
     "dataset.prefix_length applies only to dataset=random, got 8 with dataset=jsonl; pass dataset.prefix_length=0"),
    ("sharegpt", "dataset.prefix_length=8",
     "dataset.prefix_length applies only to dataset=random, got 8 with dataset=sharegpt; "
     "pass dataset.prefix_length=0"),
    ("line_by_line", "dataset.use_reply_length=true",
     "dataset.use_reply_length applies only to dataset=sharegpt, got dataset=line_by_line; "
     "pass dataset.use_reply_length=false, or set max_tokens per line in a jsonl file"),
]


@pytest.mark.parametrize("group, override, message", UNUSED_KEYS, ids=[f"{c[0]} {c[1]}" for c in UNUSED_KEYS])
def test_unused_key_rejected(group, override, message):
    path = [] if group == "random" else ["dataset.path=prompts.txt"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigError) as raised:
            to_run_config(compose("config", overrides=[f"dataset={group}", *path, override]))
    assert str(raised.value) == message


def test_random_accepts_null_path():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = to_run_config(compose("config", overrides=["dataset=random", "dataset.path=null",
                                                            "dataset.prefix_length=8"]))
    assert config.dataset.path is None
    assert config.dataset.prefix_length == 8


# --- config groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["sharegpt", "line_by_line", "jsonl"])
def test_group_composes_wide_bounds(group):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = to_run_config(compose("config", overrides=[f"dataset={group}", "dataset.path=prompts.txt"]))
    assert config.dataset.kind is DatasetKind(group)
    assert (config.dataset.min_prompt_length, config.dataset.max_prompt_length) == (1, 1_000_000)
    assert config.dataset.use_reply_length is False


@pytest.mark.parametrize("group", ["sharegpt", "line_by_line", "jsonl"])
def test_group_requires_path(group):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigError) as raised:
            to_run_config(compose("config", overrides=[f"dataset={group}"]))
    assert str(raised.value) == f"dataset.path is required for dataset={group}; pass dataset.path=/path/to/file"


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """The bundled Qwen2.5 tokenizer with its chat template removed."""
    from transformers import AutoTokenizer

    source = REPO / "runner" / "tokenizers" / "qwen2.5"
    target = tmp_path_factory.mktemp("no_template")
    (target / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    settings = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings.pop("chat_template")
    (target / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(target))


def test_chat_needs_template(plain_tokenizer):
    assert data_error(dataset(DatasetKind.line_by_line, DATA / "prompts.txt"), plain_tokenizer, api=Api.chat) == (
        "model.tokenizer has no chat template, so chat prompt lengths cannot be counted; "
        "pass a tokenizer with a chat template, or an endpoint.url ending in /v1/completions"
    )


def test_completions_without_template(plain_tokenizer):
    prompts = build_prompts(dataset(DatasetKind.line_by_line, DATA / "prompts.txt"), plain_tokenizer, 3,
                            Api.completions)
    assert sorted(prompt.prompt_tokens for prompt in prompts) == [2, 7, 8]
