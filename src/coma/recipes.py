"""Dataclass configs <-> YAML recipes <-> CLI flags.

A recipe maps 1:1 onto a dataclass (nested dataclasses are YAML sections); every field also gets a CLI flag
(``--field`` for top-level fields, ``--section.field`` for nested ones) that overrides the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_MISSING = object()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# Flags people type from Hugging Face Trainer habits, next to coma's own names (`--train.save-every` = `--save-steps`).
TRAINER_NAMES = {
    "num_epochs": "num_train_epochs",
    "scheduler": "lr_scheduler_type",
    "save_every": "save_steps",
    "log_every": "logging_steps",
    "keep_checkpoints": "save_total_limit",
}
# Sections whose fields also get a short flag: `--train.max-steps` is also `--max-steps`, `--lora.r` `--lora-r`.
SHORT_FLAG_PREFIX = {"train": "", "lora": "lora-"}


def _scalar_parser(tp: Any):
    """argparse ``type`` for a field annotation: Optional[...] unwrapped, lists as ``a,b,c``, dicts as ``k=v,k2=v2``
    (both also as YAML: ``[a, b]``, ``{k: v}``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _scalar_parser(args[0])
        lists = [a for a in args if typing.get_origin(a) is list]
        return _scalar_parser(lists[0]) if lists else yaml.safe_load  # `list[str] | str`: a list flag
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        return functools.partial(parse_list, item_type=_scalar_parser(item))
    if origin is dict:
        _, value = typing.get_args(tp) or (str, str)
        return functools.partial(parse_dict, value_type=_scalar_parser(value))
    return yaml.safe_load


def _convert(text: str, convert: Callable[[str], Any], what: str) -> Any:
    try:
        return convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r} ({error})") from None


def _yaml_flow(text: str, kind: type) -> Any:
    """A flag value written in YAML flow style (``[a, b]``, ``{k: v}``), which must parse to ``kind``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r} ({error})") from None
    if not isinstance(value, kind):
        raise argparse.ArgumentTypeError(f"expected a {'list' if kind is list else 'mapping'}, got {text!r}")
    return value


def parse_list(text: str, item_type: Callable[[str], Any] = str) -> list[Any]:
    """``a,b,c`` (blanks around commas ignored) or a YAML list ``[a, b, c]``."""
    stripped = text.strip()
    if stripped.startswith("["):
        return _yaml_flow(stripped, list)
    return [_convert(item.strip(), item_type, "list item") for item in stripped.split(",") if item.strip()]


def parse_dict(text: str, value_type: Callable[[str], Any] = str) -> dict[str, Any]:
    """``k=v,k2=v2`` or a YAML mapping ``{k: v, k2: v2}``."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return _yaml_flow(stripped, dict)
    result = {}
    for item in (part.strip() for part in stripped.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(
                f"expected key=value pairs separated by commas, got {item!r} in {text!r}"
            )
        result[key.strip()] = _convert(value.strip(), value_type, f"value for {key.strip()!r}")
    return result


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_strings(
    parser: argparse.ArgumentParser, name: str, section: str | None, field_name: str
) -> list[str]:
    """The field's own flag, then the short and Trainer-style spellings that no other option has taken."""
    flags = [_flag(name)]
    if section in SHORT_FLAG_PREFIX:
        flags.append(_flag(SHORT_FLAG_PREFIX[section] + field_name))
        if section == "train" and field_name in TRAINER_NAMES:
            flags.append(_flag(TRAINER_NAMES[field_name]))
    taken = parser._option_string_actions
    return [flags[0], *(flag for flag in dict.fromkeys(flags[1:]) if flag not in taken)]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one option per dataclass field; defaults are a sentinel so only flags the user gave override.

    Fields of the ``train`` and ``lora`` sections also answer to short names (``--max-steps``, ``--learning-rate``,
    ``--lora-r``) and a few Trainer names (``--save-steps``), listed in the same ``--help`` entry. Top-level fields
    are added first, so a short name never shadows one of them.
    """
    fields = dataclasses.fields(cls)
    section = prefix.rstrip(".") or None
    for field in sorted(fields, key=lambda f: _is_dataclass_type(_field_types(cls)[f.name])):
        tp = _field_types(cls)[field.name]
        name = f"{prefix}{field.name}"
        if _is_dataclass_type(tp):
            add_config_arguments(parser, tp, prefix=f"{name}.")
            continue
        help_text = field.metadata.get("help", "")
        # A bare boolean flag means true (`--skip-bad`); `--skip-bad false` still works.
        flag_kwargs = {"nargs": "?", "const": True} if tp is bool else {}
        parser.add_argument(*_option_strings(parser, name, section, field.name), dest=name, type=_scalar_parser(tp),
                            default=_MISSING, help=help_text, metavar=field.name.upper(), **flag_kwargs)  # fmt: skip


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
