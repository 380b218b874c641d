"""A name-to-class registry, one instance per extension point.

Why a class and not a module-level dict per extension point: extractors,
detector backends, saliency backends and backbones all need the same
behaviour (duplicates refused, unknown names answered with the known ones,
third-party plugins found through entry points), and writing it once keeps
those rules identical everywhere. Registering stores only the class; nothing
heavy is imported until a user builds an instance.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from pipelines.errors import ConfigError

T = TypeVar("T")


class DuplicateNameError(ValueError):
    """Two classes claimed one name; the second would silently shadow the first."""


class Registry(Generic[T]):
    """Maps names to classes for one extension point (``kind``).

    ``entry_point_group`` names a ``[project.entry-points]`` group; the
    modules listed there are imported the first time the registry is read, so
    a third-party package adds an extractor by declaring an entry point, with
    no edit to this project.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entry_point_group = entry_point_group
        self._plugins_loaded = entry_point_group is None
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@REGISTRY.register("audio.logmel")``."""

        def decorator(cls: type[T]) -> type[T]:
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                raise DuplicateNameError(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; "
                    f"pick another name for {cls.__module__}.{cls.__qualname__}"
                )
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self._entry_point_group):
            ep.load()

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        self._load_plugins()
        return sorted(n for n in self._classes if fnmatch.fnmatchcase(n, pattern))

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name lists the known ones."""
        self._load_plugins()
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._classes, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: "
                f"{', '.join(sorted(self._classes)) or '(none)'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._classes
