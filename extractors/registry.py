"""The extractor registry: ``register``, ``list_extractors``, ``create_extractor``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extractors.base import Extractor
from pipelines.config import config_from_mapping
from pipelines.registry import Registry

EXTRACTORS: Registry[Extractor] = Registry("extractor", entry_point_group="hallucinate.extractors")

register = EXTRACTORS.register


def list_extractors(pattern: str = "*") -> list[str]:
    return EXTRACTORS.names(pattern)


def default_extractors() -> list[str]:
    """The set ``extractors=default`` expands to: what runs on a fresh machine, with no download."""
    return [n for n in EXTRACTORS.names() if EXTRACTORS.get(n).in_default_set]


def get_extractor_class(name: str) -> type[Extractor]:
    return EXTRACTORS.get(name)


def create_extractor(name: str, **overrides: Any) -> Extractor:
    """Builds a registered extractor; options left unset keep the extractor's defaults."""
    return EXTRACTORS.get(name).from_options(overrides)


def build_backend(registry: Registry, options: Mapping[str, Any], default_name: str, where: str):
    """(class, typed config) of the backend that ``options["name"]`` picks from ``registry``.

    Detector, crop-feature and saliency backends are chosen inside an
    extractor's options (``detector.name=...``, ``crop.name=...``); the rest
    of the mapping is validated against that backend's own ``Config``, and
    errors name ``where``.
    """
    options = dict(options)
    cls = registry.get(options.pop("name", default_name))
    return cls, config_from_mapping(cls.Config, options, where=where)
