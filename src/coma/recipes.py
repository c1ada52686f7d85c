"""Dataclass configs <-> YAML recipes <-> CLI flags.

A recipe maps 1:1 onto a dataclass (nested dataclasses are YAML sections); every field also gets a CLI flag
(``--field`` for top-level fields, ``--section.field`` for nested ones) that overrides the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_MISSING = object()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _scalar_parser(tp: Any):
    """argparse ``type`` for a field annotation (Optional[...] unwrapped, lists/dicts given as YAML)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_parser(args[0]) if len(args) == 1 else yaml.safe_load
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    return yaml.safe_load


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per dataclass field; defaults are a sentinel so only flags the user gave override."""
    for field in dataclasses.fields(cls):
        tp = _field_types(cls)[field.name]
        name = f"{prefix}{field.name}"
        if _is_dataclass_type(tp):
            add_config_arguments(parser, tp, prefix=f"{name}.")
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        parser.add_argument(flag, dest=name, type=_scalar_parser(tp), default=_MISSING, help=help_text,
                            metavar=field.name.upper())  # fmt: skip


def config_from_args(cls: type[T], args: argparse.Namespace, config_file: str | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML recipe (if any), then the CLI flags that were given."""
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping")
        data = loaded
    for key, value in vars(args).items():
        if value is _MISSING or key.startswith("_") or key in ("command", "config"):
            continue
        section = data
        *parents, leaf = key.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = value
    return from_dict(cls, data, source=config_file or "<flags>")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {name!r} must be a mapping")
            section = from_dict(tp, value, source=f"{source}:{name}")
            # A section overrides the parent's own defaults for it (e.g. stage 2's batch of 1024), not the section
            # class's generic ones.
            default = fields[name].default_factory
            if default is not dataclasses.MISSING:
                section = dataclasses.replace(default(), **{key: getattr(section, key) for key in value})
            value = section
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
