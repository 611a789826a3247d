"""``--set key=value``: change one config field from the command line, validated like the file.

    privlora run --set federation.rounds=3 --set lora.target_modules='["query","value"]' \\
                 --set privacy.enabled=false --out runs/short

Each ``--set`` names a dotted field (``section.key``, or a top-level key such as ``seed``) and a
value written as a TOML value (``3``, ``0.5``, ``true``, ``"text"``, ``["a", "b"]``). A value that
is not valid TOML is taken as a bare string when the field is a string
(``--set model.path=/models/minilm``, ``--set federation.strategy=fedit``). The overrides are
applied, in order (a later ``--set`` of the same key wins), to the raw table of the TOML file (or
of the embedded default), and the result goes through `config.config_from_dict`, exactly as a
file would: the same types, ranges and cross-field rules. The run's resolved ``config.toml``
therefore records every override.

Errors name the key: an unknown key lists the allowed keys of its table (the style of
`config.ConfigError`), a bad value gives the key, the value and the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Iterable

from privlora.core.config import (ConfigError, ExperimentConfig, config_from_dict, config_to_dict, load_config, read_toml,
                                  resolve_data_paths)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    """The expected type of a field, in the words a user reads in an error."""
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(inner, f"a list of {inner}")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _example(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return '\'["query","value"]\'' if inner is str else "'[1, 2]'"
    return {bool: "true", int: "3", float: "0.5", str: "text"}.get(tp, "...")


def resolve_key(key: str) -> tuple[list[str], Any]:
    """The path of a dotted key into the config and the field's type; `ConfigError` naming the
    first unknown part and the keys allowed there."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: a key is dotted names such as federation.rounds or seed, found {key!r}")
    cls: Any = ExperimentConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:i])}: is a single value, not a table; set it as --set {'.'.join(parts[:i])}=VALUE")
        fields = _fields(cls)
        if part not in fields:
            raise ConfigError(f"{where}: unknown key. Allowed keys here: {', '.join(fields)}")
        cls = fields[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{key}: is a table; set one of its keys, e.g. --set {key}.KEY=VALUE. Allowed keys here: "
                          f"{', '.join(_fields(cls))}")
    return parts, cls


def parse_value(key: str, text: str, tp: Any) -> Any:
    """``text`` as a TOML value; a bare string when it is not TOML and the field is a string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        parsed = None
    if parsed is not None and set(parsed) == {"v"}:
        return parsed["v"]
    if tp is str and "\n" not in text:
        return text
    raise ConfigError(
        f"{key}: expected {describe_type(tp)}, found {text!r}, which is not a TOML value; "
        f"e.g. --set {key}={_example(tp)}"
    )


def split_assignment(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, value), both stripped; `ConfigError` when there is no ``=``."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set federation.rounds=3 "
            "(quote the whole argument when the value has spaces or brackets)"
        )
    return key, value.strip()


def check_value(key: str, value: Any, tp: Any) -> Any:
    """Refuse a value of the wrong type with the key, the value and the expected type."""
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, found {value!r}; quote it: --set {key}='\"{value}\"'")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, found {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, found {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}: expected a number, found {value!r}")
    if typing.get_origin(tp) is tuple and not isinstance(value, list):
        raise ConfigError(f"{key}: expected {describe_type(tp)}, found {value!r}; e.g. --set {key}={_example(tp)}")
    return value


def parse_overrides(assignments: Iterable[str]) -> dict[str, Any]:
    """``["federation.rounds=3", ...]`` -> ``{"federation.rounds": 3, ...}`` (typed, checked)."""
    out: dict[str, Any] = {}
    for text in assignments:
        key, value_text = split_assignment(text)
        _, tp = resolve_key(key)
        out[key] = check_value(key, parse_value(key, value_text, tp), tp)
        if key == "data.source":  # a relative path on the command line means the current folder's file
            out[key] = resolve_data_paths({"data": {"source": out[key]}}, Path.cwd())["data"]["source"]
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config table with each dotted key set (typed values, e.g. from
    `parse_overrides` or a TOML table); checks every key and value type."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        parts, tp = resolve_key(key)
        check_value(key, value, tp)
        table = out
        for i, part in enumerate(parts[:-1]):
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{where}: expected a table [{where}] in the config, found {sub!r}")
            table = sub
        table[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def read_table(path: str | Path | None) -> dict[str, Any]:
    """The raw table of a TOML config (the embedded default's when ``path`` is None)."""
    if path is None:
        return config_to_dict(ExperimentConfig())
    return read_toml(path)


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested table (e.g. ``[sweep.set]`` with ``federation.rounds = 3``) as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _blame(exc: ConfigError, overrides: dict[str, Any]) -> ConfigError:
    """Say which --set a validation error comes from, when it names an overridden field."""
    msg = str(exc)
    for key, value in overrides.items():
        if msg.startswith((key + ":", key + "[")):
            return ConfigError(f"{msg} (from --set {key}={value!r})")
    return exc


def resolve(raw: dict[str, Any], overrides: dict[str, Any], blame: bool = True) -> ExperimentConfig:
    """Apply typed overrides to a raw table and validate the result like a file; with ``blame``,
    an error in an overridden field says which ``--set`` it came from."""
    merged = apply_overrides(raw, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        blamed = _blame(exc, overrides) if blame else exc
        if blamed is exc:
            raise
        raise blamed from exc


def load_with_overrides(path: str | Path | None, assignments: Iterable[str] = ()) -> ExperimentConfig:
    """`load_config(path)` with ``--set`` assignments applied first; without any, the same as it."""
    assignments = list(assignments or ())
    if not assignments:
        return load_config(path)
    overrides = parse_overrides(assignments)
    return resolve(read_table(path), overrides)


__all__ = [
    "apply_overrides",
    "describe_type",
    "flatten",
    "load_with_overrides",
    "parse_overrides",
    "read_table",
    "resolve",
    "resolve_key",
]
