"""Loading a TrainConfig from YAML and command-line arguments (same keys in both)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from pronghorn.config.schema import EMBEDDED_MODEL_DEFAULTS, TrainConfig
from pronghorn.config.validation import ConfigError, validate_train

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_bool_or_str(value: str):
    low = str(value).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return value


def _base_type(annotation):
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return hint


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Build a validated TrainConfig from an optional YAML file and keyword overrides (which win)."""
    values = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(raw).__name__}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("model_name") is None:
        values = {**EMBEDDED_MODEL_DEFAULTS, **values}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"Unknown configuration keys {unknown}; valid keys: {sorted(known)}")
    if isinstance(values.get("target_modules"), str) and values["target_modules"] != "all-linear":
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    if "use_gradient_checkpointing" in values:
        values["use_gradient_checkpointing"] = _parse_bool_or_str(values["use_gradient_checkpointing"])
    config = TrainConfig(**values)
    validate_train(config)
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` per TrainConfig field, defaulting to None so only given values override YAML."""
    help_text = TrainConfig.field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        base = _base_type(hints[f.name])
        kwargs = {"default": None, "help": help_text[f.name]}
        if base is bool:
            kwargs["type"] = _parse_bool_or_str
            kwargs["nargs"] = "?"
            kwargs["const"] = True
        elif base in (int, float):
            kwargs["type"] = base
        parser.add_argument(f"--{f.name}", **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    return load_config(getattr(args, "config", None), **values)
