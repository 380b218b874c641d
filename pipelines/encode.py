"""Writing small mp4 files (H.264 + AAC) with PyAV.

Used by the demo generator and by tests that need real files to decode; no
ffmpeg binary is required because PyAV bundles the encoders.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int | Fraction,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    codec: str = "libx264",
    bit_rate: int | None = 600_000,
    faststart: bool = False,
    codec_options: dict[str, str] | None = None,
) -> None:
    """Encodes ``frames`` (T, H, W, 3 uint8 RGB, or any iterable of H, W, 3 frames,
    which is encoded one frame at a time) and optional mono ``audio`` in [-1, 1].

    ``audio=None`` writes a file with no audio stream at all; an all-zero
    array writes a silent track, which is a different case downstream.
    ``codec="mpeg4"`` gives byte-identical files for identical input; the
    libx264 build bundled with PyAV 18 does not (its output varies from call
    to call even single-threaded), so the demo set uses mpeg4 and tests use
    H.264 where realism matters more than bytes. ``faststart`` puts the index
    first, as streaming sites do, which is what makes a cut-short download
    still partly decodable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to encode")
    height, width = first.shape[:2]
    options = {"movflags": "faststart"} if faststart else None
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if bit_rate is not None:
            video.bit_rate = bit_rate
        if codec_options:
            video.options = codec_options  # e.g. x264's preset and crf, instead of a bit rate
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio_rate, layout="mono")
        for i, frame in enumerate(itertools.chain([first], frames)):
            yuv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2YUV_I420)
            out = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            out.pts = i
            container.mux(video.encode(out))
        container.mux(video.encode(None))
        if sound is not None:
            _encode_audio(container, sound, audio, audio_rate)


def write_audio_only(path: str | Path, audio: np.ndarray, audio_rate: int = 16000) -> None:
    """An mp4 with an AAC track and no video stream (a case extraction must survive)."""
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=audio_rate, layout="mono")
        _encode_audio(container, sound, audio, audio_rate)


def _encode_audio(container, sound, audio: np.ndarray, audio_rate: int) -> None:
    samples = np.asarray(audio, np.float32).reshape(1, -1)
    step = sound.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], step):
        chunk = np.ascontiguousarray(samples[:, start : start + step])
        out = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
        out.sample_rate = audio_rate
        out.pts = start
        container.mux(sound.encode(out))
    container.mux(sound.encode(None))
