"""The declared default of an experiment option (`options.py`): one value for both presets,
`preset(quick, paper)`, `derived(fn, text)` from the other options, or `unset(text)` where None
means something the experiment decides at run time. Kept on the pydantic field (whose own
default stays None, so a validated model holds only what the user set); `Options.resolve`
fills from it and `describe` renders it, so the default shown is the default used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field


@dataclass(frozen=True)
class Preset:
    """A default that differs between the quick and the paper preset."""

    quick: Any
    paper: Any

    def value(self, preset: str) -> Any:
        return self.paper if preset == "paper" else self.quick

    def text(self) -> str:
        return f"{_show(self.quick)} quick, {_show(self.paper)} paper"


@dataclass(frozen=True)
class Derived:
    """A default computed from the other (already resolved) options, e.g. 3 x epochs."""

    fn: Callable[[Any], Any]
    text: str


@dataclass(frozen=True)
class Unset:
    """No value to fill: None means what `text` says, decided by the experiment at run time."""

    text: str


def preset(quick: Any, paper: Any) -> Preset:
    return Preset(quick, paper)


def derived(fn: Callable[[Any], Any], text: str) -> Derived:
    return Derived(fn, text)


def unset(text: str) -> Unset:
    return Unset(text)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


DEFAULT_KEY = "batchlab_default"


def opt(description: str, default: Any = None, **kw: Any) -> Any:
    """A field: its meaning, its declared default (a value, `preset`, `derived`, `unset`, or
    None for "no default: off"), and pydantic's checks (`ge=`, `le=`, ...). The pydantic
    default is None either way: see the module docstring."""
    return Field(default=None, description=description,
                 json_schema_extra={DEFAULT_KEY: _Declared(default)}, **kw)


class _Declared:
    """Holds a declared default inside `json_schema_extra` (pydantic copies the dict's values
    as they are; wrapping keeps a list default from being read as schema)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def declared(field: Any) -> Any:
    """The default a field declares (None if none)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    d = extra.get(DEFAULT_KEY)
    return d.value if isinstance(d, _Declared) else None


def default_text(field: Any) -> str:
    d = declared(field)
    if isinstance(d, Preset):
        return d.text()
    if isinstance(d, (Derived, Unset)):
        return d.text
    return "none" if d is None else _show(d)
