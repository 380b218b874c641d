"""``hallucinate fit-codebooks``: IDT codebooks fitted on a sample of training videos.

IDT is stored *encoded* (raw trajectories are ~1.7 KB each, tens of
thousands per video), so the codebook must exist before extraction. This
command runs flow + IDT on ``videos`` training videos drawn with ``seed``,
keeps at most ``descriptors`` trajectories drawn uniformly from them, fits
the PCA / GMM / k-means codebook (scikit-learn) and writes
``<codebooks>/<name>-<sha>.npz`` plus a ``<name>.npz`` link to it. The
printed ``options.idt.codebook=...`` is what ``make extract`` then takes.
Videos run in a process pool, one per core; a video that fails is named
and skipped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from extractors.codebooks import fit_codebook
from pipelines.config import to_plain
from pipelines.errors import ConfigError, HallucinateError
from pipelines.store import temporary_name


def _descriptors(args) -> list[tuple[str, np.ndarray | None, str | None]]:
    """Runs the extractors idt depends on, then idt's tracker, on a chunk of videos (in a worker).

    The extractors are set up once per chunk (RAFT flow loads a model), and
    a failing video is named and skipped; the fit goes on with the others.
    """
    specs, videos, cap, seed = args
    from extractors.base import Result
    from pipelines.decode import VideoSource
    from pipelines.runner import ExtractorPool, dependency_order

    pool = ExtractorPool()
    out = []
    try:
        extractors = {s.cls.name: pool.get(s) for s in specs}
        order = dependency_order(extractors)
        for video_id, path in videos:
            video = VideoSource(video_id, path)
            results: dict[str, Result] = {}
            try:
                for name in order:
                    inputs = {d: results[d] for d in extractors[name].needs().inputs}
                    if name == "idt":
                        x = extractors[name].trajectories(video, inputs).descriptors
                    else:
                        results[name] = extractors[name].process(video, inputs)
            except Exception as exc:
                out.append((video_id, None, f"{path}: {type(exc).__name__}: {exc}"))
                continue
            if len(x) > cap:
                x = x[np.random.default_rng([seed, len(x)]).choice(len(x), cap, replace=False)]
            out.append((video_id, x, None))
    finally:
        pool.close()
    return out


def fit_codebooks(cfg) -> Path:
    """Samples videos, collects descriptors, fits and saves; returns the codebook's path."""
    from pipelines.cli import default_out, load_records, resolve_extractors

    options = dict(cfg.options)
    idt_options = {**options.get("idt", {}), "store_raw": True, "codebook": None, "codebook_sha": None}
    specs = resolve_extractors(["idt"], {**options, "idt": idt_options})
    dataset, records = load_records(cfg)
    pool = [r for r in records if r.split == cfg.split]
    if not pool:
        splits = sorted({r.split for r in records})
        raise ConfigError(
            f"dataset {dataset.name!r} has no {cfg.split!r} videos (splits: {splits}); set split="
        )
    rng = np.random.default_rng(cfg.seed)
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), min(cfg.videos, len(pool)), replace=False))]
    cap = max(1, -(-cfg.descriptors // len(chosen)) * 4)  # per video, before the final uniform draw
    workers = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)
    size = max(1, min(8, len(chosen) // (4 * max(workers, 1))))  # chunks: setup once, progress often
    jobs = [
        (specs, [(r.video_id, r.path) for r in chosen[i : i + size]], cap, cfg.seed)
        for i in range(0, len(chosen), size)
    ]
    parts, failures = [], []
    t0 = time.perf_counter()
    bar = tqdm(total=len(chosen), desc="idt for codebooks", unit="video", disable=not cfg.progress)
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as executor:
        for chunk in (executor.map if executor else map)(_descriptors, jobs):
            for _, x, error in chunk:
                bar.update(1)
                if error:
                    failures.append(error)
                elif len(x):
                    parts.append(x)
    bar.close()
    for error in failures:
        print(f"skipped {error}", file=sys.stderr)
    if not parts:
        raise HallucinateError(f"no trajectory was found in the {len(chosen)} sampled videos; nothing to fit")
    x = np.concatenate(parts)
    if len(x) > cfg.descriptors:
        x = x[rng.choice(len(x), cfg.descriptors, replace=False)]
    extract_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    idt_spec = next(s for s in specs if s.cls.name == "idt")
    book = fit_codebook(
        x,
        cfg.components,
        cfg.words,
        cfg.seed,
        cfg.gmm_iterations,
        meta={"dataset": dataset.name, "videos": len(chosen), "idt": to_plain(idt_spec.config)},
        gmm_sample=cfg.gmm_sample,
    )
    store = Path(cfg.out) if cfg.out else default_out(cfg.dataset)
    out = Path(cfg.codebooks) if cfg.codebooks else store / "codebooks"
    name = cfg.name or dataset.name
    path = book.save(out, name)
    link = out / f"{name}.npz"
    tmp = temporary_name(link)  # the store's rule, which its sweep of killed writers' files knows
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    os.replace(tmp, link)
    print(
        f"fitted on {len(x)} descriptors from {len(chosen)} videos (tracking {extract_s:.0f} s, fitting "
        f"{time.perf_counter() - t1:.0f} s); wrote {path}\n"
        f"extract with: options.idt.codebook={link}",
        file=sys.stderr,
    )
    return path
