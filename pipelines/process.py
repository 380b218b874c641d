"""Per-process tuning for the work of both stages: thread pools and the allocator.

Called once where a process starts working: each dask worker (its plugin),
the ``workers=0`` path, ``train`` and ``evaluate``. Never at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Arrays below this come from the heap and stay there when freed.
MMAP_THRESHOLD = 32 * 2**20


def default_threads(workers: int) -> int:
    """Threads for each of ``workers`` processes sharing this machine: its cores divided among them."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def keep_freed_memory() -> bool:
    """Makes glibc keep freed arrays of up to 32 MiB for reuse instead of unmapping them.

    Why: the extractors allocate and free frame-sized arrays (0.3-3 MB)
    for every frame. By default glibc maps each one fresh from the kernel
    and unmaps it on free, so every frame pays page faults on all of its
    temporaries. Here that made ``off.hofmbh`` 3.6x slower (17.3 against
    4.8 ms a 340x256 flow field; benchmarks/bench_real.py). The cost is
    up to about 64 MiB of freed memory kept per process. Returns False
    where the C library is not glibc (nothing is changed there).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))


def configure_process(threads: int) -> None:
    """``threads`` for OpenCV's and torch's pools, and ``keep_freed_memory``.

    One value for both pools: the extractors and the trainer run one
    library's work at a time, and two pools of the cores' size each
    oversubscribe the machine (2 workers with 2 threads each made HOG 3x
    slower per video on 2 cores).
    """
    import cv2
    import torch

    threads = max(1, threads)
    cv2.setNumThreads(threads)
    torch.set_num_threads(threads)
    keep_freed_memory()


@contextlib.contextmanager
def native_stderr_to_log(logger: str) -> Iterator[None]:
    """Sends what native code writes to file descriptor 2 inside the block to ``logger`` (DEBUG).

    Why: MediaPipe's C++ (absl, TensorFlow Lite) prints "Created TensorFlow
    Lite XNNPACK delegate" and "Feedback manager requires a model with a
    single signature" on every new graph, once per worker and video, past
    Python's logging and warnings. They say nothing a user can act on;
    ``logging.getLogger(logger).setLevel(logging.DEBUG)`` shows them again.
    Nothing that the block itself raises is hidden: only the descriptor's
    output is redirected, and it is restored before the exception leaves.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log = logging.getLogger(logger)
                for line in text.splitlines():
                    log.debug(line)
