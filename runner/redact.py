"""Keep secrets out of everything a run writes.

Secrets are the API key (read from the environment variable named by
``endpoint.api_key_env``) and the values of extra headers whose names look secret
(``+endpoint.headers.Authorization=...``). Hydra writes the composed config and the
overrides into ``.hydra/`` before the run starts, so ``redact_hydra_files`` rewrites those
files; the runner's own files get ``redact_text`` or ``redact_argv``.

A header value that only refers to an environment variable
(``'+endpoint.headers.Authorization=Bearer ${oc.env:TOKEN}'``) contains no secret, so it is
archived as written, and a replay or resume reads the variable again.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import parse_qsl, urlsplit

import yaml

REDACTED = "<redacted>"
# Header names that always carry credentials; any name containing one of SECRET_WORDS does too.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"})
SECRET_WORDS = ("token", "secret", "key", "auth", "password", "cookie")
# An override that sets a header, e.g. `+endpoint.headers.Authorization=Bearer x`. Group 2 is the header name.
_URL_OVERRIDE = re.compile(r"^[+~]{0,2}endpoint\.url=(.*)$", re.DOTALL)
_HEADER_OVERRIDE = re.compile(r"^([+~]{0,2}endpoint\.headers\.)([^=]+)=(.*)$", re.DOTALL)
# A header value that is one ${oc.env:NAME} reference, after an optional auth scheme word
# such as "Bearer". A default value (${oc.env:NAME,default}) could be a secret, so it does not match.
_ENV_REFERENCE = re.compile(r"^\s*(?:[A-Za-z][\w-]*\s+)?\$\{oc\.env:[A-Za-z_][A-Za-z0-9_]*\}\s*$")
# Header values shorter than this are not searched for in the text of written files,
# because a one- to three-character value would match unrelated text. The value of a
# secret header is still replaced wherever it sits under endpoint.headers.
MIN_SECRET_LENGTH = 4


def is_secret_header(name: str) -> bool:
    lowered = str(name).strip().lower()
    return lowered in SECRET_HEADERS or any(word in lowered for word in SECRET_WORDS)


def is_env_reference(value: Any) -> bool:
    """Return True for a header value such as ``Bearer ${oc.env:TOKEN}``, which names a variable instead of a secret."""
    return isinstance(value, str) and _ENV_REFERENCE.match(value) is not None


def url_secrets(url: Optional[str]) -> list[str]:
    """Return the password of a URL's user info and the values of secret-looking query parameters."""
    if not url or "://" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        # The config check rejects an unparsable URL with its own message. No secret can be
        # picked out of such a URL, so the whole URL is treated as one.
        return [url]
    values = [parts.password] if parts.password else []
    values += [value for name, value in parse_qsl(parts.query) if is_secret_header(name) and value]
    return values


def secret_values(headers: Mapping[str, Any], api_key_env: Optional[str], url: Optional[str] = None) -> list[str]:
    """Return the secret strings of a run: secret header values, URL credentials and the API key."""
    values = [str(value) for name, value in headers.items()
              if is_secret_header(name) and value and not is_env_reference(value)]
    values += url_secrets(url)
    if api_key_env and os.environ.get(api_key_env):
        values.append(os.environ[api_key_env])
    # The bare token of "Bearer <token>" is a secret on its own too.
    values += [value.split(None, 1)[1] for value in list(values) if " " in value.strip()]
    return sorted({value for value in values if len(value) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def secrets_from_overrides(overrides: Iterable[str]) -> list[str]:
    """Return the values of secret-looking header overrides given on the command line."""
    values = []
    for override in overrides:
        match = _HEADER_OVERRIDE.match(override)
        value = match.group(3).strip("'\"") if match else ""
        if match and is_secret_header(match.group(2)) and not is_env_reference(value):
            values.append(value)
        url = _URL_OVERRIDE.match(override)
        if url:
            values += url_secrets(url.group(1).strip("'\""))
    return values


def display_url(url: str) -> str:
    """Return ``url`` for messages: user info and secret query values become <redacted>.

    The user name goes too, since a URL that carries credentials often carries a token as
    its user name.
    """
    text = redact_text(url, url_secrets(url))
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if "@" not in parts.netloc:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{REDACTED}@{host}").geturl()


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_override(override: str, secrets: Iterable[str] = ()) -> str:
    """Return one command-line override with a secret header value replaced."""
    match = _HEADER_OVERRIDE.match(override)
    if match and is_secret_header(match.group(2)) and not is_env_reference(match.group(3).strip("'\"")):
        return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return redact_text(override, secrets)


def redact_argv(argv: Iterable[str], secrets: Iterable[str] = ()) -> list[str]:
    secrets = list(secrets)
    return [redact_override(arg, secrets) for arg in argv]


def _redact_value(value: Any, secrets: list[str], parent_key: str = "") -> Any:
    if isinstance(value, dict):
        redacted = {}
        for key, item in value.items():
            if parent_key == "headers" and is_secret_header(key) and item not in (None, "") \
                    and not is_env_reference(item):
                redacted[key] = REDACTED
            else:
                redacted[key] = _redact_value(item, secrets, str(key))
        return redacted
    if isinstance(value, list):
        return [_redact_value(item, secrets, parent_key) for item in value]
    if isinstance(value, str):
        return redact_override(value, secrets)
    return value


def redact_yaml_file(path: Path, secrets: Iterable[str]) -> None:
    """Rewrite a YAML file with secret header values and secret strings replaced."""
    secrets = list(secrets)
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    redacted = yaml.safe_dump(_redact_value(data, secrets), sort_keys=False, allow_unicode=True)
    # Text replacement as well, for a secret that YAML split or that sits in a key.
    redacted = redact_text(redacted, secrets)
    if redacted != text:
        path.write_text(redacted, encoding="utf-8")


def redact_hydra_files(folder: Path, secrets: Iterable[str]) -> None:
    """Redact every YAML file Hydra wrote under ``folder`` (``.hydra/*.yaml``, ``multirun.yaml``)."""
    secrets = list(secrets)
    for path in sorted(folder.glob("*.yaml")):
        redact_yaml_file(path, secrets)


class RedactingFilter(logging.Filter):
    """Logging filter that replaces secrets in a record's formatted message."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# Hydra's launcher logs every job's overrides ("#0 : key=value ...") at INFO.
HYDRA_LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher",)


def redact_hydra_logs(argv: Iterable[str]) -> None:
    """Keep secret header overrides out of what Hydra's launcher logs."""
    secrets = secrets_from_overrides(argv)
    if secrets:
        for name in HYDRA_LAUNCHER_LOGGERS:
            logging.getLogger(name).addFilter(RedactingFilter(secrets))


def redacted_keys(headers: Mapping[str, Any], url: Optional[str]) -> list[str]:
    """Return the endpoint keys whose archived value contains REDACTED, so it cannot be sent again."""
    keys = [f"endpoint.headers.{name}" for name, value in headers.items() if REDACTED in str(value)]
    if url and REDACTED in url:
        keys.append("endpoint.url")
    return keys


def check_not_redacted(headers: Mapping[str, Any], url: Optional[str], api_key_env: Optional[str],
                       source: Path) -> None:
    """Raise ConfigError when a header or the URL read from ``source`` is still redacted.

    Sending the text REDACTED in place of a credential would fail at the server, or worse,
    be accepted by a server that ignores the header, so the value must be passed again.
    With ``api_key_env`` set, the client replaces the Authorization header with the key.
    """
    from runner.errors import ConfigError

    if api_key_env:
        headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    keys = redacted_keys(headers, url)
    if not keys:
        return
    key = keys[0]
    if key == "endpoint.url":
        raise ConfigError(f"endpoint.url has a redacted credential in {source}; pass the full URL again: "
                          f"endpoint.url=URL")
    value = "Bearer ${oc.env:TOKEN}" if key.lower().endswith(".authorization") else "${oc.env:TOKEN}"
    raise ConfigError(
        f"{key} is redacted in {source}, so it cannot be sent again; pass it as an override, for example "
        f"'{key}={value}' to read it from the environment variable TOKEN (or endpoint.api_key_env=TOKEN "
        f"for an API key sent as Authorization: Bearer)"
    )
