"""The ``hallucinate`` command: parses configs once, then calls plain functions.

    hallucinate extract [--config FILE] [key=value ...]
    hallucinate inspect [--config FILE] [key=value ...]
    hallucinate extractors

Every subcommand takes an optional YAML file and ``key=value`` overrides,
validated into the dataclasses below; an unknown key or a wrong type stops
the command with the key's name before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import build_config
from pipelines.datasets import split_counts
from pipelines.device import pick_device
from pipelines.errors import ConfigError, HallucinateError
from pipelines.process import configure_process


@dataclass
class ExtractConfig:
    """``hallucinate extract``: which dataset, which extractors, where, on what cluster."""

    dataset: str = "demo"  # a name in data/ or the path of your own definition YAML
    definition: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. definition.split_number=2
    data_root: str = "datasets"  # datasets live in <data_root>/<definition root>
    video_root: str | None = None  # overrides the definition's video folder
    annotation_root: str | None = None
    splits: list[str] = field(default_factory=list)  # empty: every split
    limit: int | None = None  # only the first N videos (smoke tests)
    out: str | None = None  # default: features/<dataset>
    extractors: list[str] = field(default_factory=lambda: ["default"])
    options: dict[str, Any] = field(default_factory=dict)  # options.<extractor>.<key>=value
    shard_size: int | None = None  # videos per shard; None: 4-64, at least ~16 shards
    max_attempts: int = 2  # a failed video is retried once by the next run
    compression: str | None = "gzip"
    workers: int | None = None  # None: one per core; 0: in this process, no dask
    threads: int | None = None  # OpenCV/torch threads per worker; None: cores / workers
    scheduler: str | None = None  # tcp://host:port of an existing dask scheduler
    cluster: str = "local"  # local, slurm, pbs, sge, lsf or htcondor
    jobqueue: dict[str, Any] = field(default_factory=dict)  # dask-jobqueue cluster arguments
    progress: bool = True
    lock_wait: float = 0.0  # seconds to wait for another run on the same out; 0: stop at once

    def __post_init__(self) -> None:
        """Refuses counts that would otherwise mean something else quietly: ``limit=-1`` was
        Python's "all but the last", ``shard_size=0`` "automatic", and ``workers=-1`` a
        cluster of no workers that waited for ever."""
        bounds = {
            "limit": (self.limit, 0, "leave it unset for every video"),
            "shard_size": (self.shard_size, 1, "leave it unset for 4-64 videos a shard"),
            "workers": (self.workers, 0, "0 runs in this process; leave it unset for one per core"),
            "threads": (self.threads, 1, "leave it unset for cores / workers"),
            "max_attempts": (self.max_attempts, 1, "1 never retries a failed video"),
        }
        for key, (value, least, hint) in bounds.items():
            if value is not None and value < least:
                raise ConfigError(f"{key}={value}: give at least {least} ({hint})")


@dataclass
class RepoolConfig(ExtractConfig):
    """``hallucinate repool``: ODF pooled again from stored boxes (as ``odf.repool``), no detector run.

    The dataset, store and cluster keys are those of ``extract``; the
    ``extractors`` and ``options`` keys are set by this command.
    """

    source: str = "odf.motion"
    n_vectors: int = 3
    rbf: bool = False
    power_norm: str = "sigme"
    power_norm_params: dict[str, float] = field(default_factory=dict)


@dataclass
class FitCodebooksConfig(ExtractConfig):
    """``hallucinate fit-codebooks``: IDT codebooks (PCA, GMM, k-means) from sampled training videos.

    The dataset, store and ``options.flow`` / ``options.idt`` keys are those
    of ``extract``; ``workers`` processes run the tracker.
    """

    split: str = "train"
    videos: int = 256  # training videos sampled (seeded)
    descriptors: int = 1_000_000  # at most, drawn uniformly from their trajectories
    components: int = 256  # GMM components (Fisher vectors)
    words: int = 1000  # k-means words (BoW); the paper also uses 4000
    gmm_iterations: int = 100
    gmm_sample: int = 256_000  # descriptors the GMM is fitted on (Wang & Schmid: 256k)
    seed: int = 0
    codebooks: str | None = None  # output folder; default <out>/codebooks
    name: str | None = None  # file name stem; default the dataset's name


@dataclass
class InspectConfig:
    """``hallucinate inspect``: what a feature store holds and what failed."""

    dataset: str = "demo"
    out: str | None = None
    video: str | None = None  # show one video's descriptors and provenance
    failures: int = 20  # how many ledger lines to show


@dataclass
class RunLocation:
    """Where a run's data, feature store and run directory are: shared by train and evaluate."""

    dataset: str = "demo"
    definition: dict[str, Any] = field(default_factory=dict)
    data_root: str = "datasets"
    video_root: str | None = None
    features: str | None = None  # the feature store; default features/<dataset>
    run: str | None = None  # the run directory; default runs/<dataset>


@dataclass
class TrainConfig(RunLocation):
    """``hallucinate train``: the hallucination model and, by default, its RGB-only baseline."""

    streams: list[str] = field(default_factory=lambda: ["auto"])  # descriptors or extractors; auto: all
    # auto leaves out a stream whose ground truth covers fewer than this share of the
    # training videos (an extractor that flagged most of them, e.g. no boxes). 0 keeps
    # them, as the paper's masks do: on the demo, leaving out odf.hog (5 of 180 videos)
    # cost test accuracy on seeds 0-2. Streams under 10% are named in a warning anyway.
    min_coverage: float = 0.0
    baseline: bool = True  # also train the RGB-only baseline, same backbone and budget
    backbone: str = "tiny3d"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    # Frozen-backbone mode: train on X_rgb stored by the rgb.features extractor
    # (rgb_features=rgb.features/x_rgb) instead of decoding video; backbone is then ignored.
    rgb_features: str | None = None
    # Clip and optimiser settings left at None take the backbone's defaults
    # (hallucinate.backbones.TrainingDefaults): the paper's 64 frames and Adam at
    # 1e-4 for the video backbones, 16 frames at 72² and 1e-3 for tiny3d.
    frames: int | None = None
    size: int | None = None
    short_side: int | None = None
    fps: float | None = None
    d: int = 128
    copies: int = 1
    hidden: int = 256
    fused_dim: int | None = 2000
    head: str = "fc"
    fusion: str = "concat"  # concat (+ P_tot sketch) or weighted_mean (Eqs. 21-22)
    beta_warmup: int = 10  # weighted_mean: epochs of equal weights before β is searched
    power_norm: str = "asinhe"
    loss: str = "mse"  # mse, uncertainty, or none (the control: streams trained by classification only)
    pattern: str = "grouped"  # grouped, diagonal or literal (uncertainty loss)
    kappa: float = 1.0
    alpha: float = 1.0
    epochs: int = 30
    batch_size: int | None = None
    lr: float | None = None
    lr_step: int = 10
    warmup: int = 0  # epochs of linear learning-rate warm-up
    head_out_lr: float = 1.0  # the streams' last layers learn at this multiple of lr
    weight_decay: float = 0.0
    hal_updates_backbone: bool = True
    schedule: str = "alternating"  # the paper's two updates per iteration, or "joint" (one, cheaper)
    precision: str = "fp32"  # or bf16 / fp16: mixed-precision forward passes, for GPUs with tensor cores
    seed: int = 0
    device: str = "auto"
    # DataLoader workers; None: none when the videos are preloaded, else min(8, cores)
    workers: int | None = None
    # torch's (and OpenCV's) threads in this process; None: the cores the DataLoader
    # workers leave free (all of them when preloaded). Fewer help on a busy machine.
    threads: int | None = None
    # Decode every video once into memory. None (auto): when the decoded videos fit in a
    # quarter of the free memory (the demo's do), else stream them from disk.
    preload: bool | None = None
    resume: bool = True
    # The same weights for the same seed on any machine: one torch thread (a sum over other
    # thread counts rounds differently) and deterministic kernels. Costs speed on many cores.
    deterministic: bool = False
    export: bool = True  # export the RGB-only inference model after training
    export_formats: list[str] = field(default_factory=lambda: ["torchscript"])  # torchscript, onnx
    progress: bool = True


@dataclass
class StudyConfig(RunLocation):
    """``hallucinate study``: a grid of seeds x variants, each trained and evaluated, and a report."""

    seeds: str = "0-2"  # 0-5, or 0,2,7
    # baseline, hallucinated (hal), oracle, control, drop:<stream>, name:key=value+key=value
    variants: list[str] = field(default_factory=lambda: ["baseline", "hallucinated", "control", "oracle"])
    study: str | None = None  # the study directory; default studies/<dataset>
    train: dict[str, Any] = field(default_factory=dict)  # train.<key>=value for every run
    workers: int = 1  # training runs at a time, each in its own processes (dask: workers started)
    # Each run a task on a dask cluster instead of a local process, as for extract: an
    # existing scheduler, or workers started as batch jobs (cluster=slurm, jobqueue.*).
    scheduler: str | None = None
    cluster: str = "local"
    jobqueue: dict[str, Any] = field(default_factory=dict)
    # A markdown file whose <!-- study:NAME --> block (NAME: the study directory's name) gets the
    # summary table; make study passes README.md, whose demo table is made this way.
    readme: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: give at least 1 (runs trained at a time)")


@dataclass
class EvaluateConfig(RunLocation):
    """``hallucinate evaluate``: three protocols, stream ablation and quality of a run.

    The videos and the feature store default to the ones the run was trained
    on (its ``config.json``), not to ``RunLocation``'s defaults:
    ``evaluate run=...`` after ``train features=... run=...`` would otherwise
    read another store, and fail on missing descriptors at best.
    """

    dataset: str | None = None  # default: the run's, else demo
    definition: dict[str, Any] | None = None
    data_root: str | None = None
    batch_size: int = 32
    device: str = "auto"
    preload: bool | None = None  # as for train: None decides from the free memory
    threads: int | None = None  # torch's threads; None: every core
    progress: bool = True  # the decode bar of the preloaded splits


def default_out(dataset: str) -> Path:
    return Path("features") / Path(dataset).stem


def split_extractor_options(options: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """``options.audio.logmel.n_mels=32`` nests by dots; regroup it under ``audio.logmel``."""
    found: dict[str, dict[str, Any]] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if path in names:
                if not isinstance(value, dict):
                    raise ConfigError(f"options.{path} must be a mapping of that extractor's options")
                found.setdefault(path, {}).update(value)
            elif isinstance(value, dict):
                walk(path, value)
            else:
                raise ConfigError(
                    f"options.{path}: no extractor of this run is a prefix of it; "
                    f"extractors in this run: {', '.join(names)}"
                )

    walk("", options)
    return found


def resolve_extractors(names: list[str], options: dict[str, Any]):
    """Extractor specs for the requested names, dependencies added, options validated."""
    from extractors import default_extractors, get_extractor_class
    from pipelines.runner import ExtractorSpec

    wanted: list[str] = []
    for name in names:
        for expanded in default_extractors() if name == "default" else [name]:
            if expanded not in wanted:
                wanted.append(expanded)
    per_name = split_extractor_options(options, wanted)
    specs: dict[str, ExtractorSpec] = {}
    pending = list(wanted)
    while pending:
        name = pending.pop(0)
        if name in specs:
            continue
        extractor = get_extractor_class(name).from_options(per_name.get(name, {}))
        specs[name] = ExtractorSpec(type(extractor), extractor.config)
        pending.extend(d for d in extractor.needs().inputs if d not in specs)
    return list(specs.values())


def load_records(cfg: ExtractConfig):
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition(cfg.dataset, cfg.definition)
    paths = resolve_paths(defn, cfg.data_root, cfg.video_root, cfg.annotation_root)
    if defn.generator and not cfg.video_root:
        module, _, func = defn.generator.partition(":")
        try:
            generate = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            raise ConfigError(
                f"dataset {defn.name!r}: generator {defn.generator!r} is not an importable module:function"
            ) from None
        generate(paths.root, progress=cfg.progress)
    dataset = load_dataset(defn, paths)
    records = [r for r in dataset.records if not cfg.splits or r.split in cfg.splits]
    if cfg.limit is not None:
        records = records[: cfg.limit]
    return dataset, records


def cmd_extract(cfg: ExtractConfig) -> int:
    from pipelines.orchestrate import ClusterOptions, run_extraction

    specs = resolve_extractors(cfg.extractors, cfg.options)
    dataset, records = load_records(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg.dataset)
    print(
        f"extracting {', '.join(s.cls.name for s in specs)} for {len(records)} videos of "
        f"{dataset.name} into {out}",
        file=sys.stderr,
    )
    print(split_counts(dataset.classes, records), file=sys.stderr)
    options = ClusterOptions(cfg.workers, cfg.scheduler, cfg.cluster, dict(cfg.jobqueue), threads=cfg.threads)
    summary = run_extraction(
        records,
        specs,
        out,
        options,
        cfg.shard_size,
        cfg.max_attempts,
        cfg.compression,
        cfg.progress,
        cfg.lock_wait,
    )
    print(summary.table())
    if summary.failures:
        print(
            f"{len(summary.failures)} failure(s) recorded in {out / 'ledger.jsonl'}; "
            f"`hallucinate inspect out={out}` lists them"
        )
    if summary.shard_errors:
        print(f"{len(summary.shard_errors)} shard(s) did not finish; re-run the same command to resume")
        return 1
    return 0


def cmd_repool(cfg: RepoolConfig) -> int:
    pooling = {k: getattr(cfg, k) for k in ("source", "n_vectors", "rbf", "power_norm", "power_norm_params")}
    extract = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExtractConfig)}
    return cmd_extract(
        ExtractConfig(**{**extract, "extractors": ["odf.repool"], "options": {"odf.repool": pooling}})
    )


def cmd_fit_codebooks(cfg: FitCodebooksConfig) -> int:
    from pipelines.codebooks import fit_codebooks

    fit_codebooks(cfg)
    return 0


def cmd_inspect(cfg: InspectConfig) -> int:
    from pipelines.store import LEDGER, SHARDS, ShardIndex, read_ledger, read_shard, shard_path

    out = Path(cfg.out) if cfg.out else default_out(cfg.dataset)
    index = ShardIndex.load(out)
    if not index.shards:
        raise HallucinateError(f"{out} holds no extraction (no index.json); run `make extract` first")
    written = [s for s in index.shards if shard_path(out, s).is_file()]
    size = sum(p.stat().st_size for p in (out / SHARDS).glob("*.h5"))
    n_videos = sum(len(v) for v in index.shards.values())
    print(
        f"store {out}: {n_videos} videos in {len(index.shards)} shards "
        f"({len(written)} written, {size / 2**20:.1f} MiB)"
    )
    status: dict[str, Counter] = defaultdict(Counter)
    hashes: dict[str, set] = defaultdict(set)
    flags: dict[str, Counter] = defaultdict(Counter)
    for shard in written:
        entries, _ = read_shard(shard_path(out, shard))
        for (_, extractor), entry in entries.items():
            status[extractor][entry.status] += 1
            hashes[extractor].add(f"v{entry.attrs.get('version')}:{entry.config_hash}")
            for flag in entry.flags:
                flags[extractor][flag] += 1
    print(f"\n{'extractor':<24}{'done':>8}{'flagged':>9}{'failed':>8}  versions:config")
    for name in sorted(status):
        c = status[name]
        print(f"{name:<24}{c['done']:>8}{c['flagged']:>9}{c['failed']:>8}  {', '.join(sorted(hashes[name]))}")
        for flag, n in flags[name].items():
            print(f"{'':<24}flag {flag}: {n}")
    ledger = read_ledger(out)
    print(f"\nledger {out / LEDGER}: {len(ledger)} failure(s)" + (", latest:" if ledger else ""))
    for row in ledger[-cfg.failures :]:
        print(
            f"  [{row['extractor']}] {row['video_id']} attempt {row['attempt']}: "
            f"{row['error_type']}: {row['message'][:160]}"
        )
    if cfg.video:
        from pipelines.store import ShardReader

        reader = ShardReader(out)
        for extractor in reader.extractors(cfg.video):
            entry = reader.entry(cfg.video, extractor)
            print(f"\n{cfg.video} / {extractor}: {entry.status} {entry.flags or ''}")
            for key, value in sorted(entry.attrs.items()):
                print(f"  {key}: {value}")
            for name, (shape, dtype) in reader.arrays(cfg.video, extractor).items():
                print(f"  [{name}] shape {shape} {dtype}")
    return 0


def cmd_extractors(_: Any) -> int:
    from extractors import default_extractors, get_extractor_class, list_extractors
    from extractors.base import WEIGHTS_KINDS

    defaults = set(default_extractors())
    for name in list_extractors():
        ex = get_extractor_class(name)()
        outs = ", ".join(f"{k}{list(v.shape)}" for k, v in ex.produces().items())
        mark = " (default)" if name in defaults else ""
        print(f"{name}{mark}  v{ex.version}  -> {outs}")
        print(f"    {(type(ex).__doc__ or '').strip().splitlines()[0] if type(ex).__doc__ else ''}")
        print(f"    runs: {WEIGHTS_KINDS[ex.weights]}")
    return 0


def _load_dataset(cfg):
    """The dataset a train or evaluate config names, parsed once."""
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition(cfg.dataset, cfg.definition)
    return load_dataset(defn, resolve_paths(defn, cfg.data_root, cfg.video_root))


def _split_records(dataset, max_train: int | None = None, seed: int = 0) -> dict[str, list]:
    """Train / val / test records of a run (test falls back to val when absent).

    ``max_train`` keeps a seeded sample of the training videos: evaluate
    reports hallucination quality on train from at most that many, since a
    pass over every training video of Kinetics would take as long as an
    epoch and an R² needs no more.
    """
    from hallucinate.data import sample_records

    parts = {name: dataset.split(name) for name in ("train", "val", "test")}
    if not parts["train"]:
        raise HallucinateError(f"dataset {dataset.name!r} has no train split")
    parts["val"] = parts["val"] or parts["test"]
    parts["test"] = parts["test"] or parts["val"]
    if max_train is not None:
        parts["train"] = sample_records(parts["train"], max_train, seed)
    return parts


def _preload(choice: bool | None, parts: dict[str, list], clip) -> bool:
    """``preload`` as given, or (None) whether the run's decoded videos fit in memory."""
    if choice is not None or clip.features:  # frozen-backbone mode decodes nothing
        return bool(choice)
    import psutil

    from hallucinate.data import plan_preload

    records = list({r.video_id: r for records in parts.values() for r in records}.values())
    plan = plan_preload(records, clip, psutil.virtual_memory().available)
    print(plan.reason, file=sys.stderr)
    return plan.preload


def _splits(
    dataset, parts: dict[str, list], store: Path, streams, clip, preload: bool, seed: int, progress: bool
):
    """The clip datasets of ``parts``; a split given the same records as val shares its dataset."""
    from hallucinate.data import ClipDataset
    from hallucinate.run import Splits

    def make(records, train):
        return ClipDataset(
            records,
            len(dataset.classes),
            clip,
            train,
            store,
            streams,
            dataset.multilabel,
            preload,
            seed,
            progress,
        )

    train = make(parts["train"], True)
    if train.short_videos:
        print(
            f"note: {train.short_videos} of {len(train)} training videos have fewer than {clip.frames} "
            "frames at the sampled rate, so their clips loop (restart at the first frame)",
            file=sys.stderr,
        )
    if train.unreadable:
        print(
            f"warning: left {len(train.unreadable)} training video(s) that cannot be decoded out of "
            f"this run ({', '.join(list(train.unreadable)[:5])}); the first: {train.first_unreadable()}",
            file=sys.stderr,
        )
    val = make(parts["val"], False)
    test = val if parts["test"] is parts["val"] else make(parts["test"], False)
    return Splits(train, val, test)


def _stored_x_rgb_shape(store: Path, dataset, name: str) -> dict[str, int]:
    """(channels, frames) of the X_rgb stored as ``name``, from the first training video that has it."""
    from pipelines.store import ShardReader

    reader = ShardReader(store)
    for record in dataset.split("train"):
        try:
            _, channels, frames = reader.get(record.video_id, name).shape
        except KeyError:
            continue
        return {"channels": channels, "frames": frames}
    raise HallucinateError(
        f"{store}: no training video has {name}; run `hallucinate extract extractors=rgb.features "
        "options.rgb.features.backbone=...` first"
    )


# Below this share of the training videos with ground truth, a stream is named in a warning.
WARN_COVERAGE = 0.1


def _without_sparse_streams(
    streams, coverage: dict[str, int], n_videos: int, min_coverage: float, keep: bool
):
    """Warns about streams with ground truth on few of the ``n_videos`` training
    videos, whose heads can only memorise those few, and leaves out the
    auto-discovered ones under ``min_coverage``; a stream the user named is always kept."""
    from hallucinate.data import sparse_streams

    sparse = sparse_streams(streams, coverage, n_videos, max(min_coverage, WARN_COVERAGE))
    drop = set() if keep else set(sparse_streams(streams, coverage, n_videos, min_coverage))
    for name, n in sparse.items():
        if name in drop:
            what = f"leaving it out (min_coverage={min_coverage}; min_coverage=0 keeps it)"
        elif keep:
            what = "training it anyway, as named in streams="
        else:
            what = f"training it anyway (min_coverage={WARN_COVERAGE} would leave it out)"
        print(
            f"warning: {name} has ground truth on {n} of {n_videos} training videos, so its head "
            f"can only memorise them; {what}. `hallucinate inspect` shows why "
            f"{name.rpartition('/')[0]} flagged or failed the others.",
            file=sys.stderr,
        )
    return [s for s in streams if s.name not in drop]


def with_backbone_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every clip and optimiser setting left at None taken from its
    backbone (the frozen-backbone mode's, with ``rgb_features``).

    Resolved here, at the edge, so that ``config.json`` records the values
    that were trained with, and the rest of the code never sees a None.
    """
    from hallucinate.backbones import BACKBONES

    defaults = BACKBONES.get("precomputed" if cfg.rgb_features else cfg.backbone).defaults
    unset = {
        f.name: getattr(defaults, f.name)
        for f in dataclasses.fields(defaults)
        if getattr(cfg, f.name) is None
    }
    return dataclasses.replace(cfg, **unset)


def cmd_train(cfg: TrainConfig) -> int:
    import json

    from hallucinate.data import ClipSpec, discover_streams, scan_ground_truth
    from hallucinate.run import EXPORTERS, ModelOptions, train_model
    from hallucinate.trainer import Schedule, build_hallucination_loss

    cfg = with_backbone_defaults(cfg)
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads}: give at least 1, or leave it unset")
    unknown = [f for f in cfg.export_formats if f not in EXPORTERS]
    if unknown:
        raise ConfigError(f"export_formats: unknown {unknown}; use {', '.join(EXPORTERS)}")
    try:  # a bad loss or pattern is named now, not after the videos are decoded
        build_hallucination_loss(cfg.loss, 1, cfg.d, cfg.pattern, cfg.kappa, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"loss={cfg.loss} pattern={cfg.pattern}: {err}") from err
    if not 0 <= cfg.min_coverage <= 1:
        raise ConfigError(f"min_coverage={cfg.min_coverage}: give a share of the training videos, 0 to 1")
    try:  # a bad schedule or precision is named now, as a bad loss is
        schedule = Schedule(
            cfg.epochs,
            cfg.lr,
            cfg.lr_step,
            0.5,
            cfg.weight_decay,
            cfg.alpha,
            cfg.hal_updates_backbone,
            cfg.schedule,
            cfg.beta_warmup,
            warmup=cfg.warmup,
            precision=cfg.precision,
            head_out_lr=cfg.head_out_lr,
        )
    except ValueError as err:
        raise ConfigError(f"schedule={cfg.schedule} precision={cfg.precision}: {err}") from err
    dataset = _load_dataset(cfg)
    print(split_counts(dataset.classes, dataset.records), file=sys.stderr)
    store = Path(cfg.features) if cfg.features else default_out(cfg.dataset)
    wanted = None if cfg.streams == ["auto"] else cfg.streams
    train_ids = [r.video_id for r in dataset.split("train")]
    scan = scan_ground_truth(store, train_ids) if (store / "index.json").is_file() or wanted else None
    streams = discover_streams(store, train_ids, wanted, scan) if scan is not None else []
    if not streams:
        print(
            f"warning: no descriptors in {store}; training RGB-only. Run `make extract` first.",
            file=sys.stderr,
        )
    else:
        keep = wanted is not None
        streams = _without_sparse_streams(streams, scan.coverage, len(train_ids), cfg.min_coverage, keep)
    for extractor, reasons in (scan.without_ground_truth() if scan is not None else {}).items():
        why = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
        print(
            f"warning: {extractor} gives no stream: none of the {len(train_ids)} training videos has "
            f"ground truth for it ({why}). `hallucinate inspect` shows the flags' reasons.",
            file=sys.stderr,
        )
    if cfg.fusion == "weighted_mean" and streams and cfg.epochs <= cfg.beta_warmup:
        print(
            f"warning: fusion=weighted_mean keeps equal weights (beta 0) for the whole run: beta is "
            f"searched only after beta_warmup={cfg.beta_warmup} epochs, and epochs={cfg.epochs}. "
            "Set beta_warmup below epochs for Eq. 22's weighting.",
            file=sys.stderr,
        )
    clip = ClipSpec(cfg.frames, cfg.size, cfg.short_side, cfg.fps, cfg.rgb_features)
    parts = _split_records(dataset)
    preload = _preload(cfg.preload, parts, clip)
    workers = cfg.workers if cfg.workers is not None else 0 if preload else min(8, os.cpu_count() or 1)
    if cfg.deterministic and cfg.threads not in (None, 1):
        raise ConfigError(f"deterministic=true runs torch on one thread; leave threads={cfg.threads} unset")
    threads = 1 if cfg.deterministic else cfg.threads or max(1, (os.cpu_count() or 1) - workers)
    cfg = dataclasses.replace(cfg, preload=preload, workers=workers, threads=threads)
    configure_process(threads)
    backbone, backbone_options = cfg.backbone, dict(cfg.backbone_options)
    if cfg.rgb_features:
        backbone, backbone_options = "precomputed", _stored_x_rgb_shape(store, dataset, cfg.rgb_features)
    options = ModelOptions(
        backbone,
        backbone_options,
        cfg.d,
        cfg.copies,
        cfg.hidden,
        cfg.fused_dim,
        cfg.head,
        cfg.power_norm,
        {},
        cfg.loss,
        cfg.pattern,
        cfg.kappa,
        cfg.fusion,
    )
    run = Path(cfg.run) if cfg.run else Path("runs") / Path(cfg.dataset).stem
    _refuse_other_settings(run, cfg)
    run.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    splits = _splits(dataset, parts, store, streams, clip, cfg.preload, cfg.seed, cfg.progress)
    device = pick_device(cfg.device)
    names = ", ".join(s.name for s in streams) or "none"
    print(f"streams: {names}", file=sys.stderr)
    jobs = [("model", streams)] + ([("baseline", [])] if cfg.baseline else [])
    with _deterministic(cfg.deterministic):
        for name, job_streams in jobs:
            print(
                f"training {name} ({cfg.backbone}, {len(job_streams)} streams) into {run / name}",
                file=sys.stderr,
            )
            train_model(
                run / name,
                splits,
                job_streams,
                len(dataset.classes),
                options,
                schedule,
                clip,
                cfg.batch_size,
                cfg.seed,
                dataset.multilabel,
                cfg.workers,
                device,
                cfg.resume,
                cfg.progress,
                log=lambda m: print(m, file=sys.stderr),
            )
            if cfg.export and name == "model":
                from hallucinate.run import EXPORTERS, load_model

                model = load_model(run / name)
                for fmt in cfg.export_formats:
                    export, filename = EXPORTERS[fmt]
                    path = export(model, clip, run / name / filename)
                    print(f"exported the RGB-only inference model to {path}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch's deterministic kernels for the block, then the setting it found (it is process-wide)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # CUDA's deterministic GEMMs need it
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# Keys that change where, how fast or how long a run goes, never what it has learnt so
# far: a resumed run may change them (epochs may grow, to train on).
RESUMABLE_KEYS = frozenset(
    {"progress", "workers", "threads", "preload", "device", "resume", "export", "export_formats"}
    | {"run", "features", "data_root", "video_root", "epochs"}
)


def _refuse_other_settings(run: Path, cfg: TrainConfig) -> None:
    """Resuming a run with settings it was not trained with: names the keys, writes nothing.

    Why: ``make train`` after ``make demo`` resumed ``runs/demo`` with the
    CLI's defaults instead of the demo's, overwrote its ``config.json``,
    then failed on a checkpoint that "does not fit this version's model",
    blaming the version for what the settings did.
    """
    import json
    from dataclasses import asdict

    saved_file = run / "config.json"
    checkpoints = [run / name / "last.pt" for name in ("model", "baseline")]
    if not cfg.resume or not saved_file.is_file() or not any(p.is_file() for p in checkpoints):
        return
    saved = json.loads(saved_file.read_text())
    mine = json.loads(json.dumps(asdict(cfg)))
    differ = {
        key: (saved[key], value)
        for key, value in mine.items()
        if key not in RESUMABLE_KEYS and key in saved and saved[key] != value
    }
    if differ:
        changes = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        theirs = " ".join(
            f"{k}={old if isinstance(old, str) else json.dumps(old, separators=(',', ':'))}"
            for k, (old, _) in differ.items()
        )
        raise ConfigError(
            f"{run} was trained with other settings, so it cannot resume with these ({changes}). "
            f"Train these settings into a new run= (e.g. run={run}-2), or resume it with its own: "
            f"{theirs} (resume=false starts it over instead). Nothing in {run} was changed."
        )


EVALUATE_TRAIN_VIDEOS = 2000  # the sample of training videos evaluate measures quality on


def trained_location(cfg: EvaluateConfig) -> RunLocation:
    """Evaluate's data and store: each field given on the command line, else the run's own.

    The run directory is ``run=``, else ``runs/<dataset>``. A run without a
    ``config.json`` (trained elsewhere, copied without it) falls back to the
    defaults that ``hallucinate train`` has.
    """
    import json

    defaults = RunLocation()
    run = Path(cfg.run) if cfg.run else Path("runs") / Path(cfg.dataset or defaults.dataset).stem
    saved_file = run / "config.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}

    def pick(name: str) -> Any:
        given = getattr(cfg, name)
        return given if given is not None else saved.get(name, getattr(defaults, name))

    names = [f.name for f in dataclasses.fields(RunLocation) if f.name != "run"]
    location = RunLocation(**{name: pick(name) for name in names}, run=str(run))
    if saved.get("dataset") not in (None, location.dataset):
        print(
            f"note: {run} was trained on {saved['dataset']}, evaluating on {location.dataset}",
            file=sys.stderr,
        )
    return location


def cmd_evaluate(cfg: EvaluateConfig) -> int:
    from hallucinate.data import ClipSpec
    from hallucinate.model import StreamSpec
    from hallucinate.run import checkpoint_config, evaluate_run

    configure_process(cfg.threads or os.cpu_count() or 1)
    location = trained_location(cfg)
    run = Path(location.run)
    best = run / "model" / "best.pt"
    if not best.is_file():
        raise HallucinateError(
            f"{best} not found: train first (`make train` or `hallucinate train run={run}`)"
        )
    saved = checkpoint_config(best)
    streams = [StreamSpec(**s) for s in saved["streams"]]
    clip = ClipSpec(**saved["clip"])
    dataset = _load_dataset(location)
    store = Path(location.features) if location.features else default_out(location.dataset)
    print(f"evaluating {run} on {location.dataset} (feature store {store})", file=sys.stderr)
    parts = _split_records(dataset, max_train=EVALUATE_TRAIN_VIDEOS, seed=saved["seed"])
    parts["val"] = parts["test"]  # evaluate reads no validation clip
    preload = _preload(cfg.preload, parts, clip)
    splits = _splits(dataset, parts, store, streams, clip, preload, saved["seed"], cfg.progress)
    report = evaluate_run(run, splits, cfg.batch_size, dataset.multilabel, pick_device(cfg.device))
    print(format_report(report))
    print(f"\nwritten: {run / 'evaluation.json'}, {run / 'curves.png'}, {run / 'quality.png'}")
    return 0


def format_report(report: dict) -> str:
    protocols = report["protocols"]
    metrics = list(next(iter(protocols.values())))
    lines = ["protocol        " + "".join(f"{m:>16}" for m in metrics)]
    for name, values in protocols.items():
        lines.append(f"{name:<16}" + "".join(f"{values[m]:>16.3f}" for m in metrics))
    if report["drop_one"]:
        w = max(24, 2 + max(len(name) for name in report["streams"]))  # sdf.spectral_residual/descriptor
        lines.append(f"\n{'drop one stream (test)':<{w}}" + "".join(f"{m:>16}" for m in metrics))
        for name, values in report["drop_one"].items():
            lines.append(f"{name:<{w}}" + "".join(f"{values[m]:>16.3f}" for m in metrics))
        lines.append(
            f"\n{'stream quality':<{w}}{'R2 train':>10}{'R2 test':>10}{'cos train':>11}{'cos test':>10}"
            + (f"{'R2 label':>10}" if "label_r2" in report else "")
        )
        for name in report["streams"]:
            tr, te = report["quality"]["train"][name], report["quality"]["test"][name]
            lines.append(
                f"{name:<{w}}{tr['r2']:>10.3f}{te['r2']:>10.3f}{tr['cosine']:>11.3f}{te['cosine']:>10.3f}"
                + (f"{report['label_r2'][name]:>10.3f}" if "label_r2" in report else "")
            )
        lines += _quality_notes(report)
    if report.get("loss") == "none":
        lines += [
            "",
            "note: trained with loss=none (the control), so its streams never regressed their "
            "descriptors: the hallucinated row is what the extra heads give without hallucination.",
        ]
    return "\n".join(lines)


# R² of the label's best affine map to a stream's ground truth below which the
# report says the descriptor is mostly not about the classes (on the demo: IDT's
# BoW 0.19, the default set's visual descriptors under 0.05, audio 0.42-0.51).
LOW_LABEL_R2 = 0.1


def _quality_notes(report: dict) -> list[str]:
    """Plain-words reading of negative R²: a stream that predicts its targets worse
    than their mean hallucinates nothing, which the accuracy table alone hides (until
    2026-11-23 the demo's stream heads were dead behind a better-than-baseline accuracy)."""
    quality = report["quality"]
    unfit = [n for n in report["streams"] if quality["train"][n]["r2"] < 0]
    ungeneral = [n for n in report["streams"] if n not in unfit and quality["test"][n]["r2"] < 0]
    notes = []
    if unfit:
        notes.append(
            "note: worse than the mean on its own training clips (R2 train < 0), so it "
            f"hallucinates nothing: {', '.join(unfit)}"
        )
    if ungeneral:
        notes.append(
            "note: fits its training clips but not the test clips (R2 test < 0): "
            f"{', '.join(ungeneral)}; more training videos, or fewer streams, may help"
        )
    # Written by evaluations since 2026-11-24; older evaluation.json files lack it.
    nuisance = [n for n, r in report.get("label_r2", {}).items() if r < LOW_LABEL_R2]
    if nuisance:
        notes.append(
            f"note: under {LOW_LABEL_R2} of its test ground truth is explained by the label (R2 label), "
            f"so regressing it mostly teaches what varies within a class: {', '.join(nuisance)}"
        )
    return ["", *notes] if notes else []  # a blank line after the table, whichever note comes first


def _dotted(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}}`` as ``["a.b=1"]``: nested train.* keys back into command-line form."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else value
            out.append(f"{prefix}{key}={text}")
    return out


def _study_on_dask(cfg: StudyConfig, waves, study: Path, common: list[str], log, record) -> None:
    """Each run a dask task on the extraction's kind of cluster, results taken as they finish."""
    from distributed import as_completed

    from hallucinate.study import execute_on_worker
    from pipelines.orchestrate import ClusterOptions, open_client

    options = ClusterOptions(cfg.workers, cfg.scheduler, cfg.cluster, dict(cfg.jobqueue))
    with open_client(options) as client:
        for wave in waves:
            futures = {
                client.submit(
                    execute_on_worker,
                    run,
                    study,
                    common,
                    pure=False,
                    key=f"study-{run.group}-s{run.seed}-{os.getpid()}",
                ): run
                for run in wave
            }
            for future in as_completed(futures):
                run = futures[future]
                try:
                    ok, seconds, messages, where = future.result()
                except Exception as err:  # a worker lost (preempted job): the run resumes on the next study
                    ok, seconds, messages, where = (
                        False,
                        0.0,
                        [f"study: {run.directory(study).name}: {err}"],
                        "",
                    )
                for message in messages:
                    log(message)
                record(run, ok, seconds, where)


def cmd_study(cfg: StudyConfig) -> int:
    import json
    import time
    from concurrent.futures import ThreadPoolExecutor

    from hallucinate.study import (
        MAIN,
        execute,
        finished,
        parse_seeds,
        parse_variants,
        plan_runs,
        summary_table,
        update_readme,
        write_report,
    )

    variants = parse_variants(cfg.variants)
    seeds = parse_seeds(cfg.seeds)
    store = Path(cfg.features) if cfg.features else default_out(cfg.dataset)
    if not (store / "index.json").is_file():
        raise ConfigError(
            f"no feature store at {store}: a study trains on extracted descriptors; run "
            f"`hallucinate extract dataset={cfg.dataset}` first (or give features=...)"
        )
    study = Path(cfg.study) if cfg.study else Path("studies") / Path(cfg.dataset).stem
    study.mkdir(parents=True, exist_ok=True)
    on_dask = bool(cfg.scheduler) or cfg.cluster != "local"
    dataset, data_root = cfg.dataset, cfg.data_root
    if on_dask:  # a worker's working directory is not ours: every path absolute
        study, store, data_root = study.resolve(), store.resolve(), str(Path(data_root).resolve())
        dataset = str(Path(dataset).resolve()) if Path(dataset).is_file() else dataset
    common = [f"dataset={dataset}", f"data_root={data_root}", f"features={store}"]
    common += [f"definition.{k}" for k in _dotted(cfg.definition)]
    common += [f"video_root={cfg.video_root}"] if cfg.video_root else []
    common += _dotted(cfg.train)
    runs = plan_runs(variants, seeds)
    todo = [r for r in runs if not finished(r.directory(study))]
    print(
        f"study {study}: {len(variants)} variants x {len(seeds)} seeds = {len(runs)} runs, "
        f"{len(runs) - len(todo)} finished before, {len(todo)} to run, "
        + (f"as tasks on {cfg.scheduler or cfg.cluster}" if on_dask else f"{cfg.workers} at a time"),
        file=sys.stderr,
    )
    # Each run's seconds, kept across invocations: a study resumed or grown by a variant
    # reports every run's time, not only those of its last invocation.
    saved_timings = study / "timings.json"
    timings: dict[str, float] = json.loads(saved_timings.read_text()) if saved_timings.is_file() else {}
    failed: list[str] = []

    def log(text: str) -> None:
        print(text, file=sys.stderr)

    def record(run, ok: bool, seconds: float, where: str = "") -> None:
        name = run.directory(study).name
        timings[name] = seconds
        if ok:
            log(f"study: {name} done in {seconds:.0f} s" + (f" on {where}" if where else ""))
        else:
            failed.append(name)

    # main runs first: drop variants read their streams
    waves = [[r for r in todo if r.group == MAIN], [r for r in todo if r.group != MAIN]]
    started = time.perf_counter()
    if on_dask:
        _study_on_dask(cfg, waves, study, common, log, record)
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)

        def one(run) -> None:
            record(run, *execute(run, study, common, threads, log))

        with ThreadPoolExecutor(cfg.workers) as pool:
            for wave in waves:
                list(pool.map(one, wave))
    timings["study (wall, last invocation)"] = time.perf_counter() - started
    saved_timings.write_text(json.dumps(timings, indent=1))
    command = " ".join(
        ["hallucinate study", f"dataset={cfg.dataset}", f"features={store}", f"study={study}"]
        + [f"seeds={cfg.seeds}", "variants=" + ",".join(cfg.variants), f"workers={cfg.workers}"]
        + [f"train.{kv}" for kv in _dotted(cfg.train)]
    )
    report = write_report(study, variants, seeds, command, timings)
    for sentence in report["sentences"]:
        print(sentence)
    if cfg.readme:
        written = update_readme(Path(cfg.readme), study.name, summary_table(report))
        print(
            f"{cfg.readme}: the study:{study.name} table "
            + (
                "is updated"
                if written
                else f"is not there (no <!-- study:{study.name} --> block); left alone"
            ),
            file=sys.stderr,
        )
    print(f"report: {study / 'report.md'} (and report.json, seeds.png, quality.png, curves.png)")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; re-run the same command to resume them")
        return 1
    return 0


COMMANDS = {
    "extract": (ExtractConfig, cmd_extract, "run extractors over a dataset into HDF5 shards"),
    "inspect": (InspectConfig, cmd_inspect, "summarise a feature store and its failure ledger"),
    "extractors": (None, cmd_extractors, "list the registered extractors"),
    "repool": (RepoolConfig, cmd_repool, "pool stored ODF boxes again (other n', PN, RBF); no detector runs"),
    "fit-codebooks": (
        FitCodebooksConfig,
        cmd_fit_codebooks,
        "fit the IDT codebooks (PCA, GMM, k-means) on sampled training videos",
    ),
    "train": (TrainConfig, cmd_train, "train the hallucination model and its RGB-only baseline"),
    "evaluate": (EvaluateConfig, cmd_evaluate, "evaluate RGB-only, hallucinated and oracle protocols"),
    "study": (StudyConfig, cmd_study, "train and evaluate seeds x variants, then report the statistics"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hallucinate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML file; key=value overrides win over it")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cls, func, _ = COMMANDS[args.command]
    try:
        cfg = build_config(cls, args.config, args.overrides) if cls else None
        return func(cfg)
    except HallucinateError as exc:
        print(f"hallucinate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
