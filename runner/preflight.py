"""Checks that stop a run early with one line instead of measuring a server that cannot answer.

- ``check_inputs``: files, rules and profiles named by the config, before the tokenizer loads.
- ``preflight``: a TCP connect and one short request before the load. Connection refused,
  or a 4xx answer that every request would get (404 wrong path or model, 401, 403, 400),
  stops the run with the server's own message.
- ``FailureGuard``: stops the load when the first ``GUARD_REQUESTS`` requests of a run (or
  all requests of its first repeat, if fewer) failed, quoting the most common error.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from runner.client.record import Prompt, RequestRecord
from runner.config import DatasetKind, EndpointKind, LoadBackend, LoadConfig, RunConfig
from runner.errors import ConfigError, DataError, EndpointError
from runner.redact import display_url

log = logging.getLogger(__name__)

# Failed requests in a row, from the start of a run, after which the load stops.
GUARD_REQUESTS = 20
# 4xx statuses that say "try again later", not "this request is wrong".
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
# Output tokens asked of the preflight request, to keep it short.
PREFLIGHT_MAX_TOKENS = 4


def check_inputs(config: RunConfig) -> None:
    """Raise ConfigError or DataError for inputs that can be checked before the tokenizer loads."""
    from runner.tokenizer import resolve_tokenizer_path

    resolve_tokenizer_path(config.model.tokenizer)
    dataset = config.dataset
    if dataset.kind is not DatasetKind.random and dataset.path:
        path = Path(dataset.path).expanduser()
        if not path.exists():
            raise DataError(f"dataset.path: file not found: {dataset.path}; pass an existing file")
        if path.is_dir():
            raise DataError(f"dataset.path: {dataset.path} is a directory; pass a file")
        if not os.access(path, os.R_OK):
            raise DataError(f"dataset.path: cannot read {dataset.path}; pass a readable file")
    if config.sla is not None:
        from runner.sla.rules import parse_rules

        parse_rules(config.sla.rules)
    if config.endpoint.kind is EndpointKind.sim:
        from runner.sim.profile import load_profile

        load_profile(config.model.sim_profile)
    if config.load.uses_ray and importlib.util.find_spec("ray") is None:
        raise ConfigError(ray_missing_message(config.load))
    key_env = config.endpoint.api_key_env
    if key_env and os.environ.get(key_env) is None:
        raise ConfigError(
            f"endpoint.api_key_env names the environment variable {key_env}, which is not set; "
            f"export it or set endpoint.api_key_env=null"
        )


def ray_missing_message(load: LoadConfig) -> str:
    """Return the error line for a run that requests Ray workers while the ray package is not installed."""
    if load.backend is LoadBackend.ray:
        key, fallback = "load.backend=ray", "set load.backend=process"
    else:
        key, fallback = f"load.ray_address={load.ray_address}", "set load.ray_address=null"
    return (f"{key} needs the ray package, which is not installed; run pip install -e '.[ray]' "
            f"in the runner's folder, or {fallback}")


def _fatal_status(status: Optional[int]) -> bool:
    return status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX


async def check_connect(url: str, timeout: Optional[float]) -> None:
    """Open and close one TCP connection to the host of ``url``; raise EndpointError on failure."""
    parts = urlsplit(url)
    safe_url = display_url(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        raise EndpointError(f"cannot connect to {safe_url}: connection refused; is the server running?") from None
    except TimeoutError:
        raise EndpointError(
            f"cannot connect to {safe_url}: no connection within {timeout:g} s (endpoint.connect_timeout); "
            f"is the server running and reachable?"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise EndpointError(f"cannot connect to {safe_url}: {reason}; check endpoint.url") from None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the connection only had to open


async def preflight(client: Any, prompt: Prompt, config: RunConfig) -> dict[str, Any]:
    """Send one short request; raise EndpointError when its answer means every request will fail.

    Returns what the manifest keeps: status, error (empty on success) and seconds taken.
    Failures that may be transient (timeouts, 5xx, 429, broken streams) are logged and the
    run goes on; ``FailureGuard`` stops it if they persist.
    """
    await check_connect(client.url, config.endpoint.connect_timeout)
    safe_url = display_url(client.url)
    tokens = max(1, min(config.request.max_tokens, max(config.request.min_tokens or 0, PREFLIGHT_MAX_TOKENS)))
    record = RequestRecord(request_id=-1)
    await client.send(dataclasses.replace(prompt, max_tokens=tokens), record)
    seconds = (record.ended_at - record.sent_at) if record.ended_at and record.sent_at else None
    result = {"status": record.status, "success": record.success, "error": record.error, "seconds": seconds}
    if _fatal_status(record.status):
        raise EndpointError(
            f"the server rejected a first test request to {safe_url}: {record.error}; "
            f"{request_field_advice(record.error) or 'check endpoint.url, model.name and the API key'}"
        )
    if not record.success:
        log.warning("preflight request to %s failed (%s); starting the load anyway", safe_url, record.error)
    return result


# Request fields some servers reject, and the setting that stops sending each.
_FIELD_FIXES = {
    "ignore_eos": "request.ignore_eos=false",
    "min_tokens": "request.min_tokens=null",
    "stream_options": "request.stream=false",
}


def request_field_advice(error: Optional[str]) -> str:
    """Return what to set when a server's error names a request field it rejects, else ''."""
    for field_name, fix in _FIELD_FIXES.items():
        if error and field_name in error:
            return f"the server does not accept the request field {field_name}; set {fix}"
    return ""


class FailureGuard:
    """Watches the first requests of a run and builds an EndpointError when all of them failed."""

    def __init__(self, limit: int = GUARD_REQUESTS) -> None:
        self.limit = limit
        self.seen = 0
        self.armed = True
        self.errors: collections.Counter[str] = collections.Counter()
        self.error: Optional[EndpointError] = None

    def disarm(self) -> None:
        self.armed = False

    def observe(self, record: RequestRecord) -> bool:
        """Count one ended request; return True when the load must stop."""
        if not self.armed:
            return False
        if record.success:
            self.armed = False
            return False
        self.seen += 1
        self.errors[record.error or "unknown error"] += 1
        if self.seen >= self.limit:
            self._trip()
            return True
        return False

    def end_of_repeat(self) -> None:
        """Stop the run if the first repeat ended with no successful request at all."""
        if self.armed and self.seen:
            self._trip()
            raise self.error  # type: ignore[misc]
        self.armed = False

    def _trip(self) -> None:
        error, count = self.errors.most_common(1)[0]
        self.armed = False
        self.error = EndpointError(
            f"all of the first {self.seen} requests failed ({count} with: {error}); stopped the load; "
            f"{request_field_advice(error) or 'check the server and endpoint.url'}"
        )
