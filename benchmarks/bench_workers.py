"""Demo-set extraction on 1 versus 2 dask workers (target: at least 1.8x).

Each cluster is started and warmed up (extractors set up, librosa's JIT
loaded) before the clock starts, so the figure measures extraction, not
process start-up; start-up is reported separately. Every timed run writes a
fresh store. Run: `python benchmarks/bench_workers.py [--extractors a,b]`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks._common import demo_root, print_table
from pipelines.cli import resolve_extractors
from pipelines.datasets import load_dataset, load_definition, resolve_paths
from pipelines.orchestrate import ClusterOptions, run_extraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extractors", default="default")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--shard-size", type=int, default=None, help="default: automatic")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from distributed import LocalCluster

    defn = load_definition("demo")
    records = load_dataset(defn, resolve_paths(defn, demo_root())).records
    specs = resolve_extractors(args.extractors.split(","), {})
    rows, base = [], None
    for n in (int(w) for w in args.workers.split(",")):
        t0 = time.perf_counter()
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR
            ) as cluster,
            tempfile.TemporaryDirectory() as tmp,
        ):
            options = ClusterOptions(scheduler=cluster.scheduler_address)
            run_extraction(records[: 4 * n], specs, Path(tmp) / "warm", options, shard_size=2, progress=False)
            startup = time.perf_counter() - t0
            best = float("inf")
            for r in range(args.repeats):
                t1 = time.perf_counter()
                summary = run_extraction(
                    records, specs, Path(tmp) / f"run{r}", options, shard_size=args.shard_size, progress=False
                )
                best = min(best, time.perf_counter() - t1)
        base = base or best
        rows.append(
            [
                n,
                len(records),
                round(startup, 2),
                round(best, 2),
                round(len(records) / best, 1),
                f"{base / best:.2f}x",
            ]
        )
        assert sum(c["done"] + c["flagged"] for c in summary.counts.values()) == len(records) * len(specs)
    print_table(
        f"Demo extraction ({', '.join(s.cls.name for s in specs)}; best of {args.repeats})",
        ["workers", "videos", "startup (s)", "extract (s)", "videos/s", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
