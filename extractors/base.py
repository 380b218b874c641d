"""The one small interface every descriptor family implements.

An extractor is a *stage* in the NeMo-Curator sense: it declares what it
needs (frames at some fps and size, audio at some rate, the outputs of other
extractors) and what it produces, loads its models once per worker in
``setup``, turns one video into arrays in ``process`` and frees resources in
``teardown``. The orchestrator reads the declarations to decode each video
once per sampling, to order dependent extractors and to place GPU stages on
GPU workers; extractors never open files or shards themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol

import numpy as np

from pipelines.config import config_from_mapping, to_plain
from pipelines.errors import HallucinateError


@dataclass(frozen=True)
class FrameSpec:
    """How frames are sampled for an extractor.

    ``fps`` is an upper bound: frames are dropped to reach it, never
    duplicated. ``size`` is (width, height); ``short_side`` keeps the aspect
    ratio instead. ``max_short_side`` is an upper bound too: larger frames
    are shrunk to it (aspect kept), smaller ones decoded as they are, since
    enlarging a 160x120 video adds cost and no information to a
    descriptor. ``None`` means the video's own value.
    """

    fps: float | None = None
    size: tuple[int, int] | None = None
    short_side: int | None = None
    max_short_side: int | None = None


# Sampling defaults for real video, per family (README, "Extractors").
# Real pipelines resize before anything else (MMAction2's and Kinetics'
# pre-processing keep a short side of 256 or 320; video_features resizes for
# every model). At native size one 1080p clip cost more than the rest of the
# eight real clips together, and nothing in the defaults gains from the
# pixels: the descriptors pool over coarse grids, the HOG window is 64x128,
# the saliency maps are 160x128. Set per extractor (options.<name>.fps,
# .short_side), these values are written into each config, so they are in
# the provenance and the cache key.
SHORT_SIDE = 256
# Flow, and what reads it (OFF, IDT) or moves with it (SDF): motion within
# 1/15 s stays within DIS's search range at this size, and half the pairs of
# a 30 frame/s video halve their cost.
MOTION_FPS = 15.0
# Detectors (ODF), pose and person masks: boxes, joints and people change
# slowly next to flow, and one every 0.2 s is what the Eq. 16 pooling of a
# clip needs. HOG was the costliest default; MediaPipe Pose's two passes
# cost about 40 ms a frame (19 s over the eight real clips at 10 frames/s,
# 11 s at 5). One rate for all of them also means one decoded sampling, and
# odf.pose's boxes line up with pose.skeleton's frames. ST-GCN (pose.stgcn)
# was trained at 30 frames/s: set options.pose.skeleton.fps=30 for it.
DETECTION_FPS = 5.0

# What an extractor runs, as ``hallucinate extractors`` and the README say it.
# Pretrained models ship inside an installed package, so they run on a fresh machine.
WEIGHTS_KINDS = {
    "pretrained": "a pretrained model that ships with an installed package",
    "heuristic": "a heuristic (no learnt weights)",
    "checkpoint": "random weights until given a checkpoint",
    "derived": "another extractor's stored output",
}


# The flag of a video too short for an extractor (flow needs two frames): a named,
# final condition like ``no_audio``, never retried, masked by the trainer.
TOO_FEW_FRAMES = "too_few_frames"


class FlaggedInput(HallucinateError):
    """An extractor's input is flagged (absent for a reason), so its own result is too.

    Raised by readers of another extractor's arrays (``flow_input``); the
    runner stores the input's flags as this extractor's flagged result, so
    one 1-frame clip gives ``too_few_frames`` in flow and in everything that
    reads flow, and none of them is recorded as a failure.
    """

    def __init__(self, source: str, flags: Mapping[str, str]) -> None:
        self.source = source
        self.flags = dict(flags)
        super().__init__(f"{source} is flagged: " + "; ".join(f"{k}: {v}" for k, v in self.flags.items()))


@dataclass(frozen=True)
class AudioSpec:
    """Mono audio resampled to ``rate`` Hz."""

    rate: int = 16000


@dataclass(frozen=True)
class Needs:
    frames: FrameSpec | None = None
    audio: AudioSpec | None = None
    inputs: tuple[str, ...] = ()  # names of extractors whose results this one reads


@dataclass(frozen=True)
class OutputSpec:
    """Shape (``None`` for a variable axis) and dtype of one produced array."""

    shape: tuple[int | None, ...]
    dtype: str
    doc: str = ""


@dataclass(frozen=True)
class Resources:
    """What one instance occupies; GPU stages are routed to GPU workers."""

    cpus: int = 1
    gpus: int = 0


@dataclass(frozen=True)
class FrameBatch:
    frames: np.ndarray  # (n, height, width, 3) uint8 RGB
    timestamps: np.ndarray  # (n,) float64 seconds


@dataclass(frozen=True)
class AudioTrack:
    samples: np.ndarray  # (n,) float32 mono in [-1, 1]
    rate: int


class VideoInput(Protocol):
    """What ``process`` sees of a video; implemented by ``pipelines.decode``."""

    video_id: str
    path: str

    def frames(self, spec: FrameSpec, chunk: int = 32) -> Iterator[FrameBatch]:
        """Frames in order, ``chunk`` at a time, so a long video never sits in memory."""
        ...

    def audio(self, spec: AudioSpec) -> AudioTrack | None:
        """The whole mono track, or ``None`` when the file has no audio stream."""
        ...


@dataclass
class Result:
    """One extractor's output for one video.

    ``flags`` mark a *legitimate absence* (``no_audio``, ``no_boxes``): the
    video is fine but the modality is missing, so the trainer masks the
    stream instead of regressing it towards zeros. A flagged result may carry
    no arrays at all.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)  # flag -> human reason
    attrs: dict[str, Any] = field(default_factory=dict)  # extra provenance
    # Handed to dependent extractors of the same run, never stored (e.g. flow
    # nobody asked to keep: 300 KB a frame). See ``Extractor.transient_outputs``.
    transient: dict[str, np.ndarray] = field(default_factory=dict)


class Extractor(ABC):
    """Base class; subclasses set ``version`` and ``Config`` and register themselves.

    ``version`` is bumped whenever a change alters the numbers produced, so
    cached results made by older code are recomputed rather than mixed in.
    """

    name: ClassVar[str]  # set by the registry
    version: ClassVar[str] = "1"
    Config: ClassVar[type]  # a dataclass of plain typed fields
    resources: ClassVar[Resources] = Resources()
    # Part of ``extractors=default``: it runs on a fresh machine, with no download.
    in_default_set: ClassVar[bool] = False
    weights: ClassVar[str] = "heuristic"  # one of WEIGHTS_KINDS, for the default config

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Extractor:
        """Builds from a ``key: value`` mapping; unknown keys name the extractor."""
        return cls(config_from_mapping(cls.Config, options, where=f"options.{cls.name}"))

    @cached_property
    def config_hash(self) -> str:
        payload = json.dumps({"version": self.version, "config": to_plain(self.config)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def cache_key(self, video_id: str) -> str:
        """Extractor name + version + config hash + video id: equal keys, equal results."""
        return f"{self.name}/{self.version}/{self.config_hash}/{video_id}"

    @cached_property
    def _provenance(self) -> dict[str, Any]:
        needs = self.needs()
        prov: dict[str, Any] = {
            "extractor": self.name,
            "version": self.version,
            "config_hash": self.config_hash,
            "config": json.dumps(to_plain(self.config), sort_keys=True),
        }
        if needs.frames is not None:
            prov.update(
                {
                    f"frames_{k}": v if v is not None else "native"
                    for k, v in dataclasses.asdict(needs.frames).items()
                }
            )
        if needs.audio is not None:
            prov["audio_rate"] = needs.audio.rate
        return prov

    def provenance(self) -> dict[str, Any]:
        """What the result depends on: extractor, version, config and sampling.

        Stored with every result, so the trainer can refuse to mix descriptors
        made with different settings. The config is fixed once an extractor
        exists, so this is computed once.
        """
        return dict(self._provenance)

    @abstractmethod
    def needs(self) -> Needs: ...

    @abstractmethod
    def produces(self) -> dict[str, OutputSpec]: ...

    def transient_outputs(self) -> tuple[str, ...]:
        """Outputs that dependents read but the shard does not keep.

        When a dependent runs on a video whose result of this extractor is
        already stored, the runner recomputes this extractor in memory (and
        does not store it again), since the stored result lacks these arrays.
        """
        return ()

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Loads models; called once per worker process, not once per video."""

    @abstractmethod
    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result: ...

    def teardown(self) -> None:  # noqa: B027  (optional hook)
        """Frees what ``setup`` took."""
