"""Random descriptor reads: the HDF5 shard store against one .npy file per video.

video_features writes one .npy per video and descriptor; the trainer reads
descriptors in random order, so this measures reads/s of uniformly random
(video, descriptor) pairs after the files are written. Run:
`python benchmarks/bench_store.py [--videos 5000]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import print_table
from pipelines.store import DONE, Entry, ShardIndex, ShardReader, shard_path, write_shard

DESCRIPTORS = {"small": 372, "medium": 1024, "large": 8246}  # audio stats, OFF, one ODF detector


def build(root: Path, n_videos: int, shard_size: int, compression: str | None) -> list[str]:
    rng = np.random.default_rng(0)
    ids = [f"video{i:06d}" for i in range(n_videos)]
    index = ShardIndex()
    index.assign(ids, shard_size)
    index.save(root)
    (root / "shards").mkdir(exist_ok=True)
    (root / "npy").mkdir(exist_ok=True)
    for shard, vids in index.shards.items():
        new = {}
        for vid in vids:
            for name, dim in DESCRIPTORS.items():
                array = rng.standard_normal(dim).astype(np.float32)
                new[(vid, "bench")] = new.get((vid, "bench"), Entry(DONE, attrs={"config_hash": "x"}))
                new[(vid, "bench")].arrays[name] = array
                np.save(root / "npy" / f"{vid}_{name}.npy", array)
        write_shard(shard_path(root, shard), new, {}, {}, compression)
    return ids


def bench_reads(ids: list[str], reads: int, fn) -> float:
    rng = np.random.default_rng(1)
    names = list(DESCRIPTORS)
    picks = [
        (ids[i], names[j])
        for i, j in zip(rng.integers(len(ids), size=reads), rng.integers(len(names), size=reads), strict=True)
    ]
    t0 = time.perf_counter()
    for vid, name in picks:
        fn(vid, name)
    return reads / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=5000)
    parser.add_argument("--reads", type=int, default=50_000)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for compression in ("gzip", None):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ids = build(root, args.videos, args.shard_size, compression)
            reader = ShardReader(root)
            readers = (
                ("hdf5 shards", lambda vid, name, r=reader: r.get(vid, f"bench/{name}")),
                (".npy per video", lambda vid, name, d=root: np.load(d / "npy" / f"{vid}_{name}.npy")),
            )
            for label, fn in readers:
                bench_reads(ids, 2000, fn)  # open files, warm the page cache
                rate = bench_reads(ids, args.reads, fn)
                rows.append([label, compression or "none", args.videos, args.reads, round(rate)])
            reader.close()
    print_table(
        f"Random descriptor reads ({len(DESCRIPTORS)} descriptors of {sorted(DESCRIPTORS.values())} floats "
        "per video, warm page cache)",
        ["store", "compression", "videos", "reads", "reads/s"],
        rows,
    )


if __name__ == "__main__":
    main()
