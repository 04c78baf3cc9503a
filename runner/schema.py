"""The key tree of ``RunConfig``: which keys each section has, and finding keys it lacks.

Hydra rejects an unknown key given as ``load.foo=1``, but ``+load.foo=1`` adds it past the
schema, and ``OmegaConf.to_object`` would then set it as a stray attribute that nothing
reads. ``find_unknown_key`` walks composed data against the dataclasses so that such a key
is rejected too. Free-form mappings (``endpoint.headers``, ``request.extra_body``) and the
rule list ``sla.rules`` take any key and are not walked.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Optional

from runner.config import RunConfig


@functools.lru_cache(maxsize=None)
def _sections(schema: type) -> dict[str, Optional[type]]:
    """Map each field of ``schema`` to its dataclass type, or None for a plain value or mapping."""
    hints = typing.get_type_hints(schema)
    sections: dict[str, Optional[type]] = {}
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        # Optional[SlaConfig] is a Union with None; keep the dataclass member.
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            hint = members[0] if len(members) == 1 else None
        sections[item.name] = hint if dataclasses.is_dataclass(hint) else None
    return sections


def section_schema(dotted: str) -> Optional[type]:
    """Return the dataclass of the section at ``dotted`` ("" is the root), or None when it is not one."""
    schema: Optional[type] = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        if schema is None or part not in _sections(schema):
            return None
        schema = _sections(schema)[part]
    return schema


def _is_mapping_field(dotted: str) -> bool:
    """Return True when ``dotted`` is a free-form mapping field such as endpoint.headers."""
    parent, _, name = dotted.rpartition(".")
    owner = section_schema(parent) if dotted else None
    if owner is None or name not in _sections(owner):
        return False
    return typing.get_origin(typing.get_type_hints(owner)[name]) is dict


def container_kind(dotted: str) -> Optional[str]:
    """Return "section", "mapping" or "list" for a key whose value is a container, else None."""
    if section_schema(dotted) is not None:
        return "section"
    parent, _, name = dotted.rpartition(".")
    owner = section_schema(parent)
    if owner is None or name not in _sections(owner):
        return None
    origin = typing.get_origin(typing.get_type_hints(owner)[name])
    return {dict: "mapping", list: "list"}.get(origin)


def container_fields(dotted: str) -> dict[str, str]:
    """Map each mapping or list field of the section at ``dotted`` to its kind."""
    schema = section_schema(dotted)
    if schema is None:
        return {}
    prefix = f"{dotted}." if dotted else ""
    kinds = {name: container_kind(prefix + name) for name in _sections(schema)}
    return {name: kind for name, kind in kinds.items() if kind in ("mapping", "list")}


def schema_keys(dotted: str) -> list[str]:
    """Return the keys allowed in the section at ``dotted``, sorted (empty when it is not a section)."""
    schema = section_schema(dotted)
    return sorted(_sections(schema)) if schema is not None else []


def find_unknown_key(data: Mapping[str, Any], schema: type = RunConfig, prefix: str = "") -> Optional[str]:
    """Return the dotted name of the first key in ``data`` that ``schema`` does not declare."""
    sections = _sections(schema)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in sections:
            return dotted
        child = sections[key]
        if child is not None and isinstance(value, Mapping):
            found = find_unknown_key(value, child, f"{dotted}.")
            if found is not None:
                return found
    return None


def unknown_key_hint(key: str) -> str:
    """Return the closest valid key (when one is close) and every valid key of the key's section."""
    parent, _, name = key.rpartition(".")
    allowed = schema_keys(parent)
    if not allowed:
        if _is_mapping_field(parent):
            # A free-form mapping such as endpoint.headers: Hydra adds new keys only with +.
            return f"add a key to {parent} with a leading +: +{key}=VALUE"
        return "check the spelling"
    where = f"of {parent}" if parent else "at the top level"
    hint = f"valid keys {where}: {', '.join(allowed)}"
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        hint = f"did you mean {f'{parent}.' if parent else ''}{close[0]}? {hint}"
    return hint
