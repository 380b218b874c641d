"""Streaming clip reads for training: a seek and the clip's frames against
decoding the whole video and slicing (the fallback, and what every
streamed item cost before ``read_clip``).

Videos are synthetic, Kinetics-like: 10 s at 30 fps, 340x256, H.264 with
libx264's default keyframe interval (one keyframe), MPEG-4 part 2 (one
every 12 frames) and VP9 in WebM, Something-Something v2's format, whose
container holds no frame count (``read_clip`` counts from its duration).
Each item is a training clip as ``ClipDataset`` samples it (random start,
crop and flip) at r3d_18's defaults (64 frames, short side 128, 112² crop).
Run: `python -m benchmarks.bench_clips`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks._common import print_table
from hallucinate.data import ClipDataset, ClipSpec
from pipelines.datasets import VideoRecord
from pipelines.encode import write_video


def kinetics_like(path: Path, codec: str) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (256, 400, 3), dtype=np.uint8)
    frames = np.stack([base[:, i % 60 : i % 60 + 340] for i in range(300)])
    write_video(path, frames, 30, None, codec=codec, bit_rate=1_500_000)
    return path


def per_item(ds: ClipDataset, items: int) -> float:
    ds[0]  # imports, page cache
    t0 = time.perf_counter()
    for i in range(items):
        ds[i % len(ds)]
    return (time.perf_counter() - t0) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=30, help="clips read per variant")
    args = parser.parse_args()
    spec = ClipSpec(frames=64, size=112, short_side=128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec, suffix in (("libx264", "mp4"), ("mpeg4", "mp4"), ("libvpx-vp9", "webm")):
            path = kinetics_like(Path(tmp) / f"{codec}.{suffix}", codec)
            records = [VideoRecord(f"v{i}", str(path), (0,), "train") for i in range(4)]
            ds = ClipDataset(records, 1, spec, train=True, seed=0)
            seek = per_item(ds, args.items)
            ds.reseed(0)
            with mock.patch("hallucinate.data.read_clip", lambda *a: None):  # the whole-video path
                whole = per_item(ds, args.items)
            rows.append(
                [f"10 s 340x256 {codec}", f"{1e3 * whole:.0f}", f"{1e3 * seek:.0f}", f"{whole / seek:.2f}x"]
            )
    print_table(
        f"Streamed training clip, 64 frames at short side 128 (ms per item of {args.items}, one process)",
        ["video", "decode all, slice", "seek, clip only", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
