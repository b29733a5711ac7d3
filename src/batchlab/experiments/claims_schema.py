"""A validator for the part of JSON Schema that `claims.JSON_SCHEMA` uses, so that checking a
claims.json needs no third-party package (jsonschema is used instead when it is installed;
tests check that both report the same documents as invalid).

Supported keywords: type, const, enum, required, properties, additionalProperties (false),
items, minItems, maxItems, minLength, minimum, pattern, oneOf, $ref ("#/$defs/NAME").
"""

from __future__ import annotations

import re
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def validate(doc: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation of `schema` by `doc`, as 'path: message' lines (empty: valid)."""
    out: list[str] = []
    _check(doc, schema, schema, [], out)
    return out


def _check(v: Any, s: dict[str, Any], root: dict[str, Any], path: list[Any], out: list[str]) -> None:
    where = "/".join(map(str, path)) or "document"
    if "$ref" in s:
        name = s["$ref"].removeprefix("#/$defs/")
        _check(v, root["$defs"][name], root, path, out)
        return
    if "oneOf" in s:
        matches = sum(1 for sub in s["oneOf"] if not _errors(v, sub, root))
        if matches != 1:
            out.append(f"{where}: {v!r} must match exactly one of {len(s['oneOf'])} forms")
        return
    t = s.get("type")
    if t is not None:
        names = t if isinstance(t, list) else [t]
        if not any(_is(v, n) for n in names):
            out.append(f"{where}: {v!r} is not of type {' or '.join(names)}")
            return
    if "const" in s and v != s["const"]:
        out.append(f"{where}: {v!r} was expected to be {s['const']!r}")
    if "enum" in s and v not in s["enum"]:
        out.append(f"{where}: {v!r} is not one of {s['enum']}")
    if isinstance(v, str):
        if len(v) < s.get("minLength", 0):
            out.append(f"{where}: {v!r} is too short")
        if "pattern" in s and not re.search(s["pattern"], v):
            out.append(f"{where}: {v!r} does not match {s['pattern']!r}")
    if _is(v, "number") and "minimum" in s and v < s["minimum"]:
        out.append(f"{where}: {v!r} is less than the minimum of {s['minimum']}")
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            out.append(f"{where}: {v!r} is too short")
        if len(v) > s.get("maxItems", len(v)):
            out.append(f"{where}: {v!r} is too long")
        if "items" in s:
            for i, x in enumerate(v):
                _check(x, s["items"], root, [*path, i], out)
    if isinstance(v, dict):
        for k in s.get("required", []):
            if k not in v:
                out.append(f"{where}: {k!r} is a required property")
        props = s.get("properties", {})
        for k, x in v.items():
            if k in props:
                _check(x, props[k], root, [*path, k], out)
            elif s.get("additionalProperties") is False:
                out.append(f"{where}: additional property {k!r} is not allowed")


def _errors(v: Any, s: dict[str, Any], root: dict[str, Any]) -> list[str]:
    out: list[str] = []
    _check(v, s, root, [], out)
    return out
