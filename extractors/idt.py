"""Improved Dense Trajectories (METHOD.md §2.1), written here from the published algorithm.

Wang & Schmid, "Action Recognition with Improved Trajectories" (ICCV 2013),
on top of Wang et al.'s dense trajectories (CVPR 2011 / IJCV 2013). The
original C++ release is GPL and is not used or copied; this follows the
papers' description, vectorised over every trajectory at once:

1. Dense sampling every ``stride`` (W = 5) pixels on up to 8 spatial scales
   (factor 1/√2), dropping points whose minimum eigenvalue of the structure
   tensor is below ``quality`` × the frame's maximum (homogeneous areas).
   Points are re-sampled on every frame in grid cells no trajectory occupies.
2. Points are tracked for L = 15 frames through the 3×3 median-filtered
   flow of the ``flow`` extractor (resized to each scale).
3. Camera motion: a homography per frame pair, by RANSAC, from ORB matches
   plus good-feature flow correspondences, with person boxes (from a
   detection extractor, ``person_boxes=odf.…``) masked out. The warped flow
   is the flow minus the homography's displacement field. This replaces
   the paper's recomputing flow on the warped frame by a subtraction (one
   flow pass instead of two); both remove the camera's motion to first order.
4. Along each trajectory a 32×32×15 volume is divided into 2×2×3 cells: HOG
   (8 bins), HOF (8 + a "no motion" bin) and MBHx/MBHy (8 bins) per cell,
   all from per-frame integral histograms, so each cell sum is four
   lookups whatever the number of trajectories. The trajectory shape is
   the warped displacements normalised by their total length. A trajectory
   whose warped motion is static (camera motion only), too large or erratic
   is pruned.

Each trajectory gives 426 numbers (trajectory 30, HOG 96, HOF 108, MBHx 96,
MBHy 96). They are encoded with a codebook (``hallucinate fit-codebooks``)
as BoW and Fisher vectors, and stored both pooled over the video and as
cumulative sums over frames (Prop. 1), so any temporal crop's descriptor is
one subtraction away; see :mod:`extractors.codebooks`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from extractors.base import (
    MOTION_FPS,
    SHORT_SIDE,
    Extractor,
    FrameSpec,
    Needs,
    OutputSpec,
    Result,
    VideoInput,
)
from extractors.codebooks import PARTS, Codebook, encode_cumulative, finish_bow, finish_fv
from extractors.detectors import person_boxes_by_frame
from extractors.flow import (
    MOTION_CHANNELS,
    flow_input,
    image_gradients,
    motion_channels,
    orientation_channels,
    root_normalise,
)
from extractors.registry import register
from pipelines.errors import ConfigError

DESCRIPTOR_DIM = sum(d for _, d in PARTS)  # 426
HOG_BINS, HOF_BINS, MBH_BINS = 8, 9, 8  # HOF: 8 orientations + "no motion"
CHANNELS = HOG_BINS + MOTION_CHANNELS  # 33 integral-histogram channels a frame


@dataclass
class IDTConfig:
    flow: str = "flow"  # the flow extractor this reads; fps and short_side must match it
    fps: float | None = MOTION_FPS
    short_side: int | None = SHORT_SIDE
    stride: int = 5  # W: dense-sampling step in pixels, at every scale
    scales: int = 8  # at most; fewer when the frame is small
    scale_factor: float = 1 / math.sqrt(2)
    track_length: int = 15  # L
    quality: float = 0.001  # min-eigenvalue threshold, relative to the frame's maximum
    patch: int = 32  # N: the volume's side in pixels, at the trajectory's scale
    cells: list[int] = field(default_factory=lambda: [2, 3])  # n_σ spatial (per side), n_τ temporal
    min_var: float = math.sqrt(3)  # points' std below this (both axes): static, pruned
    max_var: float = 50.0  # … above this (either axis): too large, pruned
    max_step: float = 20.0  # a step longer than this and > 70% of the whole length is erratic
    camera: bool = True  # camera-motion compensation
    orb_features: int = 500
    ransac_threshold: float = 1.0  # pixels
    person_boxes: str | None = None  # e.g. odf.fasterrcnn: person boxes are left out of the homography
    codebook: str | None = None  # from `hallucinate fit-codebooks`; required unless store_raw
    codebook_sha: str | None = None  # filled in from the file; recorded with every result
    cumulative: bool = True  # also store the per-frame cumulative sums (Prop. 1)
    knot_every: int = 8  # frames between stored cumulative sums
    store_raw: bool = False  # the raw 426-d descriptors (large)
    chunk: int = 32


@dataclass
class Trajectories:
    """What the tracker found in one video; rows are trajectories."""

    descriptors: np.ndarray  # (n, 426) float32: trajectory, HOG, HOF, MBHx, MBHy
    end_frame: np.ndarray  # (n,) int: the frame the trajectory ends on
    scale: np.ndarray  # (n,) int: pyramid level
    start: np.ndarray  # (n, 2) (x, y) in frame pixels
    end: np.ndarray  # (n, 2)
    frames: int = 0
    sampled: int = 0  # points ever sampled, before pruning

    @classmethod
    def concatenate(cls, parts: list[dict[str, np.ndarray]], frames: int, sampled: int) -> Trajectories:
        if not parts:
            z = np.zeros((0, 2), np.float32)
            empty = np.zeros((0, DESCRIPTOR_DIM), np.float32)
            return cls(empty, np.zeros(0, int), np.zeros(0, int), z, z, frames, sampled)
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return cls(**cat, frames=frames, sampled=sampled)


# ---------------------------------------------------------------- camera motion


def estimate_homography(
    grey0: np.ndarray,
    grey1: np.ndarray,
    flow: np.ndarray,
    orb: cv2.ORB,
    threshold: float,
    mask_boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Homography from frame 0 to frame 1 (RANSAC); identity when too little texture.

    Correspondences are ORB matches (cross-checked) plus good features moved
    by the flow; those inside ``mask_boxes`` (x1, y1, x2, y2 pixels: people,
    whose own motion would bias the estimate) are left out.
    """
    src, dst = [], []
    k0, d0 = orb.detectAndCompute(grey0, None)
    k1, d1 = orb.detectAndCompute(grey1, None)
    if d0 is not None and d1 is not None and len(k0) and len(k1):
        matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d0, d1)
        if matches:
            src.append(np.float32([k0[m.queryIdx].pt for m in matches]))
            dst.append(np.float32([k1[m.trainIdx].pt for m in matches]))
    corners = cv2.goodFeaturesToTrack(grey0, maxCorners=1000, qualityLevel=0.001, minDistance=3)
    if corners is not None:
        p = corners.reshape(-1, 2)
        xi = np.clip(np.round(p[:, 0]).astype(int), 0, flow.shape[1] - 1)
        yi = np.clip(np.round(p[:, 1]).astype(int), 0, flow.shape[0] - 1)
        src.append(p)
        dst.append(p + flow[yi, xi])
    if not src:
        return np.eye(3)
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    if mask_boxes is not None and len(mask_boxes):
        x, y = src_all[:, 0, None], src_all[:, 1, None]
        b = mask_boxes[None]
        inside = ((x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3])).any(1)
        src_all, dst_all = src_all[~inside], dst_all[~inside]
    if len(src_all) < 10:
        return np.eye(3)
    h, _ = cv2.findHomography(src_all, dst_all, cv2.RANSAC, threshold)
    return h if h is not None else np.eye(3)


def camera_flow(h: np.ndarray, width: int, height: int, scale: float = 1.0) -> np.ndarray:
    """The displacement field (height, width, 2) that homography ``h`` (frame pixels) induces at ``scale``."""
    s = np.diag([scale, scale, 1.0])
    hs = s @ h @ np.linalg.inv(s)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    den = hs[2, 0] * xs + hs[2, 1] * ys + hs[2, 2]
    u = (hs[0, 0] * xs + hs[0, 1] * ys + hs[0, 2]) / den - xs
    v = (hs[1, 0] * xs + hs[1, 1] * ys + hs[1, 2]) / den - ys
    return np.stack([u, v], -1).astype(np.float32)


# ---------------------------------------------------------------- tracking


def pyramid_scales(width: int, height: int, config: IDTConfig) -> list[float]:
    """Scales 1, 1/√2, … while the frame's short side still holds one volume."""
    out, s = [], 1.0
    while len(out) < config.scales and min(width, height) * s >= config.patch:
        out.append(s)
        s *= config.scale_factor
    return out


def _median(flow: np.ndarray) -> np.ndarray:
    """3×3 median per component (cv2.medianBlur takes 1, 3 or 4 float channels, not 2)."""
    return np.stack([cv2.medianBlur(np.ascontiguousarray(flow[..., k]), 3) for k in range(2)], -1)


def _channels(grey: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """Integral histogram (h+1, w+1, 33) of HOG, HOF, MBHx and MBHy channels of one frame."""
    parts = [orientation_channels(*image_gradients(grey), HOG_BINS), motion_channels(warped)]
    # cv2.integral takes all 33 channels at once, ~5x faster than two numpy cumsums.
    return cv2.integral(np.concatenate(parts, -1), sdepth=cv2.CV_64F).reshape(
        grey.shape[0] + 1, grey.shape[1] + 1, CHANNELS
    )


def _cell_sums(integral: np.ndarray, pos: np.ndarray, patch: int, n_cells: int) -> np.ndarray:
    """Sums (n, n_cells², 33) over the n_cells×n_cells cells of each point's patch, by four lookups each."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0 = np.clip(np.round(pos[:, 0]).astype(int) - patch // 2, 0, w - patch)
    y0 = np.clip(np.round(pos[:, 1]).astype(int) - patch // 2, 0, h - patch)
    edges = np.round(np.linspace(0, patch, n_cells + 1)).astype(int)
    xs, ys = x0[:, None] + edges, y0[:, None] + edges
    d = integral[ys[:, :, None], xs[:, None, :]]  # (n, c+1, c+1, 33)
    cells = d[:, 1:, 1:] - d[:, :-1, 1:] - d[:, 1:, :-1] + d[:, :-1, :-1]
    # Rounding in the integral can leave -1e-9 where a cell is empty; histograms are non-negative.
    return np.maximum(cells.reshape(len(pos), n_cells * n_cells, CHANNELS), 0).astype(np.float32)


class _Level:
    """Live trajectories of one pyramid level."""

    def __init__(self, scale: float, config: IDTConfig) -> None:
        self.scale = scale
        n_cells, n_t = config.cells
        self.pos = np.zeros((0, 2), np.float32)
        self.start = np.zeros((0, 2), np.float32)
        self.age = np.zeros(0, np.int64)
        self.disp = np.zeros((0, config.track_length, 2), np.float32)
        self.acc = np.zeros((0, n_t, n_cells * n_cells, CHANNELS), np.float32)

    def keep(self, rows: np.ndarray) -> None:
        for name in ("pos", "start", "age", "disp", "acc"):
            setattr(self, name, getattr(self, name)[rows])

    def add(self, points: np.ndarray, config: IDTConfig) -> None:
        n = len(points)
        n_cells, n_t = config.cells
        self.pos = np.concatenate([self.pos, points])
        self.start = np.concatenate([self.start, points])
        self.age = np.concatenate([self.age, np.zeros(n, np.int64)])
        self.disp = np.concatenate([self.disp, np.zeros((n, config.track_length, 2), np.float32)])
        self.acc = np.concatenate([self.acc, np.zeros((n, n_t, n_cells * n_cells, CHANNELS), np.float32)])


def _sample(level: _Level, grey: np.ndarray, config: IDTConfig) -> np.ndarray:
    """New grid points in cells without a live trajectory, on textured pixels only."""
    h, w = grey.shape
    step = config.stride
    eig = cv2.cornerMinEigenVal(grey, 3, 3)
    ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    cand = eig[ys, xs]
    ok = cand > config.quality * max(float(eig.max()), 1e-12)
    if len(level.pos):
        cy = np.clip((level.pos[:, 1] // step).astype(int), 0, ys.shape[0] - 1)
        cx = np.clip((level.pos[:, 0] // step).astype(int), 0, xs.shape[1] - 1)
        ok[cy, cx] = False
    return np.stack([xs[ok], ys[ok]], 1).astype(np.float32)


def _finish(
    level: _Level, done: np.ndarray, config: IDTConfig, end_frame: int
) -> dict[str, np.ndarray] | None:
    """Descriptors of the trajectories that reached L frames and pass the pruning tests."""
    disp = level.disp[done]
    points = np.concatenate([np.zeros((len(disp), 1, 2), np.float32), np.cumsum(disp, 1)], 1)
    spread = points.std(1)  # (n, 2): standard deviation of the camera-compensated points
    steps = np.linalg.norm(disp, axis=2)
    length = steps.sum(1)
    static = (spread < config.min_var).all(1)
    large = (spread > config.max_var).any(1)
    erratic = (steps.max(1) > config.max_step) & (steps.max(1) > 0.7 * length)
    valid = ~(static | large | erratic)
    if not valid.any():
        return None
    rows = np.flatnonzero(done)[valid]
    shape = (disp[valid] / np.maximum(length[valid], 1e-6)[:, None, None]).reshape(int(valid.sum()), -1)
    acc = level.acc[rows]  # (n, n_t, cells, 33)
    n = len(rows)
    bounds = np.cumsum([HOG_BINS, HOF_BINS, MBH_BINS])
    parts = [root_normalise(p.reshape(n, -1)) for p in np.split(acc, bounds, axis=-1)]
    inv = 1.0 / level.scale
    return {
        "descriptors": np.concatenate([shape, *parts], 1).astype(np.float32),
        "end_frame": np.full(n, end_frame, int),
        "scale": np.full(n, 0, int),
        "start": level.start[rows] * inv,
        "end": level.pos[rows] * inv,
    }


def dense_trajectories(
    frames: Iterable[np.ndarray],
    flow: np.ndarray,
    config: IDTConfig,
    person_boxes: Mapping[int, np.ndarray] | None = None,
) -> Trajectories:
    """Tracks and describes a video: ``frames`` (H, W, 3) uint8 RGB in order, ``flow`` (n−1, H, W, 2).

    ``person_boxes`` maps a frame index to (k, 4) pixel boxes left out of the
    homography estimate.
    """
    orb = cv2.ORB_create(config.orb_features)
    levels: list[_Level] = []
    out: list[dict[str, np.ndarray]] = []
    sampled = 0
    prev = None
    t = -1
    for t, frame in enumerate(frames):
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if prev is not None:
            sampled += _step(levels, prev, grey, flow[t - 1], t - 1, config, orb, person_boxes, out)
        if not levels:
            h, w = grey.shape
            if flow.shape[1:3] != (h, w):
                raise ConfigError(
                    f"flow is {flow.shape[2]}×{flow.shape[1]} but frames are {w}×{h}: give idt the same "
                    "fps and short_side as the flow extractor"
                )
            levels = [_Level(s, config) for s in pyramid_scales(w, h, config)]
        prev = grey
    frames_seen = t + 1
    if frames_seen - 1 > len(flow):
        raise ConfigError(
            f"{frames_seen} frames but flow for {len(flow)} pairs: sampling differs from the flow's"
        )
    return Trajectories.concatenate(out, frames_seen, sampled)


def _step(levels, grey0, grey1, flow, t, config, orb, person_boxes, out) -> int:
    """Frame t → t+1: sample, describe at frame t, move every point, emit finished trajectories."""
    h, w = grey0.shape
    if config.camera:
        boxes = person_boxes.get(t) if person_boxes else None
        hom = estimate_homography(grey0, grey1, flow, orb, config.ransac_threshold, boxes)
    else:
        hom = np.eye(3)
    n_cells, n_t = config.cells
    length = config.track_length
    new = 0
    for index, level in enumerate(levels):
        s = level.scale
        size = (max(int(round(w * s)), 1), max(int(round(h * s)), 1))
        g = grey0 if s == 1.0 else cv2.resize(grey0, size, interpolation=cv2.INTER_AREA)
        f = flow if s == 1.0 else cv2.resize(flow, size, interpolation=cv2.INTER_LINEAR) * np.float32(s)
        warped = f - camera_flow(hom, size[0], size[1], s) if config.camera else f
        points = _sample(level, g, config)
        level.add(points, config)
        new += len(points)
        if not len(level.pos):
            continue
        integral = _channels(g, warped)
        cells = _cell_sums(integral, level.pos, config.patch, n_cells)
        rows = np.arange(len(level.pos))
        level.acc[rows, level.age * n_t // length] += cells
        xi = np.clip(np.round(level.pos[:, 0]).astype(int), 0, size[0] - 1)
        yi = np.clip(np.round(level.pos[:, 1]).astype(int), 0, size[1] - 1)
        level.disp[rows, level.age] = _median(warped)[yi, xi]
        level.pos = level.pos + _median(f)[yi, xi]
        level.age = level.age + 1
        inside = (level.pos[:, 0] >= 0) & (level.pos[:, 0] <= size[0] - 1)
        inside &= (level.pos[:, 1] >= 0) & (level.pos[:, 1] <= size[1] - 1)
        done = inside & (level.age >= length)
        if done.any():
            finished = _finish(level, done, config, t + 1)
            if finished is not None:
                finished["scale"][:] = index
                out.append(finished)
        level.keep(inside & ~done)
    return new


# ---------------------------------------------------------------- the extractor


@register("idt")
class IDT(Extractor):
    """Improved Dense Trajectories encoded as BoW and Fisher vectors (needs a codebook).

    Outputs, with a codebook: ``bow`` (K words), ``fv1`` and ``fv2``
    (components × 213 each) pooled over the video, and, with ``cumulative``,
    their running sums every ``knot_every`` frames (``*_cum``, ``count_cum``,
    ``knot_frames``) from which the trainer pools the frames of the clip it
    samples (Prop. 1). With ``store_raw``: the raw descriptors ``local``
    (n, 426, float16) and ``tracks`` (n, 6: end frame, level, start x/y, end x/y).
    """

    version = "1"
    Config = IDTConfig

    def __init__(self, config: IDTConfig | None = None) -> None:
        config = config if config is not None else IDTConfig()
        where = f"options.{self.name}"
        if len(config.cells) != 2 or config.cells[0] < 1 or config.cells[1] < 1:
            raise ConfigError(f"{where}.cells must be [spatial cells per side, temporal cells]")
        if config.track_length < config.cells[1] or config.knot_every < 1 or config.stride < 1:
            raise ConfigError(f"{where}: track_length ≥ temporal cells, knot_every ≥ 1 and stride ≥ 1")
        if config.codebook is not None:
            sha = Codebook.file_sha(config.codebook, where)
            if config.codebook_sha not in (None, sha):
                raise ConfigError(f"{where}: {config.codebook} has sha {sha}, not {config.codebook_sha}")
            config = dataclasses.replace(config, codebook=str(Path(config.codebook)), codebook_sha=sha)
        super().__init__(config)
        self.codebook: Codebook | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> IDT:
        """As for every extractor, plus: a user's run must name a codebook (or ask for raw descriptors)."""
        extractor = super().from_options(options)
        if extractor.config.codebook is None and not extractor.config.store_raw:
            raise ConfigError(
                f"options.{cls.name}.codebook is not set. IDT is stored encoded with a codebook: run "
                "`hallucinate fit-codebooks dataset=...` and pass options.idt.codebook=<the file it writes> "
                "(or options.idt.store_raw=true to keep only the raw descriptors)"
            )
        return extractor

    def needs(self) -> Needs:
        c = self.config
        inputs = (c.flow,) if c.person_boxes is None else (c.flow, c.person_boxes)
        return Needs(frames=FrameSpec(fps=c.fps, max_short_side=c.short_side), inputs=inputs)

    def produces(self) -> dict[str, OutputSpec]:
        out: dict[str, OutputSpec] = {}
        if self.config.codebook is not None or not self.config.store_raw:  # encoded (a codebook is required)
            out.update(
                {
                    "bow": OutputSpec((None,), "float32", "hard-assignment word histogram (ℓ1)"),
                    "fv1": OutputSpec((None,), "float32", "Fisher vector, first order (power + ℓ2)"),
                    "fv2": OutputSpec((None,), "float32", "Fisher vector, second order (power + ℓ2)"),
                }
            )
            if self.config.cumulative:
                out.update(
                    {
                        "knot_frames": OutputSpec((None, 1), "int32", "frame that ends each cumulative row"),
                        "count_cum": OutputSpec((None, 1), "float64", "trajectories ended by each knot"),
                        "bow_cum": OutputSpec((None, None), "float32", "running word counts"),
                        "fv1_cum": OutputSpec((None, None), "float32", "running first-order FV sums"),
                        "fv2_cum": OutputSpec((None, None), "float32", "running second-order FV sums"),
                    }
                )
        if self.config.store_raw:
            out["local"] = OutputSpec((None, DESCRIPTOR_DIM), "float16", "raw trajectory descriptors")
            out["tracks"] = OutputSpec((None, 6), "float32", "end frame, level, start x, y, end x, y")
        return out

    def setup(self) -> None:
        if self.config.codebook is not None:
            self.codebook = Codebook.load(self.config.codebook)

    def trajectories(self, video: VideoInput, inputs: Mapping[str, Result]) -> Trajectories:
        """Tracks the video; also what ``fit-codebooks`` samples its descriptors from."""
        c = self.config
        flow = flow_input(inputs, c.flow, video.path)
        boxes = None
        frames = (f for batch in video.frames(self.needs().frames, chunk=c.chunk) for f in batch.frames)
        if c.person_boxes is not None:
            boxes = person_boxes_by_frame(inputs[c.person_boxes], flow.shape[2], flow.shape[1])
        return dense_trajectories(frames, flow, c, boxes)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        c = self.config
        tracks = self.trajectories(video, inputs)
        attrs = {"trajectories": len(tracks.descriptors), "frames": tracks.frames, "sampled": tracks.sampled}
        arrays: dict[str, np.ndarray] = {}
        flags: dict[str, str] = {}
        if c.store_raw:
            arrays["local"] = tracks.descriptors.astype(np.float16)
            arrays["tracks"] = np.column_stack(
                [tracks.end_frame, tracks.scale, tracks.start, tracks.end]
            ).astype(np.float32)
        if self.codebook is not None:
            attrs["codebook_sha"] = c.codebook_sha
            if not len(tracks.descriptors):
                flags["no_trajectories"] = f"no trajectory survived pruning in {tracks.frames} frames"
                return Result({}, flags=flags, attrs=attrs)
            cum = encode_cumulative(
                self.codebook, tracks.descriptors, tracks.end_frame, tracks.frames, c.knot_every
            )
            count = cum["count_cum"][-1, 0]
            arrays["bow"] = finish_bow(cum["bow_cum"][-1], count)
            arrays["fv1"] = finish_fv(cum["fv1_cum"][-1], count)
            arrays["fv2"] = finish_fv(cum["fv2_cum"][-1], count)
            if c.cumulative:
                arrays.update(cum)
        return Result(arrays, flags=flags, attrs=attrs)
