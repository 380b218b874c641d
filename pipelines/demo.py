"""The embedded demo dataset: generated, deterministic, no download.

Each class is a recipe over four cues, one per auxiliary descriptor family,
so that every extractor has real class signal to find:

* motion pattern (optical flow, IDT),
* object shape (detection features),
* where the salient object sits (saliency features),
* sound, whose loudness follows the object's speed (audio features).

Nuisance keeps an RGB-only model honest: textured backgrounds that sometimes
pan, random speed, colour and size, distractor objects, sensor noise, and cue
corruption (the main object sometimes takes another class's shape or sits in
another class's region). The ground-truth boxes of every object are written
too, so detector backends can be checked against them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipelines.encode import write_video

GENERATOR_VERSION = "2"


@dataclass(frozen=True)
class DemoClass:
    name: str
    shape: str
    motion: str
    region: tuple[float, float]  # anchor of the main object, fractions of (width, height)
    tone_hz: float  # 0 means band-limited noise instead of a tone


DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("ball_bounce", "circle", "bounce", (0.28, 0.60), 262.0),
    DemoClass("box_slide", "square", "slide", (0.50, 0.72), 392.0),
    DemoClass("bar_spin", "bar", "spin", (0.50, 0.45), 587.0),
    DemoClass("triangle_orbit", "triangle", "orbit", (0.72, 0.50), 880.0),
    DemoClass("ring_zoom", "ring", "zoom", (0.50, 0.28), 1319.0),
    DemoClass("cross_jitter", "cross", "jitter", (0.28, 0.30), 0.0),
)
SHAPES = tuple(c.shape for c in DEMO_CLASSES)


@dataclass(frozen=True)
class DemoSpec:
    """Size and difficulty of the demo set; the defaults are what ``make demo`` uses."""

    clips_per_class: int = 50  # 60/20/20 train/val/test, interleaved
    # Further clips per class, alternately val and test, so that the training set
    # stays 30 clips a class while the held-out splits grow. With 10 test clips a
    # class, one clip is 1.7 points and the binomial noise of a 70% model (±6
    # points) was as large as the seed-to-seed spread the demo is judged by.
    held_out_per_class: int = 30
    width: int = 160
    height: int = 120
    fps: int = 12
    n_frames: int = 32
    audio_rate: int = 16000
    seed: int = 0
    shape_swap_p: float = 0.25  # main object drawn with another class's shape
    region_swap_p: float = 0.25  # main object placed in another class's region
    pan_p: float = 0.4  # camera pans over the background
    max_distractors: int = 2
    noise_sigma: float = 6.0
    silent_p: float = 0.05  # clips with an all-zero audio track
    no_audio_p: float = 0.03  # clips with no audio stream at all
    bit_rate: int = 600_000  # MPEG-4 part 2, chosen for byte-identical output


def _polygon(shape: str, radius: float, angle: float) -> list[np.ndarray]:
    """Outline(s) of a shape; rotation is visible on every shape (see the notch)."""

    def rot(points: np.ndarray) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        return points @ np.array([[c, s], [-s, c]])

    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], 1) * radius
        outer[0] *= 1.35  # a notch makes rotation visible on round shapes
        return [rot(outer)]
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * radius * 0.8
        return [rot(pts)]
    if shape == "bar":
        pts = np.array([[-1.3, -0.3], [1.3, -0.3], [1.3, 0.3], [-1.3, 0.3]]) * radius
        return [rot(pts)]
    if shape == "triangle":
        t = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) - math.pi / 2
        return [rot(np.stack([np.cos(t), np.sin(t)], 1) * radius * 1.1)]
    if shape == "cross":
        a, b = 1.1 * radius, 0.35 * radius
        return [
            rot(np.array([[-a, -b], [a, -b], [a, b], [-a, b]])),
            rot(np.array([[-b, -a], [b, -a], [b, a], [-b, a]])),
        ]
    raise ValueError(f"unknown demo shape {shape!r}")


def _trajectory(motion: str, n: int, speed: float, rng: np.random.Generator, size: float):
    """Per-frame (dx, dy, angle, scale) of a motion pattern around its anchor."""
    t = np.arange(n) * speed
    phase = rng.uniform(0, 2 * math.pi)
    sign = rng.choice([-1.0, 1.0])
    zeros, ones = np.zeros(n), np.ones(n)
    base_angle = rng.uniform(0, math.pi)
    if motion == "bounce":
        return zeros, -22 * np.abs(np.sin(0.25 * t + phase)), base_angle + zeros, ones
    if motion == "slide":
        tri = 2 * np.abs(((0.04 * t + phase / (2 * math.pi)) % 1) - 0.5) * 2 - 1
        return sign * 40 * tri, zeros, base_angle + zeros, ones
    if motion == "spin":
        return zeros, zeros, base_angle + sign * 0.3 * t, ones
    if motion == "orbit":
        w = sign * 0.2 * t + phase
        return 22 * np.cos(w), 22 * np.sin(w), base_angle + zeros, ones
    if motion == "zoom":
        return zeros, zeros, base_angle + zeros, 1 + 0.55 * np.sin(0.3 * t + phase)
    if motion == "jitter":
        steps = rng.normal(0, 3.0 * speed, (n, 2))
        path = np.cumsum(steps, 0)
        path -= path.mean(0)
        return path[:, 0], path[:, 1], base_angle + np.cumsum(rng.normal(0, 0.15, n)), ones
    raise ValueError(f"unknown demo motion {motion!r}")


def _background(rng: np.random.Generator, width: int, height: int, margin: int) -> np.ndarray:
    c1, c2 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    ramp = np.linspace(0, 1, width + margin)[None, :, None]
    img = c1 * (1 - ramp) + c2 * ramp
    texture = rng.normal(0, 1, (height // 8 + 1, (width + margin) // 8 + 1))
    texture = cv2.resize(texture, (width + margin, height), interpolation=cv2.INTER_CUBIC)
    img = img + 18 * texture[..., None]
    return np.repeat(img[:height], 1, 0)


def _draw(img: np.ndarray, polys: list[np.ndarray], center, color) -> list[float]:
    pts = [np.round(p + center).astype(np.int32) for p in polys]
    cv2.fillPoly(img, pts, color, lineType=cv2.LINE_AA)
    allp = np.concatenate(pts)
    h, w = img.shape[:2]
    x1, y1 = np.clip(allp.min(0), 0, [w - 1, h - 1])
    x2, y2 = np.clip(allp.max(0), 0, [w - 1, h - 1])
    return [float(x1), float(y1), float(x2), float(y2)]


def _sound(cls: DemoClass, speed_env: np.ndarray, spec: DemoSpec, rng) -> np.ndarray:
    n = int(round(spec.n_frames / spec.fps * spec.audio_rate))
    t = np.arange(n) / spec.audio_rate
    env = np.interp(np.linspace(0, len(speed_env) - 1, n), np.arange(len(speed_env)), speed_env)
    env = 0.25 + 0.75 * env / (env.max() + 1e-6)
    if cls.tone_hz:
        f = cls.tone_hz * rng.uniform(0.95, 1.05)
        wave = np.sin(2 * math.pi * f * t) + 0.3 * np.sin(4 * math.pi * f * t)
    else:
        wave = rng.normal(0, 1, n)
        wave = np.convolve(wave, np.ones(4) / 4, mode="same") * 1.5
    wave = wave * env * rng.uniform(0.2, 0.45)
    wave += rng.normal(0, rng.uniform(0.005, 0.05), n)
    return np.clip(wave, -1, 1).astype(np.float32)


def render_clip(spec: DemoSpec, class_index: int, clip_index: int):
    """Frames (T, H, W, 3 uint8), audio (or None), and the per-frame boxes of one clip."""
    rng = np.random.default_rng([spec.seed, class_index, clip_index])
    cls = DEMO_CLASSES[class_index]
    W, H, T = spec.width, spec.height, spec.n_frames
    shape = cls.shape
    if rng.random() < spec.shape_swap_p:
        shape = SHAPES[rng.integers(len(SHAPES))]
    region = cls.region
    if rng.random() < spec.region_swap_p:
        region = DEMO_CLASSES[rng.integers(len(DEMO_CLASSES))].region
    anchor = np.array([region[0] * W, region[1] * H]) + rng.normal(0, 6, 2)
    radius = rng.uniform(10, 15)
    speed = rng.uniform(0.6, 1.5)
    dx, dy, angle, scale = _trajectory(cls.motion, T, speed, rng, radius)
    color = tuple(
        float(v) for v in rng.permutation([rng.uniform(200, 255), rng.uniform(0, 60), rng.uniform(0, 255)])
    )
    margin = 48
    background = _background(rng, W, H, margin)
    pan = rng.uniform(-1.2, 1.2) if rng.random() < spec.pan_p else 0.0
    offset0 = margin / 2
    distractors = []
    for _ in range(rng.integers(1, spec.max_distractors + 1)):
        distractors.append(
            {
                "shape": SHAPES[rng.integers(len(SHAPES))],
                "pos": rng.uniform([0.1 * W, 0.1 * H], [0.9 * W, 0.9 * H]),
                "vel": rng.normal(0, 0.6, 2),
                "radius": rng.uniform(5, 8),
                "angle": rng.uniform(0, math.pi),
                "color": tuple(float(v) for v in rng.uniform(60, 190, 3)),
            }
        )
    frames = np.empty((T, H, W, 3), np.uint8)
    boxes = []
    centers = []
    for i in range(T):
        off = int(round(offset0 + pan * i)) % margin
        img = np.ascontiguousarray(background[:, off : off + W]).astype(np.float32)
        frame_boxes = []
        for d in distractors:
            pos = d["pos"] + d["vel"] * i
            box = _draw(img, _polygon(d["shape"], d["radius"], d["angle"]), pos, d["color"])
            frame_boxes.append({"box": box, "role": "distractor", "shape": d["shape"]})
        center = anchor + [dx[i], dy[i]]
        centers.append(center)
        box = _draw(img, _polygon(shape, radius * scale[i], angle[i]), center, color)
        frame_boxes.append({"box": box, "role": "main", "shape": shape})
        img += rng.normal(0, spec.noise_sigma, img.shape)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes.append(frame_boxes)
    motion_energy = np.abs(np.diff(np.asarray(centers), axis=0, prepend=[centers[0]])).sum(1)
    motion_energy += np.abs(np.diff(angle, prepend=angle[0])) * radius
    motion_energy += np.abs(np.diff(scale, prepend=scale[0])) * radius
    audio = _sound(cls, motion_energy, spec, rng)
    return frames, audio, boxes, {"shape": shape, "region": list(region), "pan": pan}


def clip_audio_kind(spec: DemoSpec, class_index: int, clip_index: int) -> str:
    """``sound``, ``silent`` or ``none``; drawn per clip so every split gets some of each."""
    draw = np.random.default_rng([spec.seed, class_index, clip_index, 1]).random()
    if draw < spec.no_audio_p:
        return "none"
    if draw < spec.no_audio_p + spec.silent_p:
        return "silent"
    return "sound"


def split_of(clip_index: int, spec: DemoSpec) -> str:
    """60/20/20 train/val/test, interleaved so every class is in every split; the
    held-out clips after ``spec.clips_per_class`` alternate val and test."""
    if clip_index >= spec.clips_per_class:
        return ("val", "test")[(clip_index - spec.clips_per_class) % 2]
    return ("train", "train", "train", "val", "test")[clip_index % 5]


def total_clips_per_class(spec: DemoSpec) -> int:
    return spec.clips_per_class + spec.held_out_per_class


def _make_clip(args) -> dict:
    spec, root, class_index, clip_index = args
    cls = DEMO_CLASSES[class_index]
    video_id = f"{cls.name}_{clip_index:03d}"
    frames, audio, boxes, nuisance = render_clip(spec, class_index, clip_index)
    kind = clip_audio_kind(spec, class_index, clip_index)
    if kind == "silent":
        audio = np.zeros_like(audio)
    elif kind == "none":
        audio = None
    rel = Path("videos") / cls.name / f"{video_id}.mp4"
    write_video(root / rel, frames, spec.fps, audio, spec.audio_rate, codec="mpeg4", bit_rate=spec.bit_rate)
    box_file = root / "annotations" / "boxes" / f"{video_id}.json"
    box_file.write_text(
        json.dumps(
            {
                "width": spec.width,
                "height": spec.height,
                "fps": spec.fps,
                "frames": boxes,
                "nuisance": nuisance,
            }
        )
    )
    return {
        "video_id": video_id,
        "path": rel.as_posix(),
        "label": cls.name,
        "split": split_of(clip_index, spec),
        "audio": kind,
    }


def demo_is_current(root: Path, spec: DemoSpec) -> bool:
    marker = root / "demo.json"
    if not marker.is_file():
        return False
    want = {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}
    return json.loads(marker.read_text()) == want


def generate_demo(
    root: str | Path,
    spec: DemoSpec = DemoSpec(),
    workers: int = 2,
    progress: bool = True,
    on_clip: Callable[[], None] | None = None,
) -> Path:
    """Writes the demo set under ``root``; a no-op when the same spec is already there.

    The marker ``demo.json`` is written last, so an interrupted generation is
    redone rather than mistaken for a complete one.
    """
    root = Path(root)
    if demo_is_current(root, spec):
        return root / "annotations" / "manifest.csv"
    for sub in ("videos", "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "annotations" / "boxes").mkdir(parents=True, exist_ok=True)
    (root / "demo.json").unlink(missing_ok=True)
    jobs = [(spec, root, c, i) for c in range(len(DEMO_CLASSES)) for i in range(total_clips_per_class(spec))]
    bar = tqdm(total=len(jobs), desc="demo clips", unit="clip", disable=not progress)
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for row in pool.map(_make_clip, jobs, chunksize=8):
            rows.append(row)
            bar.update()
            if on_clip:
                on_clip()
    bar.close()
    manifest = root / "annotations" / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "annotations" / "classes.txt").write_text("\n".join(c.name for c in DEMO_CLASSES) + "\n")
    (root / "demo.json").write_text(
        json.dumps({"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)})
    )
    return manifest


def ensure_demo(root: str | Path, progress: bool = True) -> None:
    """Generates the default demo set under ``root`` unless a complete one is there.

    A complete set of another spec (the tests make a small one) is kept;
    only a missing or interrupted one (no ``demo.json``) is generated.
    """
    root = Path(root)
    if (root / "demo.json").is_file() and (root / "annotations" / "manifest.csv").is_file():
        return
    generate_demo(root, DemoSpec(), progress=progress)
