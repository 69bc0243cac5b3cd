"""Typed dataclass configs from YAML plus `a.b=value` command-line overrides.

Defaults live only in the dataclasses; YAML presets under CONFIG_DIR (configs/ in a checkout,
semhitok/configs in a wheel) and overrides change fields by name,
and an unknown name is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from semhitok import CONFIG_DIR

T = TypeVar("T")


class ConfigError(ValueError):
    pass


# -- range checks (called from the configs' __post_init__; from_dict prefixes the section) ---------------
def _number(obj: Any, name: str) -> float:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # (an int is finite, and may exceed any float)
        raise ConfigError(f"{name}: must be finite, got {value!r}")
    return value


def check_min(obj: Any, minimum: float, *names: str) -> None:
    """Each field is a finite number >= minimum."""
    for name in names:
        if _number(obj, name) < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {getattr(obj, name)!r}")


def check_positive(obj: Any, *names: str) -> None:
    """Each field is a finite number > 0."""
    for name in names:
        if _number(obj, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(obj, name)!r}")


def check_range(obj: Any, lo: float, hi: float, *names: str) -> None:
    """Each field is a finite number in [lo, hi]."""
    for name in names:
        if not lo <= _number(obj, name) <= hi:
            raise ConfigError(f"{name}: must lie in [{lo}, {hi}], got {getattr(obj, name)!r}")


def check_finite(obj: Any, *names: str) -> None:
    for name in names:
        _number(obj, name)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {annotation}")
    if origin in (list, tuple):
        if isinstance(value, dict):
            raise ConfigError(f"{where}: expected a list, got the mapping {value!r}")
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if isinstance(value, dict):  # e.g. `section.lr.x=1`: a nested override on a scalar field
        raise ConfigError(f"{where}: a single value ({getattr(annotation, '__name__', annotation)}), it has no field(s) {sorted(map(str, value))}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is float and not isinstance(value, bool):
        if isinstance(value, (int, str)):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except (ValueError, OverflowError):
                raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if annotation in (int, float, str):
        if not isinstance(value, annotation) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    if typing.get_origin(annotation) is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly partial) dict; missing fields keep their defaults. A field `cls`
    retired (its RETIRED: {name: what replaced it}) is dropped when null, as 0.1 saved it, and refused when set."""
    retired = getattr(cls, "RETIRED", {})
    if given := sorted(k for k in data if k in retired and data[k] is not None):
        raise ConfigError(f"{where}.{given[0]}: no longer a field; {retired[given[0]]}")
    data = {k: v for k, v in data.items() if k not in retired}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if missing := sorted(required - set(data)):
        raise ConfigError(f"{where}: missing field(s) {missing}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a range check in __post_init__: name the section too
        raise ConfigError(f"{where}.{err}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def list_presets() -> list[str]:
    """Preset names: YAML files under CONFIG_DIR, subfolders included (`recipes/sft`)."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.y*ml"))


def resolve_preset(name_or_path: str | Path) -> Path:
    """A bare name is a preset: `tiny` -> CONFIG_DIR/tiny.yaml (a folder `tiny/` in the cwd does not hide it).
    A path needs a suffix (`my.yaml`) or a slash (`./my`, `runs/256/mllm/config.yaml`); a relative one not
    found from the cwd is looked up under CONFIG_DIR (`recipes/sft`, `recipes/sft.yaml`)."""
    text = str(name_or_path)
    path = Path(text)
    is_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if is_path:
        for candidate in (path, path.with_suffix(".yaml")) if not path.suffix else (path,):
            if candidate.is_file():
                return candidate
    if not path.is_absolute() and not text.startswith(("./", "../")):
        preset = CONFIG_DIR / (text if path.suffix in (".yaml", ".yml") else f"{text}.yaml")
        if preset.is_file():
            return preset
    if is_path:
        raise ConfigError(f"config file not found: {text}")
    raise ConfigError(f"unknown config preset {text!r}; presets: {list_presets()} (in {CONFIG_DIR}), or pass a YAML path")


# YAML is read event by event before anything is built: an alias counts the nodes it stands for, so a "billion
# laughs" document (anchors of anchors) fails after MAX_YAML_NODES, and nesting fails at MAX_YAML_DEPTH (PyYAML's
# composer recurses per level: a 20,000-deep list would end in RecursionError)
MAX_YAML_NODES = {"override": 10_000, "file": 1_000_000}
MAX_YAML_DEPTH = 64


def safe_yaml(text: str, where: str, budget: str = "file"):
    """yaml.safe_load with a node budget (aliases expanded) and a depth limit; ConfigError (one line) otherwise."""
    limit, total, sizes, stack = MAX_YAML_NODES[budget], 0, {}, []
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                total += sizes.get(event.anchor, 1)
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                total += 1
                stack.append((event.anchor, total))
                if len(stack) > MAX_YAML_DEPTH:
                    raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, start = stack.pop()
                if anchor is not None:
                    sizes[anchor] = total - start + 1
            if total > limit:
                raise ConfigError(f"{where}: YAML of more than {limit:,} values (aliases expanded)")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=3', 'c=[1,2]'] -> {'a': {'b': 3}, 'c': [1, 2]} (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a field name like section.field")
        node = tree
        *parents, leaf = parts
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} was set to a value, it has no fields")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"override {item!r}: {key.strip()} has fields set by another override")
        node[leaf] = safe_yaml(raw, f"override {item[:80]!r}", "override") if raw != "" else ""
    return tree


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], preset: str | Path | None = None, overrides: list[str] | None = None) -> T:
    return from_dict(cls, config_data(preset, overrides), where=str(preset or cls.__name__))


def config_data(preset: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The preset's (or YAML file's) mapping with the overrides merged in: the fields someone set, before defaults."""
    data: dict = {}
    if preset is not None:
        path = resolve_preset(preset)
        try:
            loaded = safe_yaml(path.read_text(), str(path)) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    return deep_merge(data, parse_overrides(overrides or []))
