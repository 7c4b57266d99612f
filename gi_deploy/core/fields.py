"""Help and defaults written once, on the config dataclasses' fields (peft's
``field(default=..., metadata={"help": ...})``): the CLI reads them instead of re-typing them."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any


def helped(
    default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, cli: bool = True, **kwargs
) -> Any:  # noqa: A002 (peft's name)
    """``dataclasses.field`` with its help text in ``metadata["help"]``. For settings whose command-line
    options are generated from their fields (cli/_display.py ``settings_options``): ``flag`` names
    the option when it is not the field's name, ``cli=False`` keeps a field to config files."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli": cli}, **kwargs)


def _field(cls: type, name: str) -> dataclasses.Field:
    try:
        return next(f for f in dataclasses.fields(cls) if f.name == name)
    except StopIteration:
        raise KeyError(f"{cls.__name__} has no field {name!r}") from None


def default_of(cls: type, name: str) -> Any:
    """The default value of ``cls.name`` (a default_factory is called)."""
    f = _field(cls, name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def help_of(cls: type, name: str, default: bool = True) -> str:
    """The field's help text, ending with its default (as ``--help`` shows it) unless ``default`` is False."""
    f = _field(cls, name)
    text = f.metadata.get("help", "")
    if not default or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
        return text
    return f"{text} (default: {_shown(default_of(cls, name))})".strip()
