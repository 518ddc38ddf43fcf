"""The configuration machinery: dataclass fields with help text, read from YAML, every field also a flag.

A config is a dataclass whose fields are made with :func:`option`; the field's ``help`` metadata is its
documentation (``--help`` shows it). :func:`load_config` reads a YAML file and overrides, refusing
unknown names (with a "did you mean") and values of the wrong type, then calls the config's
``validate()`` — before any model is loaded. The configs themselves live beside this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from . import aliases


def option(default, help: str, **extra):
    """A dataclass field with its help text (and optional CLI metadata such as ``choices``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})



def with_default(cls, name: str, default):
    """The field ``name`` of the dataclass ``cls`` with another default; its help text is declared once, in ``cls``."""
    inherited = {f.name: f for f in dataclasses.fields(cls)}[name]
    return option(default, **inherited.metadata)


def check_ranges(cfg, positive=(), positive_numbers=(), non_negative=(), unit_interval=()) -> None:
    """Each named field is positive / a positive finite number / a non-negative finite number / in [0, 1]."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in positive_numbers:
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ConfigError(f"{name} must be a positive number, got {getattr(cfg, name)}")
    for name in non_negative:
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):
            raise ConfigError(f"{name} must be a non-negative number, got {getattr(cfg, name)}")
    for name in unit_interval:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")


def _base_type(annotation) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as ``int | None`` or ``list[str]``."""
    hint = annotation
    if isinstance(hint, str):
        hint = eval(hint, {"list": list, "str": str, "int": int, "float": float, "bool": bool, "None": None})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _coerce(cls, name: str, value: Any, source: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    base, is_list = _base_type(f.type)
    if value is None:
        return None
    try:
        if is_list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise TypeError
            return [base(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base in (int, float) and isinstance(value, str):
            return base(value)
        raise TypeError
    except (TypeError, ValueError):
        expected = f"a list of {base.__name__}" if is_list else base.__name__
        raise ConfigError(f"{source}: '{name}' must be {expected}, got {value!r}") from None


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from a YAML file and overrides (flags win), validating names and types. TRL's option
    names are accepted as aliases (:mod:`.aliases`)."""
    values: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        values.update(_known(cls, names, loaded, str(path)))
    values.update(_known(cls, names, overrides or {}, "command line"))
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _known(cls, names: list[str], given: dict, source: str) -> dict[str, Any]:
    """``given`` with TRL aliases resolved and values coerced to each field's type; unknown names refused."""
    accepted = set(names) | set(aliases.alias_names(set(names))) | aliases.refused_names(set(names))
    for key in given:
        if key not in accepted:
            hint = difflib.get_close_matches(str(key), sorted(accepted), n=1)
            raise ConfigError(f"{source}: unknown option '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    resolved = aliases.resolve(dict(given), set(names), source)
    return {key: _coerce(cls, key, value, source) for key, value in resolved.items()}


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, documented by its help text; unset flags do not override the YAML. TRL's names
    of the options are accepted too (not listed in ``--help``)."""
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        parser.add_argument(f"--{f.name}", **_flag(f))
    for alias, target in aliases.alias_names(set(fields)).items():
        if alias in aliases.CONVERTED or _base_type(fields[target].type)[0] is bool:
            kwargs = {"nargs": "?", "const": True, "type": _bool_or_text}
        else:
            kwargs = {k: v for k, v in _flag(fields[target]).items() if k not in ("choices", "help")}
        parser.add_argument(f"--{alias}", dest=alias, **{**kwargs, "default": argparse.SUPPRESS,
                                                         "help": argparse.SUPPRESS})
    for refused in aliases.refused_names(set(fields)):
        parser.add_argument(f"--{refused}", dest=refused, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _flag(f) -> dict[str, Any]:
    """argparse keyword arguments of the field ``f``'s flag."""
    base, is_list = _base_type(f.type)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    choices = f.metadata.get("choices")
    listed = f" One of: {', '.join(choices)}." if choices else ""
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                              "help": f"{f.metadata.get('help', '')}{listed} (default: {default})".replace("%", "%%")}
    if choices:
        kwargs["choices"] = choices
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif is_list:
        kwargs.update(nargs="*", type=base, metavar=f.name.upper())
    else:
        # "none" stays a string where it is one of the choices (scale_rewards: none)
        kwargs["type"] = base if "none" in (choices or ()) else _optional(base)
        kwargs["metavar"] = base.__name__.upper() if not choices else "{" + ",".join(choices) + "}"
        if "nargs" in f.metadata:
            kwargs.update(nargs=f.metadata["nargs"], const=f.metadata["const"])
    return kwargs


def _bool_or_text(text: str):
    """A TRL-style flag value: true/false words become booleans, anything else stays text (a path)."""
    lowered = text.lower()
    if lowered in aliases.TRUE_WORDS + aliases.FALSE_WORDS:
        return lowered in aliases.TRUE_WORDS
    return text


def _optional(base):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    known = names | set(aliases.alias_names(names)) | aliases.refused_names(names)
    overrides = {k: v for k, v in vars(args).items() if k in known}
    return load_config(cls, getattr(args, "config", None), overrides)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
