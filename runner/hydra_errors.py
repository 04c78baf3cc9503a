"""One-line error messages for Hydra and OmegaConf errors of the command line.

Hydra reports a bad override or config as several lines and a cause. ``hydra_error_line``
turns such an error into one line that names the key or option and gives the override to
write instead. Only ``runner.__main__`` uses it.
"""

from __future__ import annotations

import re
import sys
import traceback
from typing import Any, Optional

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from runner.schema import container_fields, container_kind, unknown_key_hint


def is_hydra_error(exc: BaseException) -> bool:
    """Return True for errors in the command line or config tree, False for bugs in the runner."""
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return True
    # Hydra raises a plain ValueError for misused flags (--cfg with -m). OmegaConf 2.3 raises
    # an AssertionError for an override below a null key (sla.rules=... without +sla=NAME),
    # and an AttributeError when a mapping is merged into a null key (+sla={rules: ...}).
    if isinstance(exc, (ValueError, AssertionError, AttributeError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and any(part in frames[-1].filename for part in ("/hydra/", "/omegaconf/"))
    return False


_EXPECTED_TYPES = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}
# The group is everything before the last "/": "sla/nope" or "hydra/launcher/joblib".
_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^'/]+)'")
_CONTAINER_MISMATCH = "Cannot merge DictConfig with ListConfig"
_MERGED_OVERRIDE = re.compile(r"Error merging override (.+)")
_COMPOSED_OPTION = re.compile(r"In '([^']+)/([^'/]+)'")
RULES_EXAMPLE = '[{p99_ttft: "<=0.05"}]'
# Options that Hydra's plugins add to its own config groups -> the pip package of the plugin,
# and whether the runner's `launchers` extra installs it. Names from the plugins' docs at
# https://hydra.cc/docs/plugins/ (Hydra 1.3).
PLUGIN_OPTIONS: dict[str, dict[str, tuple[str, bool]]] = {
    "hydra/launcher": {
        "joblib": ("hydra-joblib-launcher", True),
        "submitit_local": ("hydra-submitit-launcher", True),
        "submitit_slurm": ("hydra-submitit-launcher", True),
        "ray": ("hydra-ray-launcher", False),
        "ray_aws": ("hydra-ray-launcher", False),
        "rq": ("hydra-rq-launcher", False),
    },
    "hydra/sweeper": {
        "optuna": ("hydra-optuna-sweeper", False),
        "ax": ("hydra-ax-sweeper", False),
        "nevergrad": ("hydra-nevergrad-sweeper", False),
    },
}
_CONVERSION = re.compile(r"could not be converted to (\w+)")


def _override_for(key: str) -> Optional[str]:
    """Return the command-line override that sets ``key``, or None when none does."""
    for arg in sys.argv[1:]:
        if arg.lstrip("+~").split("=", 1)[0] == key:
            return arg
    return None


def unknown_key_line(key: str) -> str:
    """Return the one-line error for a key that the schema does not declare."""
    override = _override_for(key)
    head = f"{override}: unknown key {key}" if override else f"unknown key {key}"
    return f"{head}; {unknown_key_hint(key)}"


def hydra_error_line(exc: BaseException) -> str:
    """Collapse a Hydra or OmegaConf error (several lines and a cause) into one line with the fix."""
    cause = exc.__cause__
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if isinstance(exc, OverrideParseException):
        return (f"invalid override {exc.override!r}: {str(exc).splitlines()[0]}; "
                f"see https://hydra.cc/docs/advanced/override_grammar/basic/ for the syntax")
    if isinstance(exc, MissingConfigException):
        match = _MISSING_OPTION.search(str(exc))
        if match:
            group, option = match.groups()
            plugin = PLUGIN_OPTIONS.get(group, {}).get(option)
            if plugin is not None:
                return _missing_plugin_line(group, option, *plugin)
            options = re.findall(r"^\t(\S+)$", str(exc).split("Config search path")[0], re.MULTILINE)
            return (f"{group}={option}: no such option in config group {group}; "
                    f"pass one of: {', '.join(options) or 'none found'}")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return unknown_key_line(key)
    mismatch = _container_mismatch_line(exc)
    if mismatch is not None:
        return mismatch
    if isinstance(cause, ValidationError) and key:
        reason = str(cause).splitlines()[0]
        if "is not a ListConfig" in reason:
            return _not_a_list_line(key)
        match = _CONVERSION.search(reason)
        if match:
            fix = f"pass {_EXPECTED_TYPES.get(match.group(1), match.group(1))}"
        elif "is not Optional" in reason:
            fix = f"pass a value for {key}, not null"
        elif "expected one of" in reason:
            fix = "pass one of the listed values"
        else:
            fix = f"fix the value of {key}"
        return f"{_override_for(key) or key}: {reason}; {fix}"
    if isinstance(exc, (AssertionError, AttributeError)):
        return _null_parent_line()
    text = str(exc).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
    return " ".join(lines) or type(exc).__name__


def _missing_plugin_line(group: str, option: str, package: str, in_extra: bool) -> str:
    kind = group.rpartition("/")[2]
    install = f"pip install {package}"
    if in_extra:
        install += " (or pip install -e '.[launchers]' in the runner's folder)"
    return f"{group}={option} needs the Hydra {kind} plugin {package}, which is not installed; run {install}"


def _null_parent_line() -> str:
    """Return the line for an override below a key that is null, which is sla unless +sla=NAME is given."""
    for arg in sys.argv[1:]:
        key, _, value = arg.lstrip("+~").partition("=")
        if key.startswith("sla."):
            return (f"{arg}: sla is null because no SLA rule set is selected; write "
                    f"+sla=custom '{key}={value}' instead, or pick a shipped rule set with +sla=NAME")
        if key == "sla" and value.lstrip().startswith("{"):
            rules = _rules_in(arg) or RULES_EXAMPLE
            return (f"{arg}: sla is a config group, so + picks one of its options by name; write "
                    f"+sla=custom 'sla.rules={rules}' to give the rules on the command line")
    return f"cannot apply the overrides {' '.join(sys.argv[1:])}: a parent key is null; set the parent first"


def _rules_in(override: str) -> Optional[str]:
    """Return the rule list of an override such as ``+sla={rules: [...]}``, written as YAML; None without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from runner.sla.rules import format_group

    try:
        value = OverridesParser.create().parse_override(override).value()
    except HydraException:
        return None
    rules = value.get("rules") if isinstance(value, dict) else None
    if not isinstance(rules, list) or not all(isinstance(group, dict) for group in rules):
        return None
    return "[" + ", ".join(format_group(group) for group in rules) + "]"


def _container_mismatch_line(exc: BaseException) -> Optional[str]:
    """Return the line for a mapping given where a list belongs, or the reverse; None for other errors."""
    text = str(exc)
    if _CONTAINER_MISMATCH not in text + str(exc.__cause__ or ""):
        return None
    merged = _MERGED_OVERRIDE.search(text)
    if merged is not None:
        return _override_mismatch_line(merged.group(1).strip())
    option = _COMPOSED_OPTION.search(text)
    if option is not None:
        # A config file of a group: OmegaConf does not name the key. A group whose schema
        # has only one list or mapping field leaves no doubt about which key it is.
        group, name = option.groups()
        fields = container_fields(group.replace("/", "."))
        if len(fields) == 1:
            (field, kind), = fields.items()
            fix = f"write it as {field}: {RULES_EXAMPLE}" if (group, field) == ("sla", "rules") else f"make it a {kind}"
            return f"{group}={name}: {field} in that config file must be a {kind}; {fix}"
    return None


def _override_mismatch_line(override: str) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return None
    found = _find_mismatch(parsed.key_or_group, parsed.value())
    if found is None:
        return None
    key, expected, value = found
    given_kind = "a mapping" if isinstance(value, dict) else "a list"
    if key == "sla.rules" and isinstance(value, dict):
        from runner.sla.rules import format_group

        return (f"{override}: sla.rules must be a list of rule groups, got {given_kind}; "
                f"put the group in a list: 'sla.rules=[{format_group(value)}]'")
    example = " such as [VALUE, VALUE]" if expected == "list" else " such as {NAME: VALUE}"
    return f"{override}: {key} must be a {expected}{example}, got {given_kind}"


def _find_mismatch(key: str, value: Any) -> Optional[tuple[str, str, Any]]:
    """Return (key, expected kind, value) for the first value whose kind the schema contradicts."""
    kind = container_kind(key)
    if kind == "list" and isinstance(value, dict):
        return key, "list", value
    if kind in ("mapping", "section") and isinstance(value, list):
        return key, "mapping", value
    if kind == "section" and isinstance(value, dict):
        for name, item in value.items():
            found = _find_mismatch(f"{key}.{name}", item)
            if found is not None:
                return found
    return None


def _not_a_list_line(key: str) -> str:
    override = _override_for(key) or key
    example = f"{key}={RULES_EXAMPLE}" if key == "sla.rules" else f"{key}=[VALUE]"
    expected = "a list of rule groups" if key == "sla.rules" else "a list"
    return f"{override}: {key} must be {expected}, got a single value; write '{example}'"
