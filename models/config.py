"""YAML app configs validated into dataclasses.

Every command of the project (train.py, test.py, the cloud and device daemons) takes a YAML file plus
``key=value`` overrides. This module turns them into a typed dataclass and refuses, with the offending key
named, anything that does not fit: unknown keys, wrong types, values outside their allowed set.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit its dataclass; the message names the key."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` and ``5E+2`` are floats: PyYAML follows YAML 1.1, which wants a
    dot in a float, so ``lr=1e-3`` would otherwise be the string "1e-3" (YAML 1.2 reads it as a float)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """Parse YAML text with ``_Loader`` (safe: plain data only)."""
    return yaml.load(text, Loader=_Loader)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list[{_type_name(inner)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against type ``tp``; return it (ints widened to float where a float is expected)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf; no key means them
        raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        nested = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and nested:  # a mapping is meant for the nested config: keep its own error
            return _coerce(key, value, nested[0])
        # Exact type matches first so that 3 stays an int in ``int | float`` instead of becoming 3.0.
        for arg in args:
            if arg is not type(None) and isinstance(arg, type) and type(value) is arg:
                return value
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, source=f"config key '{key}'")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key and value.

    A class may list keys it no longer has in ``REMOVED_KEYS`` (key -> what to use instead), so that an old
    config is told why it fails, not only that the key is unknown.

    Raises:
        ConfigError: naming the unknown or ill-typed key and ``source`` (e.g. the YAML path).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of key: value, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    removed = getattr(cls, "REMOVED_KEYS", {})
    for key in data:
        if key in removed:
            raise ConfigError(f"{source}: config key {key!r} was removed: {removed[key]}")
    unknown = sorted((k for k in data if k not in fields), key=str)  # keys may be of mixed types (1: x, a: y)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key {str(unknown[0])!r} (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        try:
            kwargs[name] = _coerce(name, value, hints[name])
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: required config key '{missing[0]}' is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return obj


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars/lists (``lr=0.1``, ``exits=[3,5]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key] = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override for config key '{key}': cannot parse {raw!r}: {err}") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return {} if data is None else data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) with ``key=value`` overrides on top."""
    data = load_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of key: value")
    data = {**data, **parse_overrides(overrides)}
    return from_dict(cls, data, source=str(path) if path is not None else "config")


def parse_app_argv(cls: type[T], argv: Sequence[str]) -> T:
    """Parse the train.py/test.py command line: ``app:PATH.yml`` then ``key=value`` overrides.

    Example: ``["app:apps/quickstart_train.yml", "num_epochs=2"]``.
    """
    app = [a for a in argv if a.startswith("app:")]
    rest = [a for a in argv if not a.startswith("app:")]
    if len(app) > 1:
        raise ConfigError("give one app:PATH.yml, got " + ", ".join(app))
    path = app[0][len("app:"):] if app else None
    return load_config(cls, path, rest)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# Checks shared by the configs' ``validate`` methods; each raises ConfigError naming the key.

def check_at_least(cfg: Any, keys: Sequence[str], minimum: float) -> None:
    """Every ``cfg.<key>`` must be finite and ``>= minimum`` (NaN compares false with everything: say so)."""
    for key in keys:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= minimum):
            raise ConfigError(f"config key '{key}': must be a finite number >= {minimum}, got {value}")


def check_positive(cfg: Any, keys: Sequence[str]) -> None:
    """Every ``cfg.<key>`` must be finite and ``> 0``."""
    for key in keys:
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"config key '{key}': must be a finite number > 0, got {value}")


def check_files(cfg: Any, keys: Sequence[str]) -> None:
    """Every ``cfg.<key>`` that is set must name an existing file."""
    for key in keys:
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"config key '{key}': file {path!r} does not exist")


def check_log_level(cfg: Any, key: str = "log_level") -> None:
    """``cfg.<key>`` must be a logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL; any case)."""
    value = getattr(cfg, key)
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"config key '{key}': unknown level {value!r}")
