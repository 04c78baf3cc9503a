"""Simulated-server profiles: bundled files load, bad keys and values give one-line errors."""

import pytest

from runner.errors import ConfigError
from runner.sim.profile import PROFILES_DIR, SimProfile, available_profiles, load_profile, profile_from_dict

BUNDLED = ["default", "fast", "qwen2.5-0.5b-1gpu", "qwen2.5-7b-1gpu"]


def test_bundled_profiles_load():
    assert set(BUNDLED) <= set(available_profiles())
    for name in BUNDLED:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.faults.rate_limited == 0.0


def test_every_key_has_unit_comment():
    for name in BUNDLED:
        for line in (PROFILES_DIR / f"{name}.yaml").read_text().splitlines():
            if line and not line.lstrip().startswith("#"):
                assert "  # " in line, f"{name}.yaml: {line!r} has no comment"


def single_stream_step(profile: SimProfile) -> float:
    return profile.step_base + profile.step_per_seq


def full_batch_tps(profile: SimProfile) -> float:
    return profile.max_num_seqs / (profile.step_base + profile.step_per_seq * profile.max_num_seqs)


def test_qwen_profiles_shape():
    small = load_profile("qwen2.5-0.5b-1gpu")
    big = load_profile("qwen2.5-7b-1gpu")
    assert single_stream_step(small) == pytest.approx(0.0027, rel=0.05)
    # Decode-only upper bound; prefill work brings the measured figure down towards 8,000.
    assert 8000 <= full_batch_tps(small) <= 9500
    assert single_stream_step(big) == pytest.approx(0.012, rel=0.05)
    assert 2300 <= full_batch_tps(big) <= 2800
    assert big.max_num_seqs < small.max_num_seqs
    assert big.kv_cache_tokens < small.kv_cache_tokens


def test_default_profile_run_length():
    # Default run: 100 requests of 128 + 128 tokens, 4 at a time, so 25 rounds of 128 steps.
    profile = load_profile("default")
    step = profile.step_base + 4 * profile.step_per_seq
    assert 20 <= 25 * 128 * step <= 40
    assert profile.max_num_seqs == 16


def test_unknown_key_names_file(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("step_base: 0.001\nstep_time: 0.002\n")
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert "step_time" in message
    assert str(path) in message
    assert "step_per_seq" in message


def test_unknown_fault_key():
    with pytest.raises(ConfigError, match="faults.timeout"):
        profile_from_dict({"faults": {"timeout": 0.1}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs=0"),
        ({"max_num_seqs": 2.5}, "max_num_seqs=2.5"),
        ({"step_base": -1}, "step_base=-1"),
        ({"step_base": "fast"}, "step_base='fast'"),
        ({"eos_probability": 1.0}, "eos_probability=1.0"),
        ({"max_num_seqs": 64, "max_batched_tokens": 32}, "max_batched_tokens=32"),
        ({"faults": {"rate_limited": 1.5}}, "faults.rate_limited=1.5"),
        ({"faults": {"rate_limited": 0.6, "unavailable": 0.6}}, "faults=1.2"),
    ],
)
def test_bad_value_names_key_and_value(data, key):
    with pytest.raises(ConfigError) as info:
        profile_from_dict(data, source="test.yaml")
    message = str(info.value)
    assert key in message
    assert "test.yaml" in message
    assert "\n" not in message


def test_unknown_profile_lists_bundled():
    with pytest.raises(ConfigError, match="qwen2.5-7b-1gpu"):
        load_profile("no-such-profile")
