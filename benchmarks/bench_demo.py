"""Demo-set generation time (the issue asks for under a minute on 2 cores).

Run: `python benchmarks/bench_demo.py`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks._common import print_table
from pipelines.demo import DEMO_CLASSES, DemoSpec, generate_demo, total_clips_per_class


def main() -> None:
    spec = DemoSpec()
    rows = []
    for workers in sorted({1, os.cpu_count() or 1}):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_demo(Path(tmp) / "demo", spec, workers=workers, progress=False)
            dt = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        clips = total_clips_per_class(spec) * len(DEMO_CLASSES)
        rows.append([workers, clips, round(dt, 1), round(clips / dt, 1), f"{size / 2**20:.0f} MiB"])
    print_table("Demo generation", ["processes", "clips", "seconds", "clips/s", "size"], rows)


if __name__ == "__main__":
    main()
