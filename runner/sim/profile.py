"""Performance profiles of the simulated server.

A profile is a YAML file in ``runner/sim/profiles/`` (or any path ending in ``.yaml``) whose
keys are the fields of ``SimProfile``. Loading checks every key and value and raises
``ConfigError`` naming the file, the key, the bad value and what to pass instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class FaultRates:
    """Fractions (0 to 1) of requests that get each kind of fault instead of a normal response."""

    # Fraction rejected with 429 Too Many Requests and an OpenAI-style error body.
    rate_limited: float = 0.0
    # Fraction rejected with 503 Service Unavailable and a Retry-After header.
    unavailable: float = 0.0
    # Stream cut (connection closed) after part of the tokens.
    reset_mid_stream: float = 0.0
    # Stream that stops sending after part of the tokens and stays open for `stall_seconds`.
    stalled: float = 0.0
    # One chunk whose JSON is invalid.
    malformed_chunk: float = 0.0
    # Stream that ends without finish_reason or [DONE].
    no_terminal_event: float = 0.0
    # 200 response with a text/html body instead of server-sent events.
    non_sse_body: float = 0.0
    # Response headers sent only after `headers_delay_seconds`.
    headers_delayed: float = 0.0
    # Seconds a stalled stream stays silent before the server closes it.
    stall_seconds: float = 30.0
    # Seconds the headers of a delayed response wait.
    headers_delay_seconds: float = 5.0

    def __post_init__(self) -> None:
        total = 0.0
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_seconds"):
                _check(value >= 0, f"faults.{item.name}", value, "pass a number of seconds >= 0")
                continue
            _check(0 <= value <= 1, f"faults.{item.name}", value, "pass a fraction between 0 and 1")
            total += value
        _check(total <= 1, "faults", round(total, 6), "make the fault rates sum to at most 1")


@dataclass(frozen=True)
class SimProfile:
    """Costs and capacity of the simulated continuous-batching engine."""

    # Profile name, taken from the file name when loaded from YAML.
    name: str = "custom"
    # Seconds every engine step costs, whatever it computes.
    step_base: float = 0.005
    # Seconds each running sequence adds to a step.
    step_per_seq: float = 0.0005
    # Seconds each prompt token prefilled in a step adds to that step.
    step_per_prefill_token: float = 0.00002
    # Maximum number of sequences running at once (batch slots).
    max_num_seqs: int = 16
    # KV-cache capacity in tokens; each running sequence reserves prompt + max_tokens.
    kv_cache_tokens: int = 65536
    # Maximum tokens (decode plus prefill) one step processes; longer prompts prefill in chunks.
    max_batched_tokens: int = 2048
    # Probability per generated token of stopping early when the request does not set ignore_eos.
    eos_probability: float = 0.0
    faults: FaultRates = field(default_factory=FaultRates)

    def __post_init__(self) -> None:
        for key in ("step_base", "step_per_seq", "step_per_prefill_token"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "pass a number of seconds >= 0")
        _check(
            self.step_base + self.step_per_seq > 0,
            "step_base",
            self.step_base,
            "make step_base + step_per_seq > 0 so that time advances",
        )
        for key in ("max_num_seqs", "kv_cache_tokens", "max_batched_tokens"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, key, value, "pass an integer >= 1")
        _check(
            self.max_batched_tokens >= self.max_num_seqs,
            "max_batched_tokens",
            self.max_batched_tokens,
            f"pass at least max_num_seqs ({self.max_num_seqs}) so every running sequence can decode",
        )
        _check(0 <= self.eos_probability < 1, "eos_probability", self.eos_probability, "pass a value in [0, 1)")


def _check(condition: bool, key: str, value: Any, fix: str) -> None:
    if not condition:
        raise ConfigError(f"sim profile key {key}={value!r} is invalid; {fix}")


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    """Return the YAML file of a bundled profile name or of a path ending in .yaml."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
    else:
        path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"sim profile {name!r} not found; pass one of {', '.join(available_profiles())} "
            "or a path to a .yaml file"
        )
    return path


def load_profile(name: str) -> SimProfile:
    """Load and validate a profile by bundled name or path."""
    path = profile_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"sim profile file {path} is not valid YAML ({first_line}); fix its syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"sim profile file {path} must contain a mapping of keys, got {type(data).__name__}")
    return profile_from_dict(data, name=path.stem, source=str(path))


def profile_from_dict(data: dict[str, Any], *, name: str = "custom", source: str = "<dict>") -> SimProfile:
    """Build a SimProfile from plain values, rejecting unknown keys and wrong types."""
    data = dict(data)
    faults_data = data.pop("faults", None) or {}
    if not isinstance(faults_data, dict):
        raise ConfigError(f"sim profile {source}: faults must be a mapping of fault rates, got {faults_data!r}")
    values = _typed_values(SimProfile, data, source, prefix="")
    fault_values = _typed_values(FaultRates, faults_data, source, prefix="faults.")
    try:
        return SimProfile(name=name, faults=FaultRates(**fault_values), **values)
    except ConfigError as exc:
        raise ConfigError(f"sim profile {source}: {str(exc).removeprefix('sim profile ')}") from None


def _typed_values(cls: type, data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    known = {item.name: item for item in dataclasses.fields(cls) if item.name not in ("name", "faults")}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"sim profile {source}: unknown key {prefix}{unknown[0]}; "
            f"allowed keys are {', '.join(prefix + key for key in known)}"
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        expected = known[key].type
        if expected == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        if not ok:
            kind = "an integer" if expected == "int" else "a number"
            raise ConfigError(f"sim profile {source}: key {prefix}{key}={value!r} is invalid; pass {kind}")
        values[key] = value
    return values
