"""Typed config trees from plain dicts: each value checked against its dataclass field's type, range or
pattern, with the full dotted key in every error; and `--set key=value` parsed into a nested dict. No config
sections live here (curriculum.config has them)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import typing
from dataclasses import field
from typing import Literal

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the dotted key (or file) and what is allowed."""


def ranged(default, *, ge=None, gt=None, le=None, lt=None):
    """A field whose value must lie in a range, checked with its type when the config is read (None passes)."""
    return field(default=default, metadata={"range": {">=": ge, ">": gt, "<=": le, "<": lt}})


def matching(default: str, pattern: str, what: str):
    """A string field that must match `pattern` in full; `what` says what is allowed."""
    return field(default=default, metadata={"pattern": pattern, "what": what})


def _yaml_bool_hint(value, key: str) -> str:
    if not isinstance(value, bool):
        return ""
    return (f"; YAML reads unquoted no/off/false and yes/on/true as booleans: quote the value, "
            f"e.g. {key.rsplit('.', 1)[-1]}: 'off'")


def _check_value(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}"
                              + _yaml_bool_hint(value, key))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {type(value).__name__}")
        return from_dict(tp, value, key + ".")
    want = origin or tp
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is float and isinstance(value, str):  # YAML reads 1e-6 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(want, '__name__', want)}, got {value!r} "
                          f"({type(value).__name__})" + _yaml_bool_hint(value, key))
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return value


def _check_rules(value, meta, key: str) -> None:
    """The range / pattern a field declares (ranged, matching); None always passes."""
    if value is None:
        return
    for op, bound in meta.get("range", {}).items():
        if bound is not None and not OPS[op](value, bound):
            limits = " and ".join(f"{o} {b}" for o, b in meta["range"].items() if b is not None)
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {limits}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"{key}: {value!r} is not allowed; it must be {meta['what']}")


OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def from_dict(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from `data`; unknown keys, wrong types and values out of a field's
    range raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {list(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _check_value(value, hints[key], prefix + key)
        _check_rules(kwargs[key], fields[key].metadata, prefix + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list) -> dict:
    """["grpo.clip_high=0.28", "variant=structured"] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. --set grpo.clip_high=0.28")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote strings, "
                              "e.g. --set 'name=\"a: b\"'") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} was set to a value by an earlier "
                                  "--set; it cannot also hold keys")
        node[parts[-1]] = value
    return out
