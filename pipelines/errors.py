"""Errors a user can act on.

Every message names the thing at fault (a file, a key, a dataset) and the
fix, because these errors end up in the failure ledger and in CI logs where
there is no traceback reader. Anything that is *not* a ``HallucinateError``
is a bug in our code and is recorded with its type and traceback instead.
"""

from __future__ import annotations

import errno
from pathlib import Path


class HallucinateError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class ConfigError(HallucinateError):
    """A bad config key, value or name."""


class DatasetError(HallucinateError):
    """A dataset definition or annotation file is missing or malformed."""


class VideoError(HallucinateError):
    """A video file that cannot be used; ``path`` and ``fix`` are always set."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class MissingVideoError(VideoError):
    def __init__(self, path: str | Path) -> None:
        super().__init__(
            path,
            "file not found",
            "Check video_root (VIDEO_ROOT=... for make) or remove the video from the annotations.",
        )


class EmptyVideoError(VideoError):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "file is empty (0 bytes)", "Re-download or re-encode the video.")


class CorruptVideoError(VideoError):
    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            path,
            f"cannot be decoded ({detail})",
            "Re-download it, or re-encode it with `ffmpeg -i IN -c:v libx264 OUT.mp4`.",
        )


class TruncatedVideoError(VideoError):
    """A file cut short: its frames or sound stop early, or its index never arrived."""

    def __init__(self, path: str | Path, decoded_s: float, declared_s: float, stream: str = "frames") -> None:
        super().__init__(
            path,
            f"truncated: {stream} stop at {decoded_s:.2f}s of a declared {declared_s:.2f}s",
            "The download was probably cut short; re-download the video.",
        )


class CutShortError(VideoError):
    """An MP4/MOV that ends inside one of its boxes: a download or recording cut short."""

    def __init__(self, path: str | Path, box: str, size: int, declared_end: int, index: bool) -> None:
        missing = "" if index else "; its index (the moov box, which most encoders write last) is missing"
        super().__init__(
            path,
            f"truncated: the file ends at byte {size:,}, inside its {box!r} box, which runs to byte "
            f"{declared_end:,}{missing}",
            "The download (or recording) was cut short; re-download the video.",
        )


class NoVideoStreamError(VideoError):
    def __init__(self, path: str | Path) -> None:
        super().__init__(
            path,
            "has no video stream",
            "It is probably an audio-only file: remove it from the annotations (for a folder "
            "dataset, move it out of the class folders), or list the videos in a splits CSV without it.",
        )


class MissingWeightsError(HallucinateError):
    """A pretrained model's weights file is not where the config says."""

    def __init__(self, what: str, path: str | Path, fix: str) -> None:
        self.path = str(path)
        super().__init__(f"{what}: weights file {self.path} not found. {fix}")


class DivergedError(HallucinateError):
    """A training loss became NaN or infinite; the last epoch's checkpoint is kept."""


class DiskFullError(HallucinateError):
    """Writing a shard ran out of space; finished work stays staged for a re-run."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(
            f"no space left on the device while writing {self.path}. Finished videos are "
            "kept in the staging folder next to it; free some space (or set OUT=... to "
            "another disk) and re-run the same command to resume. (With dask workers, their "
            "tracebacks are in logs/ beside the store.)"
        )


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, however deep h5py or numpy wrapped it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
