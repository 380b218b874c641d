"""Saliency Detection Features, SDF (METHOD.md §2.4): one extractor, and one stream, per saliency model.

Each frame's saliency map S becomes υ† = [υ′/‖υ′‖₂ ; I/‖I‖₁] (556-d): υ′ is
the kernel-linearised HOG-like descriptor of Eq. 17 (gradient magnitude
spread over 12 circular orientation pivots ⊗ 5 x-pivots ⊗ 5 y-pivots) and
I the 16×16 "intensity gist" of the map. A video's frames are pooled by
the same multi-moment construction as ODF (n† = 3) and SigmE.

Backends: OpenCV contrib's spectral-residual and fine-grained (static) and
Bin Wang's motion saliency (temporal) are weight-free; ``sdf.person`` runs
MediaPipe's pretrained person segmentation from the mediapipe wheel;
``sdf.deep`` loads a user's TorchScript or ONNX saliency net (e.g. an
exported ACLNet or MNL).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from extractors.base import (
    DETECTION_FPS,
    MOTION_FPS,
    TOO_FEW_FRAMES,
    Extractor,
    FrameSpec,
    Needs,
    OutputSpec,
    Result,
    VideoInput,
)
from extractors.encoders import (
    check_power_norm,
    multi_moment_pool,
    multi_moment_size,
    power_normalise,
    rbf_embed,
)
from extractors.registry import build_backend, register
from pipelines.config import to_plain
from pipelines.device import pick_device
from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.registry import Registry

ORIENTATION_PIVOTS, SPATIAL_PIVOTS, GIST = 12, 5, 16
FRAME_DIM = ORIENTATION_PIVOTS * SPATIAL_PIVOTS**2 + GIST * GIST  # 556


# ---------------------------------------------------------------- Eq. 17


def eq17(
    maps: np.ndarray,
    sigma_orientation: float | None = None,
    sigma_space: float | None = None,
    double: bool = False,
) -> np.ndarray:
    """υ′ of Eq. 17 for a batch of maps (n, H, W): (n, 12·5·5) float64, not normalised.

    Gradients use the [−1, 0, 1] filters with replicated borders; θ is taken
    in [0, 2π) and embedded with 12 pivots that wrap around the circle; x
    (columns) and y (rows) positions are j/(W−1) and i/(H−1), each with 5
    pivots. σ defaults to the pivot spacing (METHOD.md §7.10). The sum over
    pixels is a matrix product and a contraction, never a Python loop.

    It runs in torch, in float32 unless ``double``: the per-pixel embedding
    (n·H·W·12 exponentials) is the cost, and torch's vectorised float32 exp is
    about 12x faster than numpy's float64 one (6 ms instead of 74 ms for a
    320×240 map on one core). float32 agrees with float64 to ~1e-5 relative.
    """
    import torch
    import torch.nn.functional as F

    dtype = torch.float64 if double else torch.float32
    n, h, w = np.shape(maps)
    padded = F.pad(torch.as_tensor(np.asarray(maps), dtype=dtype)[:, None], (1, 1, 1, 1), mode="replicate")[
        :, 0
    ]
    gx = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
    gy = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
    magnitude = torch.hypot(gx, gy)
    theta = torch.remainder(torch.atan2(gy, gx), 2 * math.pi) / (2 * math.pi)
    s_o = sigma_orientation or 1.0 / ORIENTATION_PIVOTS
    s_s = sigma_space or 1.0 / (SPATIAL_PIVOTS - 1)
    d = theta[..., None] - torch.arange(ORIENTATION_PIVOTS, dtype=dtype) / ORIENTATION_PIVOTS
    d -= torch.round(d)  # circular distance: |x − ζ| or 1 − |x − ζ|, whichever is smaller
    phi_o = d.square_().mul_(-1.0 / s_o**2).exp_().mul_(magnitude[..., None])  # (n, h, w, 12)
    phi_x = torch.from_numpy(rbf_embed(np.arange(w) / max(w - 1, 1), SPATIAL_PIVOTS, s_s)).to(dtype)
    phi_y = torch.from_numpy(rbf_embed(np.arange(h) / max(h - 1, 1), SPATIAL_PIVOTS, s_s)).to(dtype)
    per_row = phi_o.transpose(2, 3) @ phi_x  # (n, h, 12, 5)
    out = torch.einsum("nhab,hc->nabc", per_row, phi_y)
    return out.reshape(n, -1).double().numpy()


def frame_vectors(maps: np.ndarray, sigma_orientation: float | None = None, sigma_space: float | None = None):
    """υ† (n, 556): ℓ2-normalised Eq. 17 and the ℓ1-normalised 16×16 gist of each map."""
    v = eq17(maps, sigma_orientation, sigma_space)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    gist = np.stack(
        [cv2.resize(m.astype(np.float32), (GIST, GIST), interpolation=cv2.INTER_AREA) for m in maps]
    )
    gist = gist.reshape(len(maps), -1).astype(np.float64)
    gist = gist / np.maximum(np.abs(gist).sum(1, keepdims=True), 1e-12)
    return np.concatenate([v, gist], 1)


# ---------------------------------------------------------------- backends


class SaliencyBackend(ABC):
    """Maps frames to saliency maps in [0, 1] of the frames' size; ``reset`` starts a new video."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Loads the model, once per worker."""

    def reset(self, first_frames: np.ndarray) -> None:  # noqa: B027  (optional hook)
        """Forgets per-video state; temporal models may initialise from the first frames."""

    @abstractmethod
    def maps(self, frames: np.ndarray) -> np.ndarray:
        """(n, H, W) float32 in [0, 1] for ``frames`` (n, H, W, 3) uint8 RGB."""

    def provenance(self) -> dict[str, Any]:
        return {}


SALIENCY: Registry[SaliencyBackend] = Registry("saliency backend", entry_point_group="hallucinate.saliency")


def _unit(m: np.ndarray) -> np.ndarray:
    m = m.astype(np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@dataclass
class NoOptions:
    pass


class _OpenCVStatic(SaliencyBackend):
    Config = NoOptions
    factory: ClassVar[str]

    def setup(self) -> None:
        self._model = getattr(cv2.saliency, self.factory)()

    def maps(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for frame in frames:
            ok, m = self._model.computeSaliency(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            out.append(_unit(m) if ok else np.zeros(frame.shape[:2], np.float32))
        return np.stack(out)


@SALIENCY.register("spectral_residual")
class SpectralResidual(_OpenCVStatic):
    """Hou & Zhang's spectral residual (static, spatial)."""

    factory = "StaticSaliencySpectralResidual_create"


@SALIENCY.register("fine_grained")
class FineGrained(_OpenCVStatic):
    """Montabone & Soto's fine-grained centre-surround saliency (static, spatial)."""

    factory = "StaticSaliencyFineGrained_create"


@dataclass
class MotionSaliencyConfig:
    prime_frames: int = 32  # the background is initialised from the median of the first frames
    prime_repeats: int = 60  # the model needs ~50 frames before it reports anything but "all salient"


@SALIENCY.register("motion")
class MotionSaliency(SaliencyBackend):
    """Bin Wang & Dudek's motion saliency (temporal): a binary map of what moves.

    The model reports the whole frame as salient until it has learnt a
    background over about 50 frames, longer than many clips, so each video
    starts by feeding it the median of its first frames ``prime_repeats``
    times (0.5 ms each at 160×120).
    """

    Config = MotionSaliencyConfig

    def reset(self, first_frames: np.ndarray) -> None:
        h, w = first_frames.shape[1:3]
        self._model = cv2.saliency.MotionSaliencyBinWangApr2014_create()
        self._model.setImagesize(w, h)
        self._model.init()
        grey = np.stack(
            [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in first_frames[: self.config.prime_frames]]
        )
        median = np.median(grey, axis=0).astype(np.uint8)
        for _ in range(self.config.prime_repeats):
            self._model.computeSaliency(median)

    def maps(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for frame in frames:
            ok, m = self._model.computeSaliency(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
            out.append(m.astype(np.float32) if ok else np.zeros(frame.shape[:2], np.float32))
        return np.stack(out)


@dataclass
class DeepSaliencyConfig:
    model: str = ""  # a TorchScript (.pt/.ts) or ONNX (.onnx) file: (B, 3, H, W) -> (B, [1,] h, w)
    input_size: list[int] = field(default_factory=lambda: [320, 256])  # width, height fed to the net
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    output: str = "sigmoid"  # sigmoid (logits out), none (already in [0, 1]) or minmax
    batch_size: int = 8
    device: str = "auto"


@SALIENCY.register("deep")
class DeepSaliency(SaliencyBackend):
    """A user's exported saliency network; its input size and normalisation come from the config."""

    Config = DeepSaliencyConfig

    def setup(self) -> None:
        from pipelines.weights import file_sha256

        c = self.config
        what = "deep saliency model"
        if not c.model or not Path(c.model).is_file():
            raise MissingWeightsError(
                what, c.model or "(none given)", "Export your net to TorchScript or ONNX and set model=..."
            )
        if c.output not in ("sigmoid", "none", "minmax"):
            raise ConfigError(f"{what}: output must be sigmoid, none or minmax, not {c.output!r}")
        self._hash = file_sha256(c.model)
        if Path(c.model).suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ConfigError(f"{what}: {c.model} is ONNX; `pip install onnxruntime` to run it") from None
            self._session = onnxruntime.InferenceSession(
                c.model, providers=onnxruntime.get_available_providers()
            )
            self._run = self._run_onnx
        else:
            import torch

            self._torch = torch
            self._device = pick_device(c.device)
            self._net = torch.jit.load(c.model, map_location=self._device).eval()
            self._run = self._run_torch

    def _run_torch(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            return self._net(torch.from_numpy(x).to(self._device)).float().cpu().numpy()

    def _run_onnx(self, x: np.ndarray) -> np.ndarray:
        name = self._session.get_inputs()[0].name
        return np.asarray(self._session.run(None, {name: x})[0], np.float32)

    def maps(self, frames: np.ndarray) -> np.ndarray:
        c = self.config
        h, w = frames.shape[1:3]
        mean, std = np.array(c.mean, np.float32), np.array(c.std, np.float32)
        out = []
        for start in range(0, len(frames), c.batch_size):
            part = [cv2.resize(f, tuple(c.input_size)) for f in frames[start : start + c.batch_size]]
            x = ((np.stack(part).astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
            y = self._run(np.ascontiguousarray(x))
            y = y.reshape(len(part), *y.shape[-2:])
            if c.output == "sigmoid":
                y = 1.0 / (1.0 + np.exp(-y))
            for m in y:
                m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
                out.append(_unit(m) if c.output == "minmax" else np.clip(m, 0.0, 1.0))
        return np.stack(out)

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._hash}


@dataclass
class PersonSegmentationConfig:
    model_selection: int = 0  # 0: the general model (256x256 input), 1: landscape (144x256)


@SALIENCY.register("person_segmentation")
class PersonSegmentation(SaliencyBackend):
    """MediaPipe's selfie (person) segmentation as a saliency map: P(person) per pixel.

    Pretrained and shipped in the mediapipe wheel. Where the paper's
    saliency nets learnt where people look, this says where the people
    are, which is what an action's actors are; Eq. 17 then describes the
    map's shape and position like any other saliency map.
    """

    Config = PersonSegmentationConfig

    def setup(self) -> None:
        from extractors.mediapipe_nets import LazyGraph, solution, warm_up

        if self.config.model_selection not in (0, 1):
            raise ConfigError("saliency backend person_segmentation: model_selection must be 0 or 1")
        segmentation = solution("selfie_segmentation", "saliency backend person_segmentation")

        def factory():
            return segmentation.SelfieSegmentation(model_selection=self.config.model_selection)

        warm_up(factory)
        self._graph = LazyGraph(factory)

    def maps(self, frames: np.ndarray) -> np.ndarray:
        found = self._graph.process(frames)
        return np.stack([np.clip(f.segmentation_mask, 0.0, 1.0).astype(np.float32) for f in found])

    def provenance(self) -> dict[str, Any]:
        from extractors.mediapipe_nets import weights_id

        return {"weights": weights_id(f"selfie-{self.config.model_selection}")}


# ---------------------------------------------------------------- extractors


@dataclass
class SDFConfig:
    fps: float | None = MOTION_FPS  # an upper bound; None: every frame
    map_size: list[int] = field(default_factory=lambda: [160, 128])  # width, height (ACLNet's 160x128)
    n_vectors: int = 3  # n†
    sigma_orientation: float | None = None  # None: the pivot spacing, 1/12
    sigma_space: float | None = None  # None: the pivot spacing, 1/4
    power_norm: str = "sigme"
    power_norm_params: dict[str, float] = field(default_factory=dict)
    store_maps: int | None = None  # also store the maps at this size (uint8), for inspection
    saliency: dict[str, Any] = field(default_factory=dict)  # the backend's options
    chunk: int = 32


class SDFExtractor(Extractor):
    """Base of the SDF extractors; a subclass names its saliency backend."""

    version = "1"
    Config = SDFConfig
    backend: ClassVar[str]

    def __init__(self, config: SDFConfig | None = None) -> None:
        config = config if config is not None else SDFConfig()
        where = f"options.{self.name}"
        cls, cfg = build_backend(SALIENCY, config.saliency, self.backend, f"{where}.saliency")
        if len(config.map_size) != 2 or min(config.map_size) < 4:
            raise ConfigError(f"{where}.map_size must be [width, height], each at least 4")
        check_power_norm(config.power_norm, config.power_norm_params, where)
        config = dataclasses.replace(config, saliency={"name": cls.name, **to_plain(cfg)})
        super().__init__(config)
        self.saliency: SaliencyBackend = cls(cfg)

    def needs(self) -> Needs:
        w, h = self.config.map_size
        return Needs(frames=FrameSpec(fps=self.config.fps, size=(w, h)))

    def produces(self) -> dict[str, OutputSpec]:
        out = {
            "descriptor": OutputSpec(
                (multi_moment_size(FRAME_DIM, self.config.n_vectors),),
                "float32",
                "multi-moment pooled per-frame Eq. 17 + gist vectors, after power normalisation",
            ),
            "per_frame": OutputSpec((None, FRAME_DIM), "float16", "υ† of each frame"),
        }
        if self.config.store_maps:
            s = self.config.store_maps
            out["maps"] = OutputSpec((None, s, s), "uint8", "saliency maps, downsampled")
        return out

    def setup(self) -> None:
        self.saliency.setup()

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        return self._pooled(self._frame_maps(video), self._attrs())

    def _attrs(self) -> dict[str, Any]:
        return {"saliency": self.saliency.name, **self.saliency.provenance()}

    def _frame_maps(self, video: VideoInput) -> Iterator[np.ndarray]:
        """The backend's maps, a batch of frames at a time; the backend restarts at the first."""
        started = False
        for batch in video.frames(self.needs().frames, chunk=self.config.chunk):
            if not started:
                self.saliency.reset(batch.frames)
                started = True
            yield self.saliency.maps(batch.frames)

    def _pooled(self, batches: Iterable[np.ndarray], attrs: dict[str, Any]) -> Result:
        """υ† of each map, Eq. 16 pooling + PN over them, and the optional small maps.

        Every SDF extractor ends here, whatever made its maps (a backend on
        frames, stored flow), so the descriptor means the same for all.
        """
        c = self.config
        vectors, small = [], []
        for maps in batches:
            vectors.append(frame_vectors(maps, c.sigma_orientation, c.sigma_space))
            if c.store_maps:
                s = c.store_maps
                small += [cv2.resize(m, (s, s), interpolation=cv2.INTER_AREA) for m in maps]
        per_frame = np.concatenate(vectors) if vectors else np.zeros((0, FRAME_DIM))
        if not len(per_frame):
            return Result(flags={TOO_FEW_FRAMES: "no frame was sampled"}, attrs={"frames": 0, **attrs})
        pooled = multi_moment_pool(per_frame, np.arange(len(per_frame)), c.n_vectors)
        arrays = {
            "descriptor": power_normalise(pooled, c.power_norm, **c.power_norm_params).astype(np.float32),
            "per_frame": per_frame.astype(np.float16),
        }
        if c.store_maps:
            arrays["maps"] = np.round(np.stack(small) * 255).astype(np.uint8)
        return Result(arrays, attrs={"frames": len(per_frame), **attrs})


@register("sdf.spectral_residual")
class SpectralResidualSDF(SDFExtractor):
    """SDF from spectral-residual saliency (spatial, weight-free; the default set's MNL stand-in)."""

    backend = "spectral_residual"
    in_default_set = True


@register("sdf.fine_grained")
class FineGrainedSDF(SDFExtractor):
    """SDF from fine-grained static saliency (spatial, weight-free)."""

    backend = "fine_grained"


@register("sdf.motion")
class MotionSDF(SDFExtractor):
    """SDF from Bin Wang's motion saliency (temporal, weight-free; the default set's ACLNet stand-in)."""

    backend = "motion"
    in_default_set = True


@dataclass
class PersonSDFConfig(SDFConfig):
    # The detectors' rate, not the other saliency models': a person mask moves with
    # the person, as a box does (extractors.base, DETECTION_FPS).
    fps: float | None = DETECTION_FPS
    # A frame shows a person when at least this fraction of its map is >= 0.5; a video
    # in which no frame does is flagged no_person rather than stored as empty maps.
    min_person_area: float = 0.01


@register("sdf.person")
class PersonSDF(SDFExtractor):
    """SDF from MediaPipe's pretrained person segmentation (in the wheel); in the default set."""

    Config = PersonSDFConfig
    backend = "person_segmentation"
    in_default_set = True
    weights = "pretrained"

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        c = self.config
        seen = {"frames": 0, "person_frames": 0}

        def counted(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for maps in batches:
                seen["frames"] += len(maps)
                seen["person_frames"] += int(((maps >= 0.5).mean((1, 2)) >= c.min_person_area).sum())
                yield maps

        result = self._pooled(counted(self._frame_maps(video)), self._attrs())
        result.attrs["person_frames"] = seen["person_frames"]
        if seen["frames"] and not seen["person_frames"]:
            reason = f"no frame of {seen['frames']} has {c.min_person_area:.0%} of its pixels on a person"
            return Result(flags={"no_person": reason}, attrs=result.attrs)
        return result


@register("sdf.deep")
class DeepSDF(SDFExtractor):
    """SDF from a user's TorchScript/ONNX saliency net (e.g. an exported ACLNet or MNL)."""

    weights = "checkpoint"
    backend = "deep"


@dataclass
class FlowMagnitudeConfig:
    flow: str = "flow"  # the flow extractor this reads


@SALIENCY.register("flow_magnitude")
class FlowMagnitude(SaliencyBackend):
    """Saliency as flow magnitude after removing the frame's dominant (camera) translation.

    Not a frame model: ``sdf.flow`` feeds it the flow extractor's output
    (the dependency mechanism), so flow is computed once for IDT, OFF and
    this. The median flow vector stands in for the camera's motion; what
    moves differently from it is salient. Maps are scaled by their 99th
    percentile, so a static video gives an all-zero map, not amplified noise.
    """

    Config = FlowMagnitudeConfig

    def setup(self) -> None:
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def reset(self, first_frames: np.ndarray) -> None:
        self._last: np.ndarray | None = None

    def maps(self, frames: np.ndarray) -> np.ndarray:
        """Standalone use on frames (DIS flow from the previous frame); ``sdf.flow`` reads stored flow."""
        grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        prev = [self._last if self._last is not None else grey[0], *grey[:-1]]
        if self._last is None and len(grey) > 1:
            prev[0], grey_first = grey[0], grey[1]  # the first frame takes the flow to the second
        else:
            grey_first = grey[0]
        flow = np.stack(
            [self._dis.calc(a, b, None) for a, b in zip(prev, [grey_first, *grey[1:]], strict=True)]
        )
        self._last = grey[-1]
        h, w = frames.shape[1:3]
        return self.from_flow(flow, (w, h))

    @staticmethod
    def from_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Maps (n, h, w) in [0, 1] at ``size`` (w, h) from flow (n, H, W, 2)."""
        out = np.empty((len(flow), size[1], size[0]), np.float32)
        for i, f in enumerate(flow):
            rel = f - np.median(f.reshape(-1, 2), 0)
            m = cv2.resize(np.hypot(rel[..., 0], rel[..., 1]), size, interpolation=cv2.INTER_AREA)
            top = float(np.percentile(m, 99))
            out[i] = np.clip(m / top, 0, 1) if top > 0.25 else 0.0  # < 0.25 px: noise, not motion
        return out


@register("sdf.flow")
class FlowSDF(SDFExtractor):
    """SDF from flow-magnitude saliency (temporal, weight-free), read from the ``flow`` extractor."""

    backend = "flow_magnitude"

    def needs(self) -> Needs:
        return Needs(inputs=(self.config.saliency["flow"],))

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        from extractors.flow import flow_input

        c = self.config
        flow = flow_input(inputs, c.saliency["flow"], video.path)
        maps = (
            FlowMagnitude.from_flow(flow[start : start + c.chunk], tuple(c.map_size))
            for start in range(0, len(flow), c.chunk)
        )
        return self._pooled(maps, {"saliency": "flow_magnitude"})
