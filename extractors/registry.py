"""The extractor registry: ``register``, ``list_extractors``, ``create_extractor``."""

from __future__ import annotations

from typing import Any

from extractors.base import Extractor
from pipelines.registry import Registry

EXTRACTORS: Registry[Extractor] = Registry("extractor", entry_point_group="hallucinate.extractors")

register = EXTRACTORS.register


def list_extractors(pattern: str = "*") -> list[str]:
    return EXTRACTORS.names(pattern)


def default_extractors() -> list[str]:
    """The weight-free set ``extractors=default`` expands to."""
    return [n for n in EXTRACTORS.names() if EXTRACTORS.get(n).in_default_set]


def get_extractor_class(name: str) -> type[Extractor]:
    return EXTRACTORS.get(name)


def create_extractor(name: str, **overrides: Any) -> Extractor:
    """Builds a registered extractor; options left unset keep the extractor's defaults."""
    return EXTRACTORS.get(name).from_options(overrides)
