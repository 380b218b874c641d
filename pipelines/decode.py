"""Streaming decode with PyAV.

Frames are sampled to the requested fps and size while decoding, so memory
holds one chunk, never the whole video. Every way a file can be unusable
(missing, empty, corrupt, truncated, no video stream) becomes a
``VideoError`` that names the file, so the orchestrator can record it in the
ledger and move on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from extractors.base import AudioSpec, AudioTrack, FrameBatch, FrameSpec
from pipelines.errors import (
    CorruptVideoError,
    CutShortError,
    EmptyVideoError,
    MissingVideoError,
    NoVideoStreamError,
    TruncatedVideoError,
    VideoError,
)

# A stream that stops before this share of its declared duration is truncated.
# Containers often declare a few frames more than they hold, hence the slack.
TRUNCATION_TOLERANCE = 0.9


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    duration: float | None  # seconds, as declared by the container
    has_audio: bool


def _open(path: str) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise MissingVideoError(path)
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(path)
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise _decode_error(path, str(exc)) from None


def cut_short(path: str) -> CutShortError | None:
    """The error for an ISO-BMFF file (MP4, MOV, M4A) whose last top-level box runs past its end.

    Why: FFmpeg reports a cut-short download as "Invalid data found" (its
    "moov atom not found" goes to its log, not the exception), the same
    words as random bytes, so the user would re-encode what must be
    re-downloaded. Each box header declares its size, so reading the
    top-level headers (a few seeks) tells a truncated file for certain.
    """
    size = os.path.getsize(path)
    boxes: list[str] = []
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= size:
            fh.seek(offset)
            head = fh.read(16)
            length, box = int.from_bytes(head[:4], "big"), head[4:8].decode("latin-1")
            if not box.isprintable() or (not boxes and box != "ftyp"):
                return None  # not ISO-BMFF
            boxes.append(box)
            if length == 1 and len(head) == 16:  # a 64-bit size follows
                length = int.from_bytes(head[8:16], "big")
            if length == 0:  # "to the end of the file"
                break
            if length < 8:
                return None
            if offset + length > size:
                return CutShortError(path, box, size, offset + length, index="moov" in boxes)
            offset += length
    return None


def _decode_error(path: str, detail: str) -> VideoError:
    """A decode failure, named as truncation when the file is cut short, else as corrupt."""
    return cut_short(path) or CorruptVideoError(path, detail)


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The first video stream, set to decode on all cores; none is a NoVideoStreamError."""
    if not container.streams.video:
        raise NoVideoStreamError(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _start_seconds(stream: av.stream.Stream) -> float:
    """When the stream's first frame is presented, in seconds (0 where the container says nothing)."""
    return float(stream.start_time * stream.time_base) if stream.start_time else 0.0


def _duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe(path: str | Path) -> VideoInfo:
    """Reads the header only; cheap enough to call on every video of a dataset."""
    path = str(path)
    with _open(path) as container:
        if not container.streams.video:
            raise NoVideoStreamError(path)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoInfo(
            path=path,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(rate),
            duration=_duration(container, stream),
            has_audio=bool(container.streams.audio),
        )


def output_size(spec: FrameSpec, width: int, height: int) -> tuple[int, int]:
    """(width, height) after resizing; sizes are kept even for chroma-subsampled codecs."""
    if spec.size is not None:
        return spec.size
    short = spec.short_side
    if short is None and spec.max_short_side is not None and min(width, height) > spec.max_short_side:
        short = spec.max_short_side
    if short is not None:
        scale = short / min(width, height)
        return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
    return width, height


@dataclass
class _RateSampler:
    """Which decoded frames a sampling at ``fps`` keeps: the first at or after
    each target time, so frames are dropped to reach the rate but never
    duplicated; every frame when ``step`` is 0 (the native rate).

    One rule for ``iter_frames`` and ``read_clip``, because a streamed clip
    must hold the frames that decoding the whole video and slicing holds.
    ``next_time`` None starts the targets at the first frame offered;
    ``read_clip`` sets it to its clip's start, which also drops the frames
    between the keyframe it seeks to and the clip.
    """

    step: float  # 1 / fps, or 0 for every frame
    next_time: float | None = None

    def keep(self, t: float) -> bool:
        if self.next_time is None:
            if not self.step:
                return True
            self.next_time = t
        if t + 1e-6 < self.next_time:
            return False
        while self.step and self.next_time <= t + 1e-6:
            self.next_time += self.step
        return True


def iter_frames(path: str | Path, spec: FrameSpec, chunk: int = 32) -> Iterator[FrameBatch]:
    """Yields RGB frames sampled at ``spec`` in chunks of at most ``chunk``.

    Sampling keeps the first frame at or after each target time k/fps, so
    frames are dropped to reach the rate but never duplicated. Resizing is
    done by swscale on the kept frames only.
    """
    for _, batch in decode_samplings(path, [spec], chunk):
        yield batch


def decode_samplings(
    path: str | Path, specs: list[FrameSpec], chunk: int = 32, active: set[FrameSpec] | None = None
) -> Iterator[tuple[FrameSpec, FrameBatch]]:
    """One decode of ``path`` for several samplings: (spec, batch) pairs in decode order.

    Why: each sampling decoded on its own decodes the video once per
    sampling, and a 1080p H.264 frame costs more to decode (about 7 ms a
    core) than the default extractors spend on it at a short side of 256.
    Each spec keeps its own rate sampler and swscale size, so its frames are
    those ``iter_frames`` gives for it alone. A spec removed from ``active``
    (the caller's set, default all of ``specs``) stops being converted.
    """
    path = str(path)
    active = set(specs) if active is None else active
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        declared = _duration(container, stream)
        upright = _Upright(stream, path)
        samplers = {spec: _RateSampler(1.0 / spec.fps if spec.fps else 0.0) for spec in specs}
        frames: dict[FrameSpec, list[np.ndarray]] = {spec: [] for spec in specs}
        stamps: dict[FrameSpec, list[float]] = {spec: [] for spec in specs}
        last_time = None
        native_period = 1.0 / float(stream.average_rate or 25)
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (last_time or 0.0)
                last_time = t
                for spec in specs:
                    if spec not in active or not samplers[spec].keep(t):
                        continue
                    frames[spec].append(upright.rgb(frame, spec))
                    stamps[spec].append(t)
                    if len(frames[spec]) == chunk:
                        yield spec, FrameBatch(np.stack(frames[spec]), np.asarray(stamps[spec]))
                        frames[spec], stamps[spec] = [], []
        except av.FFmpegError as exc:
            raise _decode_error(path, str(exc)) from None
        if last_time is None:
            raise CorruptVideoError(path, "no decodable video frames")
        for spec in specs:
            if frames[spec] and spec in active:
                yield spec, FrameBatch(np.stack(frames[spec]), np.asarray(stamps[spec]))
        start = _start_seconds(stream)
        covered = last_time - start + native_period
        if declared and covered < TRUNCATION_TOLERANCE * declared:
            raise TruncatedVideoError(path, covered, declared)
    finally:
        container.close()


def display_turns(frame: av.VideoFrame, path: str) -> int:
    """Counter-clockwise quarter turns (0-3) that show ``frame`` upright.

    Phones store portrait video landscape, with a display matrix (the MP4
    track header's, as frame side data) saying how to turn it; ``ffmpeg``
    applies it, and a decoder that does not gives sideways frames (people
    lying down for the pose and person detectors). Only quarter turns are
    real; another angle is a ``CorruptVideoError`` that names the fix.
    """
    angle = frame.rotation or 0  # FFmpeg's display rotation: degrees, counter-clockwise
    turns, rest = divmod(round(angle) % 360, 90)
    if rest:
        raise CorruptVideoError(path, f"a display rotation of {angle} degrees, not a multiple of 90")
    return turns


class _Upright:
    """Decoded frames to RGB at a spec's size, turned as the display matrix says.

    The turn is read from the stream's first frame; sizes are those of the
    upright picture, so ``short_side`` and ``size`` mean what a user sees.
    """

    def __init__(self, stream: av.video.stream.VideoStream, path: str) -> None:
        self.native = (stream.codec_context.width, stream.codec_context.height)
        self.path, self.turns = path, None
        self.sizes: dict[FrameSpec, tuple[int, int]] = {}

    def rgb(self, frame: av.VideoFrame, spec: FrameSpec) -> np.ndarray:
        if self.turns is None:
            self.turns = display_turns(frame, self.path)
        if spec not in self.sizes:
            w, h = self.native
            self.sizes[spec] = output_size(spec, *((h, w) if self.turns % 2 else (w, h)))
        width, height = self.sizes[spec]
        if self.turns % 2:  # scaled in the stored orientation, then turned upright
            width, height = height, width
        image = frame.to_ndarray(format="rgb24", width=width, height=height)
        return np.ascontiguousarray(np.rot90(image, self.turns)) if self.turns else image


def _frame_count(container: av.container.InputContainer, stream: av.stream.Stream, native: float) -> int:
    """The stream's frame count, or 0 where it cannot be told without decoding.

    Matroska and WebM (Something-Something v2's format) store no count, only
    a duration, so the count is duration × rate there. Where that misleads
    (a variable rate, a wrong header) ``read_clip`` still falls back to the
    whole decode when the stream ends before the clip does, rather than
    decoding every WebM clip whole; the clip is then real frames, but not
    always the one preloading would give for the seed.
    """
    if stream.frames:
        return stream.frames
    duration = _duration(container, stream)
    return round(duration * native) if duration and native else 0


def read_clip(
    path: str | Path, spec: FrameSpec, length: int, pick: Callable[[int], int]
) -> FrameBatch | None:
    """``length`` consecutive frames, sampled as ``iter_frames`` samples them, from
    the index ``pick(n)`` chooses for a video of ``n`` such frames.

    Why not ``iter_frames`` and a slice: a training clip is 16-64 frames of a
    video of hundreds, and decoding all of them, and converting each to RGB,
    is most of a streaming DataLoader's time. This seeks to the keyframe
    before the clip, converts only the clip's frames and stops at its end.
    ``n`` comes from the container's frame count (``_frame_count``) and rate,
    so the result is None, and the caller decodes the whole video, wherever
    those cannot place the clip: no frame count or duration, a requested fps
    above the native rate, a video shorter than the clip, a seek that lands
    past the clip's start, or a stream that ends early (a truncated file,
    whose error the whole decode then raises).
    """
    path = str(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        native = float(stream.average_rate or 0)
        total = _frame_count(container, stream, native)
        if not total or not native or (spec.fps and spec.fps > native) or stream.time_base is None:
            return None
        # Sampled frame k is the first native frame at or after t0 + k / rate.
        rate = spec.fps or native
        n = int((total - 1) / native * rate + 1e-6) + 1
        if n < length:
            return None
        start = int(pick(n))
        t0 = _start_seconds(stream)
        begin = t0 + start / rate
        period = 1.0 / native
        upright = _Upright(stream, path)
        container.seek(int(begin / stream.time_base), stream=stream, backward=True, any_frame=False)
        step = 1.0 / spec.fps if spec.fps else 0.0
        # Native rate: every frame from the clip's first; else iter_frames' targets.
        sampler = _RateSampler(step, begin - (1e-6 if step else period / 2))
        frames: list[np.ndarray] = []
        times: list[float] = []
        first = True
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    return None
                t = float(frame.time)
                if first and t > begin + period / 2:
                    return None  # the seek overshot the clip's first frame
                first = False
                if not sampler.keep(t):
                    continue
                frames.append(upright.rgb(frame, spec))
                times.append(t)
                if len(frames) == length:
                    return FrameBatch(np.stack(frames), np.asarray(times))
        except av.FFmpegError:
            return None
        return None
    finally:
        container.close()


def read_audio(path: str | Path, spec: AudioSpec) -> AudioTrack | None:
    """The whole audio track as mono float32 at ``spec.rate``; ``None`` if there is none."""
    path = str(path)
    with _open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=spec.rate)
        parts: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as exc:
            raise _decode_error(path, f"audio: {exc}") from None
        # The track's own declared length only: the container's includes the video,
        # which a real file's sound is often a little shorter than.
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    decoded = len(samples) / spec.rate
    if declared and decoded < TRUNCATION_TOLERANCE * declared:
        # A cut-short file declares its track and decodes little or none of it: that is
        # a decode failure to retry after a re-download, not a silent track to mask.
        raise TruncatedVideoError(path, decoded, declared, stream="audio samples")
    return AudioTrack(samples.astype(np.float32, copy=False), spec.rate)


@dataclass
class VideoSource:
    """One video as the extractors see it (implements ``extractors.base.VideoInput``).

    ``specs`` are the frame samplings the extractors still to run on this
    video will ask for. The first request decodes the video once for all of
    them (``decode_samplings``), yielding its own frames as they come and
    keeping the others' for their extractors, as long as everything kept
    fits ``cache_bytes``; a sampling that does not fit is dropped and
    decoded again when asked for, so memory stays bounded whatever the
    video's length. The timestamps of every sampling are recorded for
    provenance.
    """

    video_id: str
    path: str
    specs: tuple[FrameSpec, ...] = ()
    cache_bytes: int = 256 * 2**20
    timestamps: dict[FrameSpec, np.ndarray] = field(default_factory=dict)
    _frame_cache: dict[FrameSpec, list[FrameBatch]] = field(default_factory=dict, repr=False)
    _audio_cache: dict[AudioSpec, AudioTrack | None] = field(default_factory=dict, repr=False)

    def frames(self, spec: FrameSpec, chunk: int = 32) -> Iterator[FrameBatch]:
        cached = self._frame_cache.get(spec)
        if cached is not None:
            for batch in cached:
                for i in range(0, len(batch.frames), chunk):
                    yield FrameBatch(batch.frames[i : i + chunk], batch.timestamps[i : i + chunk])
            return
        wanted = [spec] + [s for s in dict.fromkeys(self.specs) if s != spec and s not in self._frame_cache]
        active = set(wanted)
        kept: dict[FrameSpec, list[FrameBatch]] = {s: [] for s in wanted}
        used = sum(b.frames.nbytes for batches in self._frame_cache.values() for b in batches)
        stamps: dict[FrameSpec, list[np.ndarray]] = {s: [] for s in wanted}
        for got, batch in decode_samplings(self.path, wanted, chunk, active):
            stamps[got].append(batch.timestamps)
            if got in kept:
                used += batch.frames.nbytes
                if used > self.cache_bytes:  # drop this sampling's cache, not the frames asked for
                    used -= sum(b.frames.nbytes for b in kept.pop(got))
                    if got != spec:
                        active.discard(got)
                        continue
                else:
                    kept[got].append(batch)
            if got == spec:
                yield batch
        for s in active:
            self.timestamps[s] = np.concatenate(stamps[s]) if stamps[s] else np.zeros(0)
        for s, batches in kept.items():
            self._frame_cache[s] = batches

    def audio(self, spec: AudioSpec) -> AudioTrack | None:
        if spec not in self._audio_cache:
            self._audio_cache[spec] = read_audio(self.path, spec)
        return self._audio_cache[spec]
