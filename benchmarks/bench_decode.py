"""Decode rate: our streaming PyAV decode against the ffmpeg command line.

Both decode the same files to RGB24 frames at the same fps and size, each
with its default threading; ffmpeg's frames are read from its stdout into
numpy, which is how a pipeline would consume them. Run: `python benchmarks/bench_decode.py`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import demo_root, print_table
from extractors.base import FrameSpec
from pipelines.decode import iter_frames, probe
from pipelines.encode import write_video


def ours(paths: list[Path], spec: FrameSpec) -> int:
    return sum(len(b.frames) for p in paths for b in iter_frames(p, spec))


def ffmpeg_cli(paths: list[Path], spec: FrameSpec) -> int:
    frames = 0
    for path in paths:
        info = probe(path)
        width, height = spec.size or (info.width, info.height)
        filters = ([f"fps={spec.fps}"] if spec.fps else []) + [f"scale={width}:{height}"]
        raw = subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-i",
                str(path),
                "-vf",
                ",".join(filters),
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ],
            check=True,
            capture_output=True,
        ).stdout
        frames += len(np.frombuffer(raw, np.uint8)) // (width * height * 3)
    return frames


def long_video(folder: Path) -> Path:
    """A 320x240, 60 s H.264 clip: the size the paper's timing tables use."""
    path = folder / "long_320x240.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (240, 360, 3), dtype=np.uint8)
    frames = np.stack([base[:, i % 40 : i % 40 + 320] for i in range(60 * 25)])
    write_video(path, frames, 25, None)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=60, help="demo videos to decode")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("the ffmpeg command is needed for the comparison: apt-get install ffmpeg")
    demo = sorted((demo_root() / "demo" / "videos").rglob("*.mp4"))[: args.videos]
    with tempfile.TemporaryDirectory() as tmp:
        long = [long_video(Path(tmp))]
        rows = []
        cases = [
            (f"demo x{len(demo)} (160x120 mpeg4)", demo, FrameSpec()),
            (f"demo x{len(demo)} @6fps 112x112", demo, FrameSpec(fps=6, size=(112, 112))),
            ("60s 320x240 h264, native", long, FrameSpec()),
            ("60s 320x240 h264 @10fps 224x224", long, FrameSpec(fps=10, size=(224, 224))),
        ]
        for name, paths, spec in cases:
            for label, fn in (("hallucinate (PyAV)", ours), ("ffmpeg CLI", ffmpeg_cli)):
                fn(paths[:2], spec)  # warm the page cache and imports
                t0 = time.perf_counter()
                frames = fn(paths, spec)
                dt = time.perf_counter() - t0
                rows.append([name, label, frames, round(dt, 3), round(frames / dt, 1)])
    print_table("Decode rate", ["input", "decoder", "frames", "seconds", "frames/s"], rows)


if __name__ == "__main__":
    main()
