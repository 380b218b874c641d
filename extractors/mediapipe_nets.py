"""The pretrained networks inside the mediapipe 0.10.14 wheel, loaded quietly and once.

Why a module of its own: pose, faces, hands and person segmentation are
four backends in three families (``pose.skeleton``, ``odf.*``,
``sdf.person``), and each needs the same three things from MediaPipe:
the import with an install hint (later releases dropped the bundled
models, so a newer mediapipe breaks silently otherwise), its graphs built
without their absl/TensorFlow Lite start-up lines reaching the terminal,
and frames fed in with a protobuf deprecation warning silenced. The
models ship in the wheel (``mediapipe/modules/*.tflite``), so they run on
a fresh machine with no download.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipelines.errors import ConfigError
from pipelines.process import native_stderr_to_log

MEDIAPIPE_INSTALL = (
    "`pip install --no-deps mediapipe==0.10.14 && "
    "pip install absl-py attrs flatbuffers 'protobuf>=4.25.3,<5'` "
    "(`make install` does this; later releases dropped the bundled models)"
)


def solution(module: str, what: str) -> Any:
    """``mediapipe.solutions.<module>``, or a ConfigError that says how to install it."""
    try:
        import mediapipe as mp

        return getattr(mp.solutions, module)
    except (ImportError, AttributeError):
        raise ConfigError(
            f"{what}: mediapipe 0.10.14 with its {module} solution is not installed; {MEDIAPIPE_INSTALL}"
        ) from None


def weights_id(model: str) -> str:
    """The provenance of a bundled model: the mediapipe release and which of its nets."""
    import mediapipe

    return f"mediapipe-{mediapipe.__version__}-{model}"


@contextmanager
def quiet() -> Iterator[None]:
    """Around ``graph.process`` calls: native output to the log, and no protobuf deprecation
    warning (mediapipe 0.10.14 calls a protobuf 4 API that warns on every frame)."""
    with native_stderr_to_log("mediapipe"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def warm_up(factory: Callable[[], Any]) -> None:
    """Builds, runs once on a black frame and closes a throwaway graph.

    The first graph of a process starts TensorFlow Lite on its own threads
    after the constructor returns, and prints its absl lines then, over
    whatever runs next. Running one frame here waits for that start-up, so
    its lines go to the log and the videos' graphs print nothing.
    """
    with quiet():
        graph = factory()
        graph.process(np.zeros((64, 64, 3), np.uint8))
        graph.close()


class LazyGraph:
    """One MediaPipe graph, built on its first frame inside the quiet block, rebuilt after ``close``.

    Why one class: a graph built anywhere else (``sdf.person`` once built it
    at the end of ``setup``) prints TensorFlow Lite's start-up line on the
    terminal, since that line comes after the constructor returns. Stateful
    graphs (tracking hands or a person) are closed at each new video.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._graph: Any = None

    def __call__(self, frame: np.ndarray) -> Any:
        """One RGB frame's result; call it inside ``quiet()``."""
        if self._graph is None:
            self._graph = self._factory()
        return self._graph.process(np.ascontiguousarray(frame))

    def process(self, frames: np.ndarray) -> list[Any]:
        """Each RGB frame's result, in order, quietly."""
        with quiet():
            return [self(frame) for frame in frames]

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None


def landmark_box(points: np.ndarray, pad: float) -> np.ndarray:
    """Corner box (4,) in [0, 1] around (n, 2) normalised landmarks, grown by ``pad`` of its size.

    Landmarks are joints inside the body part (knuckles, eyes, hips), so the
    box through them is tighter than the part; ``pad`` restores the margin a
    detector's box would have.
    """
    lo, hi = points.min(0), points.max(0)
    grow = (hi - lo) * pad
    return np.clip(np.concatenate([lo - grow, hi + grow]), 0.0, 1.0).astype(np.float32)
