"""Saliency speed for the SDF extractors: frames/s per backend and for Eq. 17, on one core.

    python -m benchmarks.bench_saliency [--frames 96]

Frames are demo clips resized to 320x240. Each backend is timed on the
320x240 frames and at the extractors' default map size (160x128, which
the decoder delivers directly); Eq. 17 + gist is timed on maps of both
sizes. The last rows are the whole weight-free default set (spectral
residual + motion saliency) plus Eq. 17 and pooling, per frame, with maps
at 320x240 and at the default 160x128: the target is at least 25 frames/s
on one core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks._common import demo_root, print_table
from extractors import create_extractor
from extractors.base import FrameSpec
from extractors.saliency import SALIENCY, frame_vectors
from pipelines.decode import iter_frames
from tests.helpers import save_saliency_net


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=96)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    root = demo_root() / "demo"
    clips = sorted((root / "videos" / "box_slide").glob("*.mp4"))
    frames = np.concatenate([b.frames for c in clips[:4] for b in iter_frames(str(c), FrameSpec())])
    frames = np.concatenate([frames] * (1 + args.frames // len(frames)))[: args.frames]
    sizes = {"320x240": (320, 240), "160x128": (160, 128)}
    resized = {k: np.stack([cv2.resize(f, s) for f in frames]) for k, s in sizes.items()}
    net = save_saliency_net(Path(tempfile.mkdtemp()) / "net.pt")

    rows = []
    for name in SALIENCY.names():
        cls = SALIENCY.get(name)
        options = {"model": str(net), "input_size": [160, 128], "device": "cpu"} if name == "deep" else {}
        model = cls(cls.Config(**options))
        model.setup()
        for label, batch in resized.items():
            model.reset(batch)
            model.maps(batch[:2])  # warm-up
            model.reset(batch)
            rows.append([f"saliency {name}", label, args.frames / timed(model.maps, batch)])
    for label, batch in resized.items():
        maps = np.random.default_rng(0).random(batch.shape[:3]).astype(np.float32)
        frame_vectors(maps[:2])
        rows.append(["Eq. 17 + gist", label, args.frames / timed(frame_vectors, maps)])

    class Memory:
        video_id, path = "bench", "memory"

        def __init__(self, frames):
            self._frames = frames

        def frames(self, spec, chunk=32):
            from extractors.base import FrameBatch

            for i in range(0, len(self._frames), chunk):
                part = self._frames[i : i + chunk]
                yield FrameBatch(part, np.arange(i, i + len(part)) / 12)

    for label, (w, h) in sizes.items():
        total = 0.0
        for name in ("sdf.spectral_residual", "sdf.motion"):
            ex = create_extractor(name, map_size=[w, h])
            ex.setup()
            seconds = timed(ex.process, Memory(resized[label]), {})
            total += seconds
            rows.append([f"{name} (whole extractor)", label, args.frames / seconds])
        rows.append(["default set + Eq. 17 + pooling", label, args.frames / total])
    print_table("Saliency on one core (frames/s)", ["stage", "frames", "frames/s"], rows)


if __name__ == "__main__":
    main()
