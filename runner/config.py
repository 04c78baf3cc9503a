"""Typed settings of one run.

Each setting is declared once here. Hydra composes YAML from ``conf/`` onto these
schemas (registered in ``runner.__main__``); ``OmegaConf.to_object`` then builds these
dataclasses, whose ``__post_init__`` checks ranges and cross-field rules. Every check
raises ``ConfigError`` with the key, the bad value and what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional
from urllib.parse import urlsplit

from runner.errors import ConfigError
from runner.redact import display_url


class EndpointKind(Enum):
    sim = "sim"
    openai = "openai"


class Api(Enum):
    chat = "chat"
    completions = "completions"


class DatasetKind(Enum):
    random = "random"
    sharegpt = "sharegpt"
    line_by_line = "line_by_line"
    jsonl = "jsonl"
    # The prompts.jsonl archived in a run folder, read back exactly as it was sent.
    replay = "replay"


class Arrival(Enum):
    poisson = "poisson"
    constant = "constant"
    gamma = "gamma"


class LoadBackend(Enum):
    # Worker processes on this machine.
    process = "process"
    # Ray actors, on this machine or on the nodes of a Ray cluster.
    ray = "ray"


class SearchVariable(Enum):
    parallel = "parallel"
    rate = "rate"


# Values of load.calibrate.
CALIBRATE_MODES = ("auto", "true", "false")

API_PATHS = {"/v1/chat/completions": Api.chat, "/v1/completions": Api.completions}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_timeout(key: str, value: Optional[float]) -> None:
    _require(value is None or value > 0, f"{key} must be > 0 seconds or null for no limit, got {value}")


@dataclass
class EndpointConfig:
    # `sim` starts the embedded simulated server on a free 127.0.0.1 port; `openai` uses `url`.
    kind: EndpointKind = EndpointKind.sim
    # Full URL for `openai`. For `sim` only the path counts, which picks the API.
    url: str = "/v1/chat/completions"
    # Name of the environment variable that contains the API key. The key itself is never stored.
    api_key_env: Optional[str] = None
    # Extra HTTP headers sent with every request.
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to open a connection.
    connect_timeout: Optional[float] = 10.0
    # Seconds of silence allowed between two chunks of a response (also before the headers).
    read_timeout: Optional[float] = 120.0
    # Seconds for a whole request; null means no limit, so long generations are never cut.
    request_timeout: Optional[float] = None
    # Seed of the simulated server (sim only).
    sim_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("connect_timeout", "read_timeout", "request_timeout"):
            _check_timeout(f"endpoint.{key}", getattr(self, key))
        if self.kind is EndpointKind.openai:
            try:
                parts = urlsplit(self.url)
                parts.port  # raises ValueError for a port that is not a number in 0-65535
            except ValueError as exc:
                raise ConfigError(f"endpoint.url is not a valid URL ({exc}), got {display_url(self.url)!r}; "
                                  f"use a URL such as http://127.0.0.1:8000/v1/chat/completions") from None
            _require(
                parts.scheme in ("http", "https") and bool(parts.netloc),
                f"endpoint.url must be a full http(s) URL such as "
                f"http://127.0.0.1:8000/v1/chat/completions, got {display_url(self.url)!r}",
            )
            sets_authorization = self.api_key_env or any(name.lower() == "authorization" for name in self.headers)
            _require(
                not (parts.username or parts.password) or not sets_authorization,
                "endpoint.url carries user:password credentials, which are sent as an Authorization header, "
                "and endpoint.api_key_env or endpoint.headers.Authorization sets that header too; "
                "keep only one of them",
            )
        _require(
            self.api_path in API_PATHS,
            f"endpoint.url must end in /v1/chat/completions or /v1/completions, got {display_url(self.url)!r}",
        )

    @property
    def api_path(self) -> str:
        path = urlsplit(self.url).path if "://" in self.url else self.url
        return path.rstrip("/") or "/"

    @property
    def api(self) -> Api:
        return API_PATHS[self.api_path]


@dataclass
class ModelConfig:
    # Model id sent in every request's `model` field.
    name: str = "qwen2.5-0.5b-instruct"
    # Tokenizer: a bundled name (`qwen2.5`), a local directory or a hub id.
    tokenizer: str = "qwen2.5"
    # Simulated-server profile used in place of this model when endpoint=sim.
    sim_profile: str = "default"

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name must not be empty; pass the model id the server serves")
        _require(bool(self.tokenizer), "model.tokenizer must not be empty; pass a path, a hub id or qwen2.5")


# The dataset options that read prompts from a file, as error messages name them.
_FILE_KINDS = "dataset=sharegpt, line_by_line or jsonl"


@dataclass
class DatasetConfig:
    kind: DatasetKind = DatasetKind.random
    # Local file for the file-based kinds (sharegpt, line_by_line, jsonl, replay); must be
    # null for random.
    path: Optional[str] = None
    # Prompt length in tokens, with a different meaning per kind:
    # - random: each prompt's length is drawn uniformly from [min, max], so min == max gives
    #   exactly that many tokens of prompt text (prefix_length and, on a chat endpoint, the
    #   chat template's tokens come on top);
    # - sharegpt, line_by_line, jsonl: a filter that keeps only the file's prompts whose length
    #   is within [min, max], counted with the client tokenizer and, on a chat endpoint, with
    #   the chat template applied;
    # - replay: not used.
    min_prompt_length: int = 128
    max_prompt_length: int = 128
    # random only: tokens of one shared prefix put before every prompt.
    prefix_length: int = 0
    # Number of distinct prompts to prepare; requests cycle through them (null: one per request).
    num_prompts: Optional[int] = None
    # Seed for prompt generation (random) or for the order in which file prompts are taken.
    seed: int = 0
    # sharegpt only: send the first reply's token count as each prompt's max_tokens.
    use_reply_length: bool = False

    def __post_init__(self) -> None:
        _require(self.min_prompt_length >= 1, f"dataset.min_prompt_length must be >= 1, got {self.min_prompt_length}")
        _require(
            self.max_prompt_length >= self.min_prompt_length,
            f"dataset.max_prompt_length must be >= dataset.min_prompt_length "
            f"({self.min_prompt_length}), got {self.max_prompt_length}",
        )
        _require(self.prefix_length >= 0, f"dataset.prefix_length must be >= 0, got {self.prefix_length}")
        _require(
            self.num_prompts is None or self.num_prompts >= 1,
            f"dataset.num_prompts must be >= 1 or null, got {self.num_prompts}",
        )
        # A key that the chosen kind does not read would change nothing, so a value other than
        # its default is rejected rather than silently ignored.
        if self.kind is DatasetKind.random:
            _require(
                self.path is None,
                f"dataset.path is set to {self.path!r}, but dataset=random generates its prompts and reads "
                f"no file; pick a file dataset ({_FILE_KINDS}) or set dataset.path=null",
            )
        else:
            _require(
                bool(self.path),
                f"dataset.path is required for dataset={self.kind.value}; pass dataset.path=/path/to/file",
            )
            _require(
                self.prefix_length == 0,
                f"dataset.prefix_length applies only to dataset=random, got {self.prefix_length} "
                f"with dataset={self.kind.value}; pass dataset.prefix_length=0",
            )
        _require(
            not self.use_reply_length or self.kind is DatasetKind.sharegpt,
            f"dataset.use_reply_length applies only to dataset=sharegpt, got dataset={self.kind.value}; "
            "pass dataset.use_reply_length=false, or set max_tokens per line in a jsonl file",
        )


@dataclass
class RequestConfig:
    # Maximum output tokens per request.
    max_tokens: int = 128
    # Minimum output tokens (sent as `min_tokens`, which vLLM and SGLang honour); null: not sent.
    min_tokens: Optional[int] = None
    # Ask the server to keep generating past the end-of-sequence token (vLLM, SGLang, llama.cpp).
    ignore_eos: bool = True
    # Stream the response as server-sent events; TTFT, TPOT and ITL need streaming.
    stream: bool = True
    temperature: Optional[float] = 0.0
    # /v1/completions only: send random prompts as token ids, so the server's prompt length is
    # exactly the dataset's (vLLM, SGLang and llama.cpp accept a list of ids as `prompt`).
    prompt_token_ids: bool = False
    # Fields merged into every request body, overriding the ones above.
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.max_tokens >= 1, f"request.max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens is not None:
            _require(
                0 <= self.min_tokens <= self.max_tokens,
                f"request.min_tokens must be between 0 and request.max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens}",
            )
        _require(
            self.temperature is None or self.temperature >= 0,
            f"request.temperature must be >= 0 or null, got {self.temperature}",
        )


@dataclass
class LoadConfig:
    # Closed loop: the number of requests in flight. Open loop: the cap on requests in flight
    # (null: no cap).
    parallel: Optional[int] = 4
    # Open-loop arrival rate in requests per second; null means closed loop.
    rate: Optional[float] = None
    # Open-loop inter-arrival distribution.
    arrival: Arrival = Arrival.poisson
    # Gamma arrivals only: shape of the gamma distribution (1 = poisson, < 1 burstier).
    burstiness: float = 1.0
    # Measured requests per run (per repeat in an SLA probe).
    number: int = 100
    # Requests sent first and left out of every statistic.
    warmup: int = 0
    # Seconds after which no new request is sent (null: no time limit).
    duration: Optional[float] = None
    # Seed of the arrival schedule.
    seed: int = 0
    # Seconds: a load point whose p99 schedule lateness (open loop) or event-loop lag exceeds
    # this is marked client-bound, and the SLA search never takes it as the server's verdict.
    max_client_delay: float = 0.025
    # Client self-calibration against a null server before the load (runner.calibrate):
    # `auto` (SLA tunes, and plain runs of at least calibrate_min_requests requests), `true`
    # or `false`.
    calibrate: str = "auto"
    # Seconds of closed-loop load sent to the null server during calibration.
    calibrate_seconds: float = 1.0
    # load.calibrate=auto: plain runs with at least this many requests (warmup included) calibrate.
    calibrate_min_requests: int = 1000
    # A load point whose request rate exceeds this fraction of the calibrated client ceiling
    # is marked client-bound. Open loop compares the target rate, closed loop the measured rps.
    max_ceiling_fraction: float = 0.8
    # Processes (or Ray actors) that send the load; null: automatic (1 for now).
    workers: Optional[int] = None
    # Where the workers run: `process` (this machine) or `ray` (Ray actors).
    backend: LoadBackend = LoadBackend.process
    # Ray cluster address passed to ray.init (implies backend=ray); null: start a local Ray instance.
    ray_address: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.max_client_delay > 0, f"load.max_client_delay must be > 0 seconds, got {self.max_client_delay}")
        # A string rather than an Enum, because Hydra turns `load.calibrate=true` into a boolean,
        # which OmegaConf stores here as "True".
        self.calibrate = str(self.calibrate).lower()
        _require(
            self.calibrate in CALIBRATE_MODES,
            f"load.calibrate must be one of {', '.join(CALIBRATE_MODES)}, got {self.calibrate!r}",
        )
        _require(
            self.calibrate_seconds > 0,
            f"load.calibrate_seconds must be > 0 seconds, got {self.calibrate_seconds}",
        )
        _require(
            self.calibrate_min_requests >= 1,
            f"load.calibrate_min_requests must be >= 1, got {self.calibrate_min_requests}",
        )
        _require(
            0 < self.max_ceiling_fraction <= 1,
            f"load.max_ceiling_fraction must be in (0, 1], got {self.max_ceiling_fraction}",
        )
        _require(
            self.workers is None or self.workers >= 1,
            f"load.workers must be >= 1 or null (automatic), got {self.workers}",
        )
        _require(
            self.ray_address is None or bool(self.ray_address.strip()),
            "load.ray_address must not be empty; pass a Ray address such as ray://host:10001, or null",
        )
        _require(
            not (self.calibrate == "true" and self.uses_ray),
            "load.calibrate=true cannot calibrate Ray actors, which may run on other nodes; "
            "pass load.calibrate=auto or false with load.backend=ray",
        )
        _require(
            self.parallel is None or self.parallel >= 1,
            f"load.parallel must be >= 1 (or null in open loop), got {self.parallel}",
        )
        _require(
            self.rate is not None or self.parallel is not None,
            "load.parallel must be set when load.rate is null (closed loop); pass load.parallel=N",
        )
        _require(self.rate is None or self.rate > 0, f"load.rate must be > 0 requests/s or null, got {self.rate}")
        _require(self.burstiness > 0, f"load.burstiness must be > 0, got {self.burstiness}")
        _require(self.number >= 1, f"load.number must be >= 1, got {self.number}")
        _require(self.warmup >= 0, f"load.warmup must be >= 0, got {self.warmup}")
        _require(
            self.duration is None or self.duration > 0,
            f"load.duration must be > 0 seconds or null, got {self.duration}",
        )

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def uses_ray(self) -> bool:
        return self.backend is LoadBackend.ray or self.ray_address is not None


@dataclass
class SearchConfig:
    # The load knob the SLA search moves.
    variable: SearchVariable = SearchVariable.parallel
    # Search range; the start value is load.parallel or load.rate.
    lower_bound: float = 1
    upper_bound: float = 512
    # Repeats of each probe; their samples are pooled.
    num_runs: int = 3
    # Bisection stops when the bracket is this narrow: absolute for parallel, relative for rate.
    parallel_resolution: int = 1
    rate_resolution: float = 0.05
    # Measured requests per repeat: at least this many ...
    min_requests: int = 100
    # ... and at least this many per concurrency slot (parallel search) ...
    requests_per_unit: float = 4.0
    # ... or this many seconds of arrivals (rate search), so a queue has time to build ...
    rate_repeat_seconds: float = 10.0
    # ... capped at this many, so probes at high load stay bounded.
    max_requests: int = 2000
    # Extra repeats allowed for a probe whose metric lies within noise of a threshold.
    max_extra_runs: int = 12
    # Relative band around a threshold that counts as noise (0.05 = 5%).
    noise_band: float = 0.05
    # Percentile rules: the band is at least tail_noise / sqrt(samples beyond the percentile),
    # e.g. 1.5 / sqrt(7.5) = 55% for a p99 over 750 requests (0 = noise_band only).
    tail_noise: float = 1.5
    # Open loop only: cap on requests in flight during rate probes (null: no cap).
    rate_parallel_cap: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.lower_bound > 0, f"search.lower_bound must be > 0, got {self.lower_bound}")
        _require(
            self.upper_bound >= self.lower_bound,
            f"search.upper_bound must be >= search.lower_bound ({self.lower_bound}), got {self.upper_bound}",
        )
        _require(self.num_runs >= 1, f"search.num_runs must be >= 1, got {self.num_runs}")
        _require(
            self.parallel_resolution >= 1,
            f"search.parallel_resolution must be >= 1, got {self.parallel_resolution}",
        )
        _require(
            0 < self.rate_resolution < 1,
            f"search.rate_resolution must be between 0 and 1 (a fraction), got {self.rate_resolution}",
        )
        _require(self.min_requests >= 1, f"search.min_requests must be >= 1, got {self.min_requests}")
        _require(self.requests_per_unit >= 0, f"search.requests_per_unit must be >= 0, got {self.requests_per_unit}")
        _require(
            self.rate_repeat_seconds >= 0,
            f"search.rate_repeat_seconds must be >= 0, got {self.rate_repeat_seconds}",
        )
        _require(
            self.max_requests >= self.min_requests,
            f"search.max_requests must be >= search.min_requests ({self.min_requests}), got {self.max_requests}",
        )
        _require(self.max_extra_runs >= 0, f"search.max_extra_runs must be >= 0, got {self.max_extra_runs}")
        _require(0 <= self.noise_band < 1, f"search.noise_band must be in [0, 1), got {self.noise_band}")
        _require(self.tail_noise >= 0, f"search.tail_noise must be >= 0, got {self.tail_noise}")
        _require(
            self.rate_parallel_cap is None or self.rate_parallel_cap >= 1,
            f"search.rate_parallel_cap must be >= 1 or null, got {self.rate_parallel_cap}",
        )


@dataclass
class SlaConfig:
    # List of rule groups; each group is a mapping metric -> "<op><threshold>" or "max"/"min".
    # Groups are tuned one by one; the rules inside one group must all hold.
    rules: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunConfig:
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    # Absent unless added with +sla=NAME.
    sla: Optional[SlaConfig] = None
    # Show the live progress bar and tables on the console.
    progress: bool = True
    # Print tracebacks instead of one-line errors.
    debug: bool = False

    def __post_init__(self) -> None:
        if self.sla is not None and self.search.variable is SearchVariable.rate:
            _require(
                self.load.rate is not None,
                "load.rate must be set as the start value when search.variable=rate; pass load.rate=1",
            )
        if self.sla is not None and self.search.variable is SearchVariable.parallel:
            start = self.load.parallel
            _require(
                start is not None and self.search.lower_bound <= start <= self.search.upper_bound,
                f"load.parallel (the search start) must lie within [search.lower_bound, search.upper_bound] "
                f"= [{self.search.lower_bound:g}, {self.search.upper_bound:g}], got {start}",
            )
        if self.sla is not None and self.search.variable is SearchVariable.rate:
            _require(
                self.search.lower_bound <= self.load.rate <= self.search.upper_bound,
                f"load.rate (the search start) must lie within [search.lower_bound, search.upper_bound] "
                f"= [{self.search.lower_bound:g}, {self.search.upper_bound:g}], got {self.load.rate:g}",
            )
