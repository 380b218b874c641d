"""Clips and ground-truth descriptors for training and evaluation.

A sample is an RGB clip (3, T, S, S) in [-1, 1] (random crop and flip when
training, centre crop at test, METHOD.md §5.2), its label, and for each
stream the cached descriptor plus a mask bit that is False when the store
holds no such descriptor for the video (flagged no_audio, failed, missing).

Descriptors stored with running sums over frames (IDT's BoW and Fisher
vectors, Prop. 1) are pooled over the frames of the sampled clip only, so
the target describes what the network sees rather than the whole video.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from extractors.base import FrameSpec
from extractors.codebooks import FINISHERS, pool_frames
from hallucinate.model import StreamSpec
from pipelines.datasets import VideoRecord
from pipelines.decode import iter_frames, read_clip
from pipelines.errors import DatasetError, HallucinateError, VideoError
from pipelines.store import DONE, TIMESTAMPS, ShardIndex, ShardReader, read_shard, shard_path


@dataclass(frozen=True)
class ClipSpec:
    frames: int = 16  # clip length T (the paper: 64 with I3D; fewer for the tiny backbone)
    size: int = 64  # crop size S
    short_side: int = 72  # frames are resized to this before cropping
    fps: float | None = None  # None: the video's own rate
    # Frozen-backbone mode: read X_rgb (clips, C, T′) stored as this descriptor
    # (e.g. "rgb.features/x_rgb") instead of decoding video.
    features: str | None = None


@dataclass
class GroundTruthScan:
    """What a store holds to train streams on for some videos: every finished,
    unflagged result, read in one pass over their shards (metadata only), which
    on a large dataset is most of the start-up time of ``hallucinate train``."""

    dims: dict[str, set[tuple[int, ...]]]  # "<extractor>/<output>" -> the shapes stored
    hashes: dict[str, set[str]]  # extractor -> "v<version>:<config hash>" of its results
    # Extractor -> how many of the videos have ground truth. A stream whose extractor
    # found nothing on most videos (the HOG person detector on the demo's shapes: boxes
    # on 12 of 480 videos) trains its head on a handful of clips, which it can only
    # memorise: the masks keep absent ground truth from training it, but not from
    # leaving it nearly untrained.
    coverage: dict[str, int]
    # Extractor -> why the other videos have none: a flag's name (no_audio) or the
    # status (failed) -> how many. What names a stream that no video has ground truth
    # for, which would otherwise just not be there (no audio anywhere).
    absent: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def without_ground_truth(self) -> dict[str, Counter]:
        """Extractors in the store with ground truth on none of the videos, and why."""
        return {name: reasons for name, reasons in self.absent.items() if not self.coverage.get(name)}


def scan_ground_truth(store: str | Path, video_ids: list[str]) -> GroundTruthScan:
    scan = GroundTruthScan(defaultdict(set), defaultdict(set), defaultdict(int))
    where = ShardIndex.load(store).video_to_shard()
    ids = set(video_ids)
    for shard in sorted({where[v] for v in ids if v in where}):
        entries, _ = read_shard(shard_path(store, shard))
        for (vid, extractor), entry in entries.items():
            if vid not in ids:
                continue
            if entry.status != DONE or entry.flags:
                scan.absent[extractor].update(list(entry.flags) or [entry.status])
                continue
            scan.coverage[extractor] += 1
            scan.hashes[extractor].add(f"v{entry.attrs.get('version')}:{entry.config_hash}")
            for output, shape in entry.shapes.items():
                if output != TIMESTAMPS:
                    scan.dims[f"{extractor}/{output}"].add(shape)
    return scan


def sparse_streams(
    streams: list[StreamSpec], coverage: dict[str, int], n_videos: int, min_coverage: float
) -> dict[str, int]:
    """The streams whose extractor has ground truth on fewer than ``min_coverage``
    of ``n_videos`` (``GroundTruthScan.coverage``), with their counts."""
    counts = {s.name: coverage.get(s.name.rpartition("/")[0], 0) for s in streams}
    return {name: n for name, n in counts.items() if n < min_coverage * n_videos}


def discover_streams(
    store: str | Path,
    video_ids: list[str],
    wanted: list[str] | None = None,
    scan: GroundTruthScan | None = None,
) -> list[StreamSpec]:
    """One stream per fixed-size 1-D descriptor found in the store for these videos
    (``scan``: the store already scanned for them, so it is not read again).

    Refuses to mix provenance: every result of an extractor used for a stream
    must carry the same version and config hash, since descriptors computed
    with different settings are not the same target.
    """
    if scan is None:
        scan = scan_ground_truth(store, video_ids)
    dims, hashes = scan.dims, scan.hashes
    streams = []
    for name in sorted(dims):
        extractor = name.rsplit("/", 1)[0]
        if wanted is not None and name not in wanted and extractor not in wanted:
            continue
        if len(hashes[extractor]) > 1:
            raise DatasetError(
                f"{store}: results of {extractor} were made with different settings "
                f"({', '.join(sorted(hashes[extractor]))}); re-run `hallucinate extract` with one "
                "config so every video has the same descriptor"
            )
        shapes = dims[name]
        if len(shapes) == 1 and len(next(iter(shapes))) == 1:
            streams.append(StreamSpec(name, next(iter(shapes))[0]))
    if wanted is not None:
        found = {s.name for s in streams} | {s.name.rsplit("/", 1)[0] for s in streams}
        missing = [w for w in wanted if w not in found]
        if missing:
            raise DatasetError(f"{store}: no fixed-size descriptor {missing} for these videos")
    return streams


def sample_records(records: list[VideoRecord], max_videos: int, seed: int) -> list[VideoRecord]:
    """At most ``max_videos`` of ``records``, kept in order: all of them when there
    are fewer, else a seeded random sample, not the first ones, because annotation
    files are often sorted by class (Kinetics' CSVs are) and the first 2,000 of
    240,000 training videos would hold 4 of 400 classes."""
    if len(records) <= max_videos:
        return list(records)
    picked = np.random.default_rng(seed).choice(len(records), max_videos, replace=False)
    return [records[i] for i in np.sort(picked)]


def decode_video(record: VideoRecord, spec: FrameSpec) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, H, W, 3) of a whole video at ``spec``, and their times in seconds."""
    batches = list(iter_frames(record.path, spec))
    return np.concatenate([b.frames for b in batches]), np.concatenate([b.timestamps for b in batches])


@dataclass(frozen=True)
class PreloadPlan:
    preload: bool
    reason: str  # one line for the log: the estimate and what to set to override it


def plan_preload(
    records: list[VideoRecord], spec: ClipSpec, available: int, share: float = 0.25, probe: int = 3
) -> PreloadPlan:
    """Whether every video of a run, decoded at the clip's short side, fits in ``share`` of
    ``available`` bytes of memory, estimated from the first videos that decode.

    Why an estimate and not a count: preloading is what makes the demo train
    in minutes, but a set of a few thousand full-length videos at a 256
    short side takes hundreds of gigabytes, and the run would die of memory
    after hours of decoding instead of streaming from the start.
    """
    frame_spec = FrameSpec(fps=spec.fps, short_side=spec.short_side)
    sizes = []
    for record in records[:probe]:
        try:
            frames, times = decode_video(record, frame_spec)
        except (HallucinateError, OSError):  # named again, with its fix, when the run reaches it
            continue
        sizes.append(frames.nbytes + times.nbytes)
    if not sizes:
        return PreloadPlan(False, f"preload=auto: none of the first {probe} videos can be read; streaming")
    need = sum(sizes) / len(sizes) * len(records)
    gb = f"about {need / 1e9:.1f} GB for {len(records)} videos, {available / 1e9:.1f} GB available"
    if need <= share * available:
        return PreloadPlan(
            True, f"preload=auto: holding the videos' frames in memory ({gb}; preload=false streams)"
        )
    return PreloadPlan(
        False,
        f"preload=auto: streaming, the videos' frames would not fit in memory ({gb}; preload=true forces it)",
    )


class ClipDataset(Dataset):
    """Clips of ``records`` with their streams' ground truth from ``store``.

    ``preload`` decodes every video once, at the sampled size, into memory:
    right for small sets such as the demo; otherwise each item is decoded on
    the fly (streaming, inside DataLoader workers).
    """

    def __init__(
        self,
        records: list[VideoRecord],
        num_classes: int,
        spec: ClipSpec,
        train: bool,
        store: str | Path | None = None,
        streams: list[StreamSpec] = (),
        multilabel: bool = False,
        preload: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.records, self.num_classes, self.spec = list(records), num_classes, spec
        self.train, self.multilabel, self.streams = train, multilabel, list(streams)
        wants_store = self.streams or spec.features
        self.reader = ShardReader(store) if store is not None and wants_store else None
        if spec.features and self.reader is None:
            raise DatasetError(f"frozen-backbone mode reads {spec.features} from a feature store; none given")
        self.reseed(seed)
        self.frame_spec = FrameSpec(fps=spec.fps, short_side=spec.short_side)
        self.frames: list[tuple[np.ndarray, np.ndarray]] | None = None
        # Training videos left out because they cannot be decoded: video id -> the error,
        # which names the file and the fix. One corrupt download in 240,000 must not stop
        # a run; a test or validation set is never changed behind the user's back, so
        # there the error stands.
        self.unreadable: dict[str, str] = {}
        # Preloaded videos with fewer than spec.frames frames, whose clips loop (see _clip);
        # None when streamed, where the trainer counts the looped clips as they come.
        self.short_videos: int | None = None
        if preload and not spec.features:
            bar = tqdm(self.records, desc="decode", unit="video", disable=not progress)
            decoded = {}
            for record in bar:
                try:
                    decoded[record.video_id] = self._decode(record)
                except VideoError as err:
                    if not train:
                        raise
                    self.unreadable[record.video_id] = str(err)
            self.records = [r for r in self.records if r.video_id in decoded]
            self.frames = [decoded[r.video_id] for r in self.records]
            self.short_videos = sum(len(frames) < spec.frames for frames, _ in self.frames)
            if not self.records:
                raise DatasetError(f"no video of this split can be decoded: {self.first_unreadable()}")

    def reseed(self, seed: int) -> None:
        """Restarts the clip sampler (random start, crop, flip) from ``seed``.

        For items read by index (``ds[i]``, a loader without ``SeededOrder``,
        each of whose workers is reseeded). Training's shuffled loader seeds
        every clip from its own draw instead, so a run's clips depend on its
        seed alone, not on what another run drew from the same dataset first.
        """
        self.rng = np.random.default_rng(seed)

    def _decode(self, record: VideoRecord) -> tuple[np.ndarray, np.ndarray]:
        return decode_video(record, self.frame_spec)

    def _start(self, n: int) -> int:
        """First frame of a clip from a video of ``n`` frames: random when training, else centred."""
        t = self.spec.frames
        return int(self.rng.integers(0, max(1, n - t + 1))) if self.train else max(0, (n - t) // 2)

    def _read_clip(self, record: VideoRecord) -> tuple[np.ndarray, np.ndarray]:
        """Streaming: the clip's frames only when the container can place them, else
        the whole video. ``_clip`` then draws no other start (one clip-length
        video has one), so a clip is the one preloading would give for the seed."""
        batch = read_clip(record.path, self.frame_spec, self.spec.frames, self._start)
        return (batch.frames, batch.timestamps) if batch is not None else self._decode(record)

    def __len__(self) -> int:
        return len(self.records)

    def _clip(self, frames: np.ndarray, times: np.ndarray) -> tuple[torch.Tensor, tuple[float, float], bool]:
        """A clip, the time span (first, last frame, seconds) it covers, and whether it looped.

        A video with fewer than T frames at the sampled rate is looped: the
        clip starts again from its first frame after the last, as
        MMAction2's SampleFrames does with ``out_of_bound_opt="loop"``.
        The motion jumps at each wrap, so the trainer counts such clips
        (``looped`` in each item) and says how many there were.
        """
        t, s = self.spec.frames, self.spec.size
        n, h, w = frames.shape[:3]
        start = self._start(n)
        idx = (start + np.arange(t)) % n
        span = (float(times[idx].min()), float(times[idx].max()))
        y0, x0 = (
            (self.rng.integers(0, h - s + 1), self.rng.integers(0, w - s + 1))
            if self.train
            else ((h - s) // 2, (w - s) // 2)
        )
        clip = frames[idx, y0 : y0 + s, x0 : x0 + s]
        if self.train and self.rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        clip = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float()
        return clip / 127.5 - 1.0, span, n < t

    def label(self, record: VideoRecord) -> torch.Tensor:
        if self.multilabel:
            target = torch.zeros(self.num_classes)
            target[list(record.labels)] = 1.0
            return target
        return torch.tensor(record.labels[0] if record.labels else -1)

    def _pooled(
        self, video_id: str, stream: str, span: tuple[float, float], shared: dict
    ) -> np.ndarray | None:
        """Prop. 1: the stream's descriptor over the frames in ``span`` when running sums are stored.

        ``shared`` holds, per extractor, the arrays its streams have in
        common (knots, counts, frame times), so they are read once a clip.
        """
        extractor, _, output = stream.rpartition("/")
        if output not in FINISHERS:
            return None
        try:
            if extractor not in shared:
                shared[extractor] = {
                    k: self.reader.get(video_id, f"{extractor}/{k}")
                    for k in ("knot_frames", "count_cum", TIMESTAMPS)
                }
            cum = {**shared[extractor], f"{output}_cum": self.reader.get(video_id, f"{stream}_cum")}
        except KeyError:  # stored without running sums (cumulative=false)
            return None
        times = cum[TIMESTAMPS]
        first = int(np.searchsorted(times, span[0] - 1e-6, side="left"))
        last = int(np.searchsorted(times, span[1] + 1e-6, side="right")) - 1
        return pool_frames(cum, output, first, max(last, first))

    def ground_truth(
        self, record: VideoRecord, span: tuple[float, float] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each stream's target for the video, or for the frames in ``span`` (seconds) where poolable."""
        gt, mask = {}, torch.zeros(len(self.streams), dtype=torch.bool)
        shared: dict = {}
        for i, stream in enumerate(self.streams):
            extractor = stream.name.rpartition("/")[0]
            try:
                if self.reader.flags(record.video_id, extractor):  # e.g. the zero ODF of a box-less video
                    raise KeyError(stream.name)
                value = self._pooled(record.video_id, stream.name, span, shared) if span is not None else None
                if value is None:
                    value = self.reader.get(record.video_id, stream.name)
                gt[stream.name] = torch.from_numpy(value.astype(np.float32).reshape(-1))
                mask[i] = True
            except KeyError:  # flagged (no audio, no boxes), failed or not extracted
                gt[stream.name] = torch.zeros(stream.dim)
        return gt, mask

    def _streamed(self, i: int) -> tuple[VideoRecord, tuple[torch.Tensor, tuple[float, float], bool]]:
        """Item ``i``'s record and clip, read from disk. A training video that turns
        out bad mid-epoch is named, and the next readable one is used in its place
        rather than losing the epoch."""
        for k in range(len(self)):
            record = self.records[(i + k) % len(self)]
            try:
                return record, self._clip(*self._read_clip(record))
            except VideoError as err:
                if not self.train:
                    raise
                if record.video_id not in self.unreadable:
                    self.unreadable[record.video_id] = str(err)
                    print(f"warning: {err} Training on another video in its place.", file=sys.stderr)
        raise DatasetError(f"no video of this split can be decoded: {self.first_unreadable()}")

    def first_unreadable(self) -> str:
        """The error of the first video left out, for a message."""
        return next(iter(self.unreadable.values()), "none tried")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item ``key``, or ``(index, draw)`` from ``SeededOrder``: the clip's random start,
        crop and flip then come from ``draw``, whichever loader worker reads it."""
        i = key
        if isinstance(key, tuple):
            i, draw = key
            self.rng = np.random.default_rng(draw)
        record = self.records[i]
        span, looped = None, False
        if self.spec.features:  # X_rgb of a frozen backbone: one stored clip, random when training
            x_rgb = self.reader.get(record.video_id, self.spec.features)
            k = self.rng.integers(len(x_rgb)) if self.train else len(x_rgb) // 2
            clip = torch.from_numpy(np.ascontiguousarray(x_rgb[k], dtype=np.float32))
        elif self.frames is not None:
            clip, span, looped = self._clip(*self.frames[i])
        else:
            record, (clip, span, looped) = self._streamed(i)
        gt, mask = self.ground_truth(record, span if self.streams else None)
        return {
            "clip": clip,
            "label": self.label(record),
            "gt": gt,
            "mask": mask,
            "index": i,
            "looped": looped,
        }
