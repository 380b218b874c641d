"""Dataset definitions (``data/*.yaml``) and parsers for the official annotation formats.

A definition names an annotation *format*; each format is one registered
parser, so supporting a new dataset layout is one function, never a branch
on dataset names. Parsers return plain ``VideoRecord``s; whether a video file
really exists is checked when it is decoded, so one missing download becomes
one ledger entry instead of a failed run.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import build_config
from pipelines.errors import ConfigError, DatasetError
from pipelines.registry import Registry

DEFINITIONS_DIR = Path(__file__).resolve().parents[1] / "data"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


@dataclass
class DatasetDef:
    """One ``data/<name>.yaml``. Paths are relative to the dataset ``root``."""

    name: str = ""
    format: str = ""
    description: str = ""
    root: str = ""  # relative to data_root unless absolute
    videos: str = "videos"
    annotations: str = "annotations"
    files: dict[str, str] = field(default_factory=dict)  # role -> file under annotations/
    video_template: str = "{id}.mp4"
    multilabel: bool = False
    num_classes: int | None = None
    split_number: int = 1  # the official split for UCF101 / HMDB51 (1..3)
    generator: str | None = None  # "module:function" that makes the dataset when missing (the demo)
    val_fraction: float = 0.2  # folder format: share of each class held out per split
    test_fraction: float = 0.2
    split_seed: int = 0  # folder format: the seed of the stratified draw
    splits: str | None = None  # folder format: a CSV (path,split) that fixes every video's split


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    path: str
    labels: tuple[int, ...]
    split: str


@dataclass
class Dataset:
    name: str
    classes: list[str]
    records: list[VideoRecord]
    multilabel: bool
    video_root: Path
    annotation_root: Path

    def split(self, name: str) -> list[VideoRecord]:
        return [r for r in self.records if r.split == name]


@dataclass(frozen=True)
class DatasetPaths:
    root: Path
    videos: Path
    annotations: Path

    def annotation(self, defn: DatasetDef, role: str) -> Path:
        if role not in defn.files:
            raise DatasetError(
                f"dataset {defn.name!r}: its definition has no files.{role} entry, which the "
                f"{defn.format!r} format needs"
            )
        path = self.annotations / defn.files[role]
        if not path.is_file():
            raise DatasetError(
                f"dataset {defn.name!r}: annotation file {path} not found. Download the "
                f"official annotations there, or point annotation_root=... at their folder."
            )
        return path


Parser = Callable[[DatasetDef, DatasetPaths], tuple[list[str], list[VideoRecord]]]
FORMATS: Registry[Parser] = Registry("annotation format")


def known_datasets() -> list[str]:
    return sorted(p.stem for p in DEFINITIONS_DIR.glob("*.yaml"))


def load_definition(name_or_path: str, overrides: dict[str, Any] | None = None) -> DatasetDef:
    """A dataset by name (``data/<name>.yaml``) or by the path of a user's own YAML.

    ``overrides`` replace fields of the definition (``definition.split_number=2``
    on the command line), validated like the file itself.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = DEFINITIONS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown dataset {name_or_path!r}. Known datasets: {', '.join(known_datasets())}; "
            "or pass the path of your own definition (copy data/folder.yaml)."
        )
    dotlist = [f"{k}={v}" for k, v in (overrides or {}).items()]
    defn = build_config(DatasetDef, path, dotlist, where=f"dataset {path.name}")
    if not defn.name:
        defn.name = path.stem
    return defn


def resolve_paths(
    defn: DatasetDef,
    data_root: str | Path,
    video_root: str | Path | None = None,
    annotation_root: str | Path | None = None,
) -> DatasetPaths:
    root = Path(data_root) / defn.root if not os.path.isabs(defn.root) else Path(defn.root)
    return DatasetPaths(
        root=root,
        videos=Path(video_root) if video_root else root / defn.videos,
        annotations=Path(annotation_root) if annotation_root else root / defn.annotations,
    )


def check_video_root(defn: DatasetDef, paths: DatasetPaths) -> None:
    if not paths.videos.is_dir():
        raise DatasetError(
            f"video root {paths.videos} for dataset {defn.name!r} does not exist. Put the "
            f"videos there, or set it: `make extract DATASET={defn.name} VIDEO_ROOT=/path/to/videos` "
            f"(`hallucinate extract dataset={defn.name} video_root=...`), or move the whole "
            "dataset under DATA_ROOT (data_root=..., default ./datasets)."
        )


def load_dataset(defn: DatasetDef, paths: DatasetPaths) -> Dataset:
    check_video_root(defn, paths)
    classes, records = FORMATS.get(defn.format)(defn, paths)
    if defn.num_classes is not None and len(classes) != defn.num_classes:
        raise DatasetError(
            f"dataset {defn.name!r}: the annotations in {paths.annotations} define "
            f"{len(classes)} classes, the definition expects {defn.num_classes}"
        )
    ids = [r.video_id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"dataset {defn.name!r}: video id {dup!r} appears twice")
    return Dataset(defn.name, classes, records, defn.multilabel, paths.videos, paths.annotations)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _normalise_split(split: str) -> str:
    return {"validate": "val", "validation": "val", "training": "train", "testing": "test"}.get(
        split.lower(), split.lower()
    )


@FORMATS.register("kinetics_csv")
def parse_kinetics(defn: DatasetDef, paths: DatasetPaths):
    """Kinetics-400/600/700 CSV: label, youtube_id, time_start, time_end, split[, is_cc]."""
    tables = {role: _read_csv(paths.annotation(defn, role)) for role in defn.files}
    classes = sorted({row["label"] for rows in tables.values() for row in rows if row.get("label")})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for role, rows in tables.items():
        for row in rows:
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                split = _normalise_split(row.get("split") or role)
                vid = f"{row['youtube_id']}_{start:06d}_{end:06d}"
                fields = dict(row, id=vid, split=split, time_start=start, time_end=end)
                rel = defn.video_template.format(**fields)
            except (KeyError, ValueError) as exc:
                raise DatasetError(
                    f"{paths.annotation(defn, role)}: row {row} is not Kinetics CSV "
                    f"(label,youtube_id,time_start,time_end,split): {exc}"
                ) from None
            label = (index[row["label"]],) if row.get("label") else ()
            records.append(VideoRecord(vid, str(paths.videos / rel), label, split))
    return classes, records


@FORMATS.register("ssv2_json")
def parse_ssv2(defn: DatasetDef, paths: DatasetPaths):
    """Something-Something V2: a labels JSON plus train/validation/test lists."""
    labels = json.loads(paths.annotation(defn, "labels").read_text())
    classes = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    records = []
    for role in [r for r in defn.files if r != "labels"]:
        for item in json.loads(paths.annotation(defn, role).read_text()):
            label = ()
            if "template" in item:
                name = item["template"].replace("[", "").replace("]", "")
                if name not in labels:
                    raise DatasetError(
                        f"{paths.annotation(defn, role)}: template {name!r} of video "
                        f"{item['id']} is not in {defn.files['labels']}"
                    )
                label = (int(labels[name]),)
            rel = defn.video_template.format(id=item["id"])
            records.append(
                VideoRecord(str(item["id"]), str(paths.videos / rel), label, _normalise_split(role))
            )
    return classes, records


@FORMATS.register("ucf101_splits")
def parse_ucf101(defn: DatasetDef, paths: DatasetPaths):
    """UCF101: classInd.txt, trainlist0N.txt ("Class/v_x.avi 1") and testlist0N.txt."""
    classes = [
        line.split()[1] for line in paths.annotation(defn, "classes").read_text().split("\n") if line.strip()
    ]
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for split in ("train", "test"):
        role = f"{split}{defn.split_number}"
        for line in paths.annotation(defn, role).read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in index:
                raise DatasetError(f"{paths.annotation(defn, role)}: class {cls!r} not in classInd")
            records.append(VideoRecord(Path(rel).stem, str(paths.videos / rel), (index[cls],), split))
    return classes, records


@FORMATS.register("hmdb51_splits")
def parse_hmdb51(defn: DatasetDef, paths: DatasetPaths):
    """HMDB51: ``<class>_test_split<N>.txt`` lines "video.avi 1|2|0" (train/test/unused)."""
    split_dir = paths.annotations / defn.files.get("splits", "")
    pattern = f"*_test_split{defn.split_number}.txt"
    files = sorted(split_dir.glob(pattern))
    if not files:
        raise DatasetError(
            f"dataset {defn.name!r}: no {pattern} files in {split_dir}. Unpack "
            "test_train_splits.rar there, or point annotation_root=... at it."
        )
    suffix = f"_test_split{defn.split_number}"
    classes = sorted(f.stem[: -len(suffix)] for f in files)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for f in files:
        cls = f.stem[: -len(suffix)]
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2 or parts[1] == "0":
                continue
            split = {"1": "train", "2": "test"}.get(parts[1])
            if split is None:
                raise DatasetError(f"{f}: line {line!r} must end in 0, 1 or 2")
            records.append(
                VideoRecord(Path(parts[0]).stem, str(paths.videos / cls / parts[0]), (index[cls],), split)
            )
    return classes, records


@FORMATS.register("charades_csv")
def parse_charades(defn: DatasetDef, paths: DatasetPaths):
    """Charades: ``actions`` is "c092 11.90 21.20;c147 0.00 12.60" (multi-label)."""
    lines = paths.annotation(defn, "classes").read_text().splitlines()
    codes = [line.split(" ", 1) for line in lines if line.strip()]
    classes = [name for _, name in codes]
    index = {code: i for i, (code, _) in enumerate(codes)}
    records = []
    for role in ("train", "test"):
        for row in _read_csv(paths.annotation(defn, role)):
            labels = set()
            for action in filter(None, (row.get("actions") or "").split(";")):
                code = action.split()[0]
                if code not in index:
                    raise DatasetError(
                        f"{paths.annotation(defn, role)}: unknown action {code!r} in video {row['id']}"
                    )
                labels.add(index[code])
            rel = defn.video_template.format(id=row["id"])
            records.append(VideoRecord(row["id"], str(paths.videos / rel), tuple(sorted(labels)), role))
    return classes, records


@FORMATS.register("manifest_csv")
def parse_manifest(defn: DatasetDef, paths: DatasetPaths):
    """A CSV with video_id, path (relative to the dataset root), label (";"-separated), split."""
    manifest = paths.annotation(defn, "manifest")
    rows = _read_csv(manifest)
    if "classes" in defn.files:
        classes = [c for c in paths.annotation(defn, "classes").read_text().splitlines() if c.strip()]
    else:
        classes = sorted({lab for r in rows for lab in r["label"].split(";") if lab})
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for row in rows:
        try:
            labels = tuple(index[lab] for lab in row["label"].split(";") if lab)
            vid = row.get("video_id") or Path(row["path"]).stem
            records.append(VideoRecord(vid, str(paths.root / row["path"]), labels, row["split"]))
        except KeyError as exc:
            raise DatasetError(f"{manifest}: row {row} has no or an unknown {exc}") from None
    return classes, records


@FORMATS.register("folder")
def parse_folder(defn: DatasetDef, paths: DatasetPaths):
    """Users' own data: ``videos/<class>/<video>``, split as ``splits`` says or stratified.

    Stratified, because a hash of file names (the rule before 2026-12)
    gave one class of a real 283-clip set 3 validation clips, and its
    best-epoch choice was noise: each class now sends its own share to val
    and test (at least one each from 3 videos up), drawn with
    ``split_seed``. A ``splits`` CSV fixes them instead (a published split,
    or one kept across runs).
    """
    classes = sorted(p.name for p in paths.videos.iterdir() if p.is_dir())
    videos = {
        cls: [v for v in sorted((paths.videos / cls).iterdir()) if v.suffix.lower() in VIDEO_EXTENSIONS]
        for cls in classes
    }
    fixed = _split_file(defn, paths, videos) if defn.splits else None
    rng = np.random.default_rng(defn.split_seed)
    records = []
    for i, cls in enumerate(classes):
        if fixed is not None:
            splits = [fixed[v] for v in videos[cls]]
        else:
            splits = _stratum(len(videos[cls]), defn.val_fraction, defn.test_fraction, rng)
        records += [
            VideoRecord(v.stem, str(v), (i,), split) for v, split in zip(videos[cls], splits, strict=True)
        ]
    return classes, records


def _stratum(n: int, val: float, test: float, rng: np.random.Generator) -> list[str]:
    """Splits of one class's ``n`` videos, in a seeded random order: round(n·share) each,
    and at least one val and one test video once there are three."""

    def count(share: float) -> int:
        return max(round(n * share), 1 if share > 0 and n >= 3 else 0)

    n_test, n_val = count(test), count(val)
    n_val = min(n_val, max(n - n_test - 1, 0))
    labels = ["test"] * n_test + ["val"] * n_val
    labels += ["train"] * (n - len(labels))
    return [labels[k] for k in rng.permutation(n)]


SPLIT_NAMES = ("train", "val", "test")


def _split_file(defn: DatasetDef, paths: DatasetPaths, videos: dict[str, list[Path]]) -> dict[Path, str]:
    """Each video's split from ``defn.splits`` (columns path,split; a path relative to the
    video folder, the dataset root, or absolute). Every video must be listed, and every
    listed path must exist: a split that silently drops or invents videos is worse than none."""
    file = Path(defn.splits)
    if not file.is_absolute():
        file = paths.root / file
    if not file.is_file():
        raise DatasetError(f"dataset {defn.name!r}: splits file {file} not found (splits: path,split)")
    rows = _read_csv(file)
    if rows and not {"path", "split"} <= set(rows[0]):
        raise DatasetError(f"{file}: needs the columns path,split; it has {', '.join(rows[0])}")
    fixed: dict[Path, str] = {}
    for row in rows:
        given = Path(row["path"])
        split = _normalise_split(row["split"])
        if split not in SPLIT_NAMES:
            raise DatasetError(f"{file}: split {row['split']!r} of {given} is not train, val or test")
        candidates = [given] if given.is_absolute() else [paths.videos / given, paths.root / given]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetError(f"{file}: {given} is not a file under {paths.videos} or {paths.root}")
        fixed[found.resolve()] = split
    listed = {v: fixed.get(v.resolve()) for vs in videos.values() for v in vs}
    missing = [str(v.relative_to(paths.videos)) for v, split in listed.items() if split is None]
    if missing:
        raise DatasetError(
            f"{file} gives no split for {len(missing)} video(s) under {paths.videos}, e.g. "
            f"{', '.join(missing[:3])}: add a row for each, or move them out of the folder"
        )
    return {v: split for v, split in listed.items()}


def split_counts(classes: list[str], records: list[VideoRecord]) -> str:
    """A class x split table of ``records``, and a warning line for each class that a
    held-out split lacks. Printed by extract and train before any work, since a split
    with no video of a class makes the validation accuracy (and so the best epoch)
    blind to it. Past 20 classes, only the spread per split is shown."""
    splits = [s for s in (*SPLIT_NAMES, *sorted({r.split for r in records} - set(SPLIT_NAMES)))]
    table = {s: [0] * len(classes) for s in splits}
    for r in records:
        for label in r.labels:
            table[r.split][label] += 1
    present = [s for s in splits if sum(table[s])]
    if len(classes) <= 20:
        width = max(12, *(len(c) + 2 for c in classes))
        lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in present)]
        lines += [
            f"{c:<{width}}" + "".join(f"{table[s][i]:>8}" for s in present) for i, c in enumerate(classes)
        ]
    else:
        lines = [f"{'split':<8}{'videos':>8}{'classes':>9}{'min/class':>11}{'max/class':>11}"]
        for s in present:
            counts = table[s]
            lines.append(
                f"{s:<8}{sum(counts):>8}{sum(1 for c in counts if c):>9}{min(counts):>11}{max(counts):>11}"
            )
    for s in present:
        if s != "train" and 0 in table[s]:
            empty = [c for c, n in zip(classes, table[s], strict=True) if not n]
            lines.append(
                f"warning: {s} has no video of {len(empty)} class(es): {', '.join(empty[:5])}"
                + (" ..." if len(empty) > 5 else "")
            )
    return "\n".join(lines)
