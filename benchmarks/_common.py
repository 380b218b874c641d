"""Shared bits of the benchmark scripts: a table printer and the demo set."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.demo import generate_demo


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(fn, *args, repeat: int = 1):
    """(mean seconds per call, last output) of ``fn(*args)`` over ``repeat`` calls,
    after one warm-up call: first-call costs (graph building, allocation) are
    paid once per process and are not what a long run sees."""
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    return (time.perf_counter() - t0) / repeat, out


def interleaved(calls: dict[str, Callable[[], object]], repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in turns.

    For ratios between variants (hallucinated vs RGB-only): timing A's calls
    and then B's lets a load change between the two blocks (another process,
    frequency scaling) show up as a ratio. Taking turns, in an order that
    rotates every round, and the median over rounds, exposes both to the same
    conditions. Two warm-up calls each, since TorchScript's profiling
    executor optimises a graph on its second run.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}  ({machine()})")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def demo_root(data_root: str | Path = "datasets") -> Path:
    """The demo set used by ``make demo``, generated if missing."""
    root = Path(data_root) / "demo"
    generate_demo(root, progress=False)
    return Path(data_root)
