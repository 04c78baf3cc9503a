"""Random prompts: exact token lengths with the real Qwen2.5 tokenizer."""

from runner.config import Api, DatasetConfig
from runner.data import build_prompts, fingerprint


def test_lengths_exact(qwen_tokenizer):
    config = DatasetConfig(min_prompt_length=5, max_prompt_length=900, seed=3)
    prompts = build_prompts(config, qwen_tokenizer, 60, Api.completions)
    assert len(prompts) == 60
    for prompt in prompts:
        assert 5 <= prompt.prompt_tokens <= 900
        assert len(qwen_tokenizer.encode(prompt.text, add_special_tokens=False)) == prompt.prompt_tokens
        assert qwen_tokenizer.encode(prompt.text, add_special_tokens=False) == prompt.token_ids


def test_prefix_shared_and_counted(qwen_tokenizer):
    config = DatasetConfig(min_prompt_length=20, max_prompt_length=20, prefix_length=16)
    prompts = build_prompts(config, qwen_tokenizer, 5, Api.completions)
    prefixes = {tuple(prompt.token_ids[:16]) for prompt in prompts}
    assert len(prefixes) == 1
    assert all(prompt.prompt_tokens == 36 for prompt in prompts)
    assert len({tuple(prompt.token_ids[16:]) for prompt in prompts}) == 5


def test_seed_reproduces_fingerprint(qwen_tokenizer):
    config = DatasetConfig(min_prompt_length=8, max_prompt_length=64, seed=7)
    first = fingerprint(build_prompts(config, qwen_tokenizer, 20))
    again = fingerprint(build_prompts(config, qwen_tokenizer, 20))
    other = fingerprint(build_prompts(DatasetConfig(min_prompt_length=8, max_prompt_length=64, seed=8),
                                      qwen_tokenizer, 20))
    assert first == again
    assert first != other


def test_num_prompts_overrides_count(qwen_tokenizer):
    config = DatasetConfig(num_prompts=3)
    assert len(build_prompts(config, qwen_tokenizer, 50)) == 3


def test_chat_counts_include_template(qwen_tokenizer):
    config = DatasetConfig(min_prompt_length=40, max_prompt_length=40)
    chat = build_prompts(config, qwen_tokenizer, 3, Api.chat)
    for prompt in chat:
        rendered = qwen_tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                      add_generation_prompt=True, tokenize=False)
        assert prompt.prompt_tokens == len(qwen_tokenizer.encode(rendered, add_special_tokens=False))
        assert len(prompt.token_ids) == 40
