"""YAML + ``key=value`` overrides parsed once into typed dataclasses.

The CLI is the only caller: it turns text into a dataclass here and passes
plain values down, so no deep code ever reads a config file. OmegaConf does
the merging and type checking; we only translate its errors into a
``ConfigError`` that names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.errors import ConfigError

C = TypeVar("C")


def _list_fields(cls: type) -> set[str]:
    """Names of the list-typed fields of ``cls``, which accept ``a,b,c`` on the CLI."""
    hints = typing.get_type_hints(cls)
    return {
        f.name
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is list
        or any(typing.get_origin(a) is list for a in typing.get_args(hints[f.name]))
    }


def parse_overrides(cls: type, overrides: Iterable[str]) -> list[str]:
    """Checks ``key=value`` syntax and turns ``extractors=a,b`` into a YAML list.

    Make variables arrive as plain comma lists (``EXTRACTORS=a,b``), which is
    friendlier than OmegaConf's ``[a,b]``; both forms are accepted.
    """
    list_keys = _list_fields(cls)
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key in list_keys and value and not value.startswith("["):
            value = "[" + ",".join(v.strip() for v in value.split(",") if v.strip()) + "]"
        parsed.append(f"{key}={value}")
    return parsed


def _translate(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    prefix = f"{where}." if where and key else where
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return ConfigError(f"unknown config key {prefix}{key!r}: {msg}")
    return ConfigError(f"bad value for config key {prefix}{key}: {msg}")


def build_config(
    cls: type[C],
    yaml_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    where: str = "",
) -> C:
    """Schema defaults, then the YAML file, then ``key=value`` overrides."""
    try:
        cfg = OmegaConf.structured(cls)
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file {path} not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        dotlist = parse_overrides(cls, overrides)
        if dotlist:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _translate(exc, where) from None


def config_from_mapping(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """Builds ``cls`` from a mapping, e.g. one extractor's ``options`` block."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(dict(values)))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _translate(exc, where) from None


def to_plain(config: Any) -> dict[str, Any]:
    """A dataclass as JSON-able builtins (tuples become lists), for hashing and attrs."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
