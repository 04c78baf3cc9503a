"""Config composition through real Hydra, and the one-line errors of bad values."""

import pytest
from hydra import compose, initialize_config_dir

from runner.__main__ import to_run_config
from runner.config import Api, Arrival, EndpointKind, RunConfig
from runner.errors import ConfigError, RunnerError

from paths import CONF_DIR


def build(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def test_defaults_compose():
    config = build()
    assert config.endpoint.kind is EndpointKind.sim
    assert config.endpoint.api is Api.chat
    assert config.load.parallel == 4
    assert config.load.rate is None
    assert config.sla is None
    assert config.model.sim_profile == "default"


def test_overrides_reach_typed_config():
    config = build("endpoint=openai", "endpoint.url=http://127.0.0.1:9/v1/completions",
                   "load.rate=2.5", "load.arrival=gamma", "model=qwen2.5-7b")
    assert config.endpoint.api is Api.completions
    assert config.load.rate == 2.5
    assert config.load.arrival is Arrival.gamma
    assert config.model.sim_profile == "qwen2.5-7b-1gpu"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["load.parallel=0"], "load.parallel must be >= 1 (or null in open loop), got 0"),
        (["load.number=0"], "load.number must be >= 1, got 0"),
        (["load.rate=-1"], "load.rate must be > 0 requests/s or null, got -1.0"),
        (["load.parallel=null"], "load.parallel must be set when load.rate is null"),
        (["dataset.min_prompt_length=10", "dataset.max_prompt_length=5"],
         "dataset.max_prompt_length must be >= dataset.min_prompt_length (10), got 5"),
        (["request.max_tokens=0"], "request.max_tokens must be >= 1, got 0"),
        (["endpoint=openai", "endpoint.url=localhost:8000"], "endpoint.url must be a full http(s) URL"),
        (["endpoint=openai", "endpoint.url=http://127.0.0.1:99999/v1/chat/completions"],
         "endpoint.url is not a valid URL (Port out of range 0-65535)"),
        (["endpoint=openai", "endpoint.url=http://127.0.0.1:abc/v1/chat/completions"],
         "endpoint.url is not a valid URL (Port could not be cast to integer value as 'abc')"),
        (["endpoint.url=/v1/embeddings"], "endpoint.url must end in /v1/chat/completions or /v1/completions"),
        (["endpoint.read_timeout=0"], "endpoint.read_timeout must be > 0 seconds or null for no limit, got 0.0"),
        (["dataset=random", "dataset.kind=jsonl"], "dataset.path is required for dataset=jsonl"),
    ],
)
def test_bad_value_one_line(overrides, message):
    with pytest.raises(ConfigError) as raised:
        build(*overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_wrong_type_names_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as raised:
        build("load.parallel=many")
    assert "load.parallel" in str(raised.value)


LOAD_KEYS = ("arrival, backend, burstiness, calibrate, calibrate_min_requests, calibrate_seconds, duration, "
             "max_ceiling_fraction, max_client_delay, number, parallel, rate, ray_address, seed, warmup, workers")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+load.foo=1"], f"unknown key load.foo; valid keys of load: {LOAD_KEYS}"),
        (["+load.paralel=8"], f"unknown key load.paralel; did you mean load.parallel? valid keys of load: {LOAD_KEYS}"),
        (["++dataset.prefix=8"], "unknown key dataset.prefix; did you mean dataset.prefix_length? valid keys of "
                                 "dataset: kind, max_prompt_length, min_prompt_length, num_prompts, path, "
                                 "prefix_length, seed, use_reply_length"),
        (["+colour=blue"], "unknown key colour; valid keys at the top level: dataset, debug, endpoint, load, model, "
                           "progress, request, search, sla"),
        (["+sla=custom", "sla.rules=[]", "+sla.rule=x"],
         "unknown key sla.rule; did you mean sla.rules? valid keys of sla: rules"),
    ],
)
def test_added_unknown_key_rejected(overrides, message):
    # Composed in-process, so no command-line override is quoted before the message.
    with pytest.raises(ConfigError) as raised:
        build(*overrides)
    assert str(raised.value) == message


def test_free_form_mappings_take_any_key():
    config = build("+endpoint.headers.X-Team=infra", "+request.extra_body.top_p=0.9")
    assert config.endpoint.headers == {"X-Team": "infra"}
    assert config.request.extra_body == {"top_p": 0.9}
