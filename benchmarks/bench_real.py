"""The default extractor set on real video: frames/s per extractor, per core and on
two workers, the cost of 1080p against the same clip pre-scaled, and peak memory.

The clips are the eight real ones in ``../shared/data/real-clips`` (340x256 to
1080p, 6 to 30 frames/s), at their native sizes; a frame rate is always native
*video* frames per second of wall time, whatever the extractors sample. Each
measurement runs in a fresh child process (``--child``) pinned to its cores,
so its peak RSS is its own and a previous run's caches do not help it.

    python -m benchmarks.bench_real [--clips DIR] [--long-frames 600] [--extractors default]

``--extractors`` takes what ``hallucinate extract extractors=`` takes (a
comma-separated list, ``default`` for the default set), to time another
set, such as the default set before its pretrained streams:
``--extractors audio.logmel,flow,off.hofmbh,odf.motion,odf.hog,sdf.motion,sdf.spectral_residual``.

The long clip for the memory figure is made here: the 1080p NTU clip looped to
``--long-frames`` frames (H.264, 30 frames/s), with a 1-loop clip as control.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av

from benchmarks._common import print_table
from pipelines.encode import write_video

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"
NTU = "ntu_rgbd_1080p_drink_water.avi"
HD = (NTU, "person_1080p_skeleton_demo.mp4")
# The made clips' encoding: quality-based, as camera files are, not the tests' low bit rate.
X264 = {"preset": "veryfast", "crf": "20"}


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".mp4", ".avi"))


def native_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def child(paths: list[str], workers: int, extractors: list[str]) -> dict:
    """One extraction of the default set over ``paths``; its figures as JSON-able values.

    With workers, a LocalCluster is started and warmed up on the first clip
    (extractors set up, imports paid) before the clock starts, and each video
    is its own shard, so the figure is extraction, not start-up.
    """
    import contextlib
    import logging

    from distributed import LocalCluster

    from pipelines.cli import resolve_extractors
    from pipelines.datasets import VideoRecord
    from pipelines.orchestrate import ClusterOptions, run_extraction

    specs = resolve_extractors(extractors, {})
    records = [VideoRecord(Path(p).stem, p, (0,), "train") for p in paths]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        options, shard_size = ClusterOptions(workers=0, threads=1), None
        if workers:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            )
            options, shard_size = ClusterOptions(scheduler=cluster.scheduler_address, threads=1), 1
            run_extraction(
                records[:workers], specs, Path(tmp) / "warm", options, shard_size=1, progress=False
            )
        t0 = time.perf_counter()
        summary = run_extraction(records, specs, Path(tmp) / "store", options, shard_size, progress=False)
        wall = time.perf_counter() - t0
    failed = {n: c["failed"] for n, c in summary.counts.items() if c["failed"]}
    return {
        "wall": wall,
        "seconds": dict(summary.seconds),
        "failed": failed,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(paths: list[Path], workers: int, cores: str, extractors: str) -> dict:
    """``child`` in a fresh interpreter pinned to ``cores`` (taskset's list syntax)."""
    cmd = ["taskset", "-c", cores, sys.executable, "-m", "benchmarks.bench_real", "--extractors", extractors]
    cmd += ["--child", str(workers)]
    out = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rate(stream) -> Fraction:
    return Fraction(stream.average_rate or 25)


def prescaled(source: Path, out: Path, short_side: int = 256) -> Path:
    """``source`` resized to ``short_side`` (the default extractors' bound), same rate and frames."""
    from extractors.base import FrameSpec
    from pipelines.decode import iter_frames

    with av.open(str(source)) as container:
        rate = _rate(container.streams.video[0])
    spec = FrameSpec(short_side=short_side)
    frames = (f for batch in iter_frames(source, spec) for f in batch.frames)
    write_video(out, frames, rate, bit_rate=None, codec_options=X264)
    return out


def looped(source: Path, out: Path, n_frames: int) -> Path:
    """``source`` (decoded once, kept in memory) repeated to ``n_frames`` frames."""
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        rate = _rate(stream)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    write_video(
        out, (frames[i % len(frames)] for i in range(n_frames)), rate, bit_rate=None, codec_options=X264
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=Path, default=CLIPS)
    parser.add_argument("--long-frames", type=int, default=600)
    parser.add_argument("--extractors", default="default", help="extractors=... of hallucinate extract")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[1:], int(args.child[0]), args.extractors.split(","))))
        return
    if not args.clips.is_dir():
        raise SystemExit(f"{args.clips} not found: the real clips live in shared/data/real-clips")
    videos = _videos(args.clips)
    frames = {v.name: native_frames(v) for v in videos}
    total = sum(frames.values())

    one = run_child(videos, 0, "0", args.extractors)
    rows = [
        [name, round(sec, 2), round(total / sec, 1)]
        for name, sec in sorted(one["seconds"].items())
        if sec > 0
    ]
    rows.append(["whole set (wall)", round(one["wall"], 2), round(total / one["wall"], 1)])
    print_table(
        f"Extractors {args.extractors}, one core (workers=0 threads=1), {len(videos)} real clips, "
        f"{total} frames at native size (an extractor's seconds include the decode of the "
        "samplings it asks for first)",
        ["extractor", "seconds", "video frames/s"],
        rows,
    )
    if one["failed"]:
        print(f"failed: {one['failed']}")

    two = run_child(videos, 2, "0,1", args.extractors)
    print_table(
        "Default set, two dask workers (threads=1 each) on two cores, one video a shard, cluster warmed up",
        ["workers", "wall (s)", "video frames/s", "frames/s per core"],
        [
            [1, round(one["wall"], 2), round(total / one["wall"], 1), round(total / one["wall"], 1)],
            [2, round(two["wall"], 2), round(total / two["wall"], 1), round(total / two["wall"] / 2, 1)],
        ],
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for name in HD:
            small = prescaled(args.clips / name, tmp / f"small_{Path(name).stem}.mp4")
            native = run_child([args.clips / name], 0, "0", args.extractors)
            scaled = run_child([small], 0, "0", args.extractors)
            rows.append(
                [
                    name,
                    frames[name],
                    round(native["wall"], 2),
                    round(scaled["wall"], 2),
                    round(native["wall"] / scaled["wall"], 2),
                ]
            )
        print_table(
            "1080p against the same clip pre-scaled to a short side of 256 (one core, default set)",
            ["clip", "frames", "1080p (s)", "pre-scaled (s)", "ratio"],
            rows,
        )
        reps = max(1, round(args.long_frames / frames[NTU]))
        long_clip = looped(args.clips / NTU, tmp / "ntu_long.mp4", frames[NTU] * reps)
        short_clip = looped(args.clips / NTU, tmp / "ntu_once.mp4", frames[NTU])
        rows = []
        for label, clip, n in [
            ("1 loop", short_clip, frames[NTU]),
            (f"{reps} loops", long_clip, frames[NTU] * reps),
        ]:
            result = run_child([clip], 0, "0", args.extractors)
            rows.append(
                [
                    label,
                    n,
                    round(result["wall"], 1),
                    round(n / result["wall"], 1),
                    round(result["max_rss_mb"]),
                ]
            )
        print_table(
            "Peak RSS of one process (workers=0) on the 1080p NTU clip looped: "
            "memory must not grow with length",
            ["clip", "frames", "wall (s)", "video frames/s", "peak RSS (MB)"],
            rows,
        )


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(".cache/numba").resolve()))
    main()
