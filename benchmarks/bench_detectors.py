"""Detector speed for the ODF extractors: frames/s per backend at two frame sizes.

    python -m benchmarks.bench_detectors [--frames 32] [--deep-frames 4] [--device auto]

Frames are demo clips (160x120) and the same frames resized to 320x240. The
deep detectors run with random weights at their default input size (no
weights can be downloaded here); their cost is the architecture's, except
that post-processing of a random model may keep a different number of
boxes. "odf s/frame" adds crop features, box vectors and pooling, i.e. the
whole ``process`` of the extractor. The paper's detectors took 0.07-0.91 s
per frame each on a GPU (METHOD.md §2.8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import demo_root, print_table
from extractors import create_extractor
from extractors.base import FrameBatch, FrameSpec
from pipelines.decode import iter_frames
from tests.helpers import TORCHVISION_ODF, save_torchvision_detector, save_yolo


class FramesVideo:
    """A VideoInput over frames in memory, so decoding is not part of the timing."""

    video_id, path = "bench", "memory"

    def __init__(self, frames: np.ndarray) -> None:
        self._frames = frames

    def frames(self, spec: FrameSpec, chunk: int = 32):
        for i in range(0, len(self._frames), chunk):
            part = self._frames[i : i + chunk]
            yield FrameBatch(part, np.arange(i, i + len(part)) / 12.0)

    def audio(self, spec):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32, help="frames for the weight-free detectors")
    parser.add_argument("--deep-frames", type=int, default=4, help="frames for the deep detectors")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    root = demo_root() / "demo"
    clip = next((root / "videos" / "ball_bounce").glob("*.mp4"))
    small = np.concatenate([b.frames for b in iter_frames(str(clip), FrameSpec())])
    small = np.concatenate([small] * (1 + args.frames // len(small)))[: args.frames]
    large = np.stack([cv2.resize(f, (320, 240)) for f in small])

    weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    deep = {
        name: {"detector": {"weights": str(save_torchvision_detector(model, weights / f"{model}.pth"))}}
        for name, model in TORCHVISION_ODF.items()
    }
    deep["odf.yolo"] = {"detector": {"model": str(save_yolo(weights / "yolov8n.pt"))}}
    candidates = {"odf.motion": {}, "odf.hog": {}, **deep}
    rows = []
    for name, options in candidates.items():
        n = args.frames if name in ("odf.motion", "odf.hog") else args.deep_frames
        if name in deep:
            options["detector"]["device"] = args.device
        ex = create_extractor(name, **options)
        ex.setup()
        for label, frames in (("160x120", small[:n]), ("320x240", large[:n])):
            ex.detector.reset()
            ex.detector.detect(frames[:1])  # warm-up (lazy init, first-call kernels)
            ex.detector.reset()
            t0 = time.perf_counter()
            ex.detector.detect(frames)
            detect = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            result = ex.process(FramesVideo(frames), {})
            whole = (time.perf_counter() - t0) / n
            boxes = len(result.arrays["boxes"]) / n
            rows.append([name, label, n, 1 / detect, detect, whole, f"{boxes:.1f}"])
    print_table(
        f"ODF detectors on {args.device}",
        ["extractor", "size", "frames", "det frames/s", "det s/frame", "odf s/frame", "boxes/frame"],
        rows,
    )


if __name__ == "__main__":
    main()
