"""The sharded HDF5 store: shards, index, staging and the failure ledger.

Layout under the output root::

    index.json                 video id -> shard (assignments never move)
    shards/shard-00000.h5      one group per video, one subgroup per extractor,
                               one dataset per output (gzip where it pays)
    staging/shard-00000/       finished results of a shard still being written
    ledger.jsonl               one line per failure, for people (`hallucinate inspect`)

Crash safety follows video2dataset: one process writes a shard, under a
temporary name, and renames it when complete, so a file named ``shard-*.h5``
is always whole. Work finished before a crash survives in ``staging/``, one
atomically renamed file per (video, extractor), and is picked up by the next
attempt. Failure attempts are stored in the shard itself, which is what lets
a re-run retry a failed video exactly once.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

from pipelines.errors import DiskFullError, HallucinateError, is_disk_full

FORMAT_VERSION = 2  # 2: the offset table also lists flags
FLAGGED_TABLE_FORMAT = 2
SHARDS = "shards"
STAGING = "staging"
INDEX = "index.json"
LEDGER = "ledger.jsonl"
TIMESTAMPS = "_timestamps"  # frame times (s) an extractor's output was computed from
OFFSETS = "@index"  # offset table; "@" is escaped in video group names, so it cannot clash

DONE, FLAGGED, FAILED = "done", "flagged", "failed"
FLAGS_KEY = "@flags"  # in the offset table, beside an extractor's outputs


def group_name(video_id: str) -> str:
    """HDF5 treats ``/`` as a path separator, so it is escaped in video ids."""
    return quote(video_id, safe="")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, and marked with the writer's pid."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_orphan_temporaries(root: str | Path) -> list[Path]:
    """Removes the write-then-rename temporaries that killed writers left in a store.

    Only safe under ``store_lock``: then no writer of another run is alive,
    and this run's have not started, so every temporary is an orphan (a run
    killed while writing a shard left a copy of the shard, never removed).
    """
    orphans = [p for p in Path(root).rglob(".*.tmp-*") if p.is_file()]
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write-then-rename, so readers see the old file or the new one, never half.

    ``durable`` adds an fsync, which protects against power loss as well as
    process crashes; staged results skip it (losing them costs a recompute,
    while an fsync per video serialises parallel workers on the disk).
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise


@dataclass
class Entry:
    """What the store holds for one (video, extractor).

    ``status`` is ``done`` (arrays present), ``flagged`` (a legitimate
    absence such as no audio; ``flags`` says why) or ``failed`` (``attrs``
    holds the error and the number of attempts so far).
    """

    status: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of stored arrays, read or not

    @property
    def config_hash(self) -> str | None:
        return self.attrs.get("config_hash")

    @property
    def attempts(self) -> int:
        return int(self.attrs.get("attempts", 0))

    def settled(self, config_hash: str, max_attempts: int) -> bool:
        """True when a re-run has nothing left to do for this entry."""
        if self.config_hash != config_hash:
            return False
        return self.status != FAILED or self.attempts >= max_attempts


# ---------------------------------------------------------------- index


@dataclass
class ShardIndex:
    """Which shard each video lives in. Assignments are permanent: new videos
    go to new shards, so adding videos to a dataset never invalidates work."""

    shards: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path) -> ShardIndex:
        path = Path(root) / INDEX
        if not path.is_file():
            return cls()
        return cls(json.loads(path.read_text())["shards"])

    def save(self, root: str | Path) -> None:
        data = json.dumps({"format": FORMAT_VERSION, "shards": self.shards}, indent=0)
        Path(root).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(root) / INDEX, data.encode())

    def video_to_shard(self) -> dict[str, str]:
        return {vid: shard for shard, vids in self.shards.items() for vid in vids}

    def assign(self, video_ids: Iterable[str], shard_size: int) -> list[str]:
        """Puts unassigned videos into new shards; returns the new shard names."""
        known = self.video_to_shard()
        fresh = [v for v in video_ids if v not in known]
        start = 1 + max((int(s.split("-")[1]) for s in self.shards), default=-1)
        names = []
        for i in range(0, len(fresh), shard_size):
            name = f"shard-{start + len(names):05d}"
            self.shards[name] = fresh[i : i + shard_size]
            names.append(name)
        return names


def shard_path(root: str | Path, shard: str) -> Path:
    return Path(root) / SHARDS / f"{shard}.h5"


def read_complete(root: str | Path, shard: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The shard's ``complete`` map (extractor -> config hash settled for every
    video) and its per-extractor status counts.

    Only root attributes are read, so planning a run over thousands of
    shards costs one small read per shard.
    """
    path = shard_path(root, shard)
    if not path.is_file():
        return {}, {}
    with h5py.File(path, "r", locking=False) as f:
        return json.loads(f.attrs.get("complete", "{}")), json.loads(f.attrs.get("status_counts", "{}"))


# ---------------------------------------------------------------- staging


class Staging:
    """Finished results of one shard, one file per (video, extractor).

    Each file is written under a temporary name and renamed, so a crash
    leaves either the whole result or nothing. A ``.started`` marker per
    video counts how often a worker began it: a video that killed its worker
    is charged a failed attempt instead of killing workers forever.
    """

    def __init__(self, root: str | Path, shard: str) -> None:
        self.dir = Path(root) / STAGING / shard

    def _file(self, video_id: str, extractor: str, suffix: str = ".npz") -> Path:
        return self.dir / f"{group_name(video_id)}@{extractor}{suffix}"

    def put(self, video_id: str, extractor: str, entry: Entry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"status": entry.status, "flags": entry.flags, "attrs": entry.attrs}
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **entry.arrays)
        atomic_write_bytes(self._file(video_id, extractor), buf.getvalue(), durable=False)

    def entries(self) -> dict[tuple[str, str], Entry]:
        found: dict[tuple[str, str], Entry] = {}
        if not self.dir.is_dir():
            return found
        for path in self.dir.glob("*.npz"):
            vid, _, extractor = path.stem.partition("@")
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(npz["__meta__"].tobytes())
                arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
            found[(unquote(vid), extractor)] = Entry(meta["status"], arrays, meta["flags"], meta["attrs"])
        return found

    def starts(self, video_id: str) -> int:
        marker = self._file(video_id, "", ".started")
        return int(marker.read_text()) if marker.is_file() else 0

    def mark_started(self, video_id: str, count: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._file(video_id, "", ".started"), str(count).encode(), durable=False)

    def clear(self) -> None:
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                path.unlink(missing_ok=True)
            self.dir.rmdir()


# ---------------------------------------------------------------- shard files


def worth_compressing(array: np.ndarray, min_saving: float = 0.25) -> bool:
    """True when gzip saves at least ``min_saving`` of the bytes.

    Dense float descriptors (means, eigenvectors, sketches) barely compress,
    and stored uncompressed and contiguous they can be served by one
    ``pread`` (see ``ShardReader``); sparse ones (BoW histograms, one-hot
    class blocks, quantised flow) shrink a lot and stay compressed.
    """
    if array.size < 64:
        return False
    sample = np.ascontiguousarray(array.reshape(-1)[:65536]).tobytes()
    return len(zlib.compress(sample, 1)) < (1 - min_saving) * len(sample)


def _write_entry(group: h5py.Group, entry: Entry, compression: str | None) -> None:
    group.attrs["status"] = entry.status
    group.attrs["flags"] = json.dumps(entry.flags)
    for key, value in entry.attrs.items():
        group.attrs[key] = value
    for name, array in entry.arrays.items():
        array = np.asarray(array)
        squeeze = compression is not None and worth_compressing(array)
        group.create_dataset(name, data=array, compression=compression if squeeze else None, shuffle=squeeze)


def _offset_table(f: h5py.File) -> dict[str, dict[str, list]]:
    """video group -> "extractor/output" -> [byte offset, dtype, shape] of every
    contiguous uncompressed dataset, so readers can skip HDF5's per-object
    open (tens of microseconds) and read the bytes directly; and
    "extractor/@flags" -> the flags of every flagged result, for the same
    reason."""
    table: dict[str, dict[str, list]] = {}
    for vname, vgroup in f.items():
        if vname.startswith("@"):
            continue
        for extractor, egroup in vgroup.items():
            flags = json.loads(egroup.attrs.get("flags", "{}"))
            if flags:  # results that exist but must not be trained on (e.g. no boxes)
                table.setdefault(vname, {})[f"{extractor}/{FLAGS_KEY}"] = flags
            for output, ds in egroup.items():
                offset = ds.id.get_offset()
                if ds.chunks is None and ds.size and offset is not None:
                    table.setdefault(vname, {})[f"{extractor}/{output}"] = [
                        int(offset),
                        ds.dtype.str,
                        list(ds.shape),
                    ]
    return table


def _read_entry(group: h5py.Group, with_arrays: bool = True) -> Entry:
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in group.attrs.items()}
    status = attrs.pop("status", DONE)
    flags = json.loads(attrs.pop("flags", "{}"))
    arrays = {k: group[k][()] for k in group} if with_arrays else {}
    return Entry(status, arrays, flags, attrs, {k: group[k].shape for k in group})


def read_shard(
    path: str | Path, with_arrays: bool = False
) -> tuple[dict[tuple[str, str], Entry], dict[str, str]]:
    """All entries of a shard keyed by (video id, extractor), and its ``complete`` map."""
    entries: dict[tuple[str, str], Entry] = {}
    if not Path(path).is_file():
        return entries, {}
    with h5py.File(path, "r", locking=False) as f:
        for vname, vgroup in f.items():
            if vname.startswith("@"):  # the offset table, not a video
                continue
            for extractor, egroup in vgroup.items():
                entries[(unquote(vname), extractor)] = _read_entry(egroup, with_arrays)
        return entries, json.loads(f.attrs.get("complete", "{}"))


def load_entry(path: str | Path, video_id: str, extractor: str) -> Entry:
    """One entry with its arrays, e.g. a stored dependency of a new extractor."""
    with h5py.File(path, "r", locking=False) as f:
        return _read_entry(f[group_name(video_id)][extractor])


def write_shard(
    path: Path,
    new: dict[tuple[str, str], Entry],
    complete: dict[str, str],
    video_attrs: dict[str, dict[str, Any]],
    compression: str | None = "gzip",
    status_counts: dict[str, dict[str, int]] | None = None,
) -> None:
    """Writes old content plus ``new`` to a temporary file, then renames it over ``path``.

    Existing entries not replaced by ``new`` are copied as raw HDF5 objects
    (no decompression). On ENOSPC the temporary file is removed and the old
    shard and the staging folder are left untouched.
    """
    tmp = temporary_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as dst:
            if path.is_file():
                with h5py.File(path, "r", locking=False) as src:
                    for vname, vgroup in src.items():
                        if vname.startswith("@"):
                            continue
                        out = dst.require_group(vname)
                        out.attrs.update(vgroup.attrs)
                        for extractor in vgroup:
                            if (unquote(vname), extractor) not in new:
                                src.copy(vgroup[extractor], out, name=extractor)
            for (video_id, extractor), entry in sorted(new.items()):
                vgroup = dst.require_group(group_name(video_id))
                if extractor in vgroup:
                    del vgroup[extractor]
                _write_entry(vgroup.create_group(extractor), entry, compression)
            for video_id, attrs in video_attrs.items():
                dst.require_group(group_name(video_id)).attrs.update(attrs)
            dst.attrs["format"] = FORMAT_VERSION
            dst.attrs["shard"] = path.stem
            dst.attrs["complete"] = json.dumps(complete, sort_keys=True)
            dst.attrs["status_counts"] = json.dumps(status_counts or {}, sort_keys=True)
            dst.attrs["written"] = time.time()
            dst.flush()
            table = json.dumps(_offset_table(dst)).encode()
            dst.create_dataset(OFFSETS, data=np.frombuffer(table, np.uint8))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise


# ---------------------------------------------------------------- ledger


def append_ledger(root: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Appends failures; only the client writes the ledger, so lines never interleave."""
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    if lines:
        with open(Path(root) / LEDGER, "a") as fh:
            fh.write(lines)


def read_ledger(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / LEDGER
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- reader


class ShardReader:
    """Random access to descriptors by video id, for the trainer.

    Descriptors are named ``"<extractor>/<output>"``. Uncompressed arrays are
    read with one ``pread`` at the offset the shard's ``@index`` table
    records, which is what makes tens of thousands of random reads per second
    possible; compressed ones go through h5py. Files are opened lazily and
    per process: after a fork (DataLoader workers) inherited handles are
    dropped and reopened, and pickling carries only the root, so the reader
    is safe under both fork and spawn. A shard replaced by a re-run while
    open keeps being read consistently from the old file until reopened.
    """

    def __init__(self, root: str | Path, max_open_datasets: int = 4096) -> None:
        self.root = Path(root)
        index = ShardIndex.load(self.root)
        if not index.shards:
            raise FileNotFoundError(
                f"{self.root / INDEX} not found or empty: no descriptors were extracted to "
                f"{self.root}. Run `make extract` (or `hallucinate extract out={self.root}`) first."
            )
        self._where = index.video_to_shard()
        self._max_open = max_open_datasets
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, h5py.File] = {}
        self._fds: dict[str, int] = {}
        self._tables: dict[str, dict[str, dict[str, list]]] = {}
        self._with_table: set[str] = set()  # shards whose table lists flags
        self._datasets: OrderedDict[tuple[str, str], h5py.Dataset] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "max_open": self._max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["max_open"])

    @property
    def video_ids(self) -> list[str]:
        return list(self._where)

    def _shard(self, video_id: str) -> str:
        if os.getpid() != self._pid:  # forked: never share HDF5 handles across processes
            self._reset()
        try:
            shard = self._where[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in the index of {self.root}") from None
        if shard not in self._files:
            path = shard_path(self.root, shard)
            if not path.is_file():
                raise KeyError(f"shard {path} of video {video_id!r} has not been written yet")
            f = h5py.File(path, "r", locking=False)
            self._files[shard] = f
            # HDF5's own descriptor: the offset table and the bytes come from the
            # same file even if a re-run renames a new shard over this path.
            self._fds[shard] = f.id.get_vfd_handle()
            self._tables[shard] = json.loads(f[OFFSETS][()].tobytes()) if OFFSETS in f else {}
            if OFFSETS in f and int(f.attrs.get("format", 0)) >= FLAGGED_TABLE_FORMAT:
                self._with_table.add(shard)
        return shard

    def _video(self, video_id: str) -> h5py.Group:
        f = self._files[self._shard(video_id)]
        try:
            return f[group_name(video_id)]
        except KeyError:
            raise KeyError(f"video {video_id!r} has no results in {f.filename}") from None

    def get(self, video_id: str, descriptor: str) -> np.ndarray:
        """One descriptor array, e.g. ``get("abc", "audio.logmel/stats")``."""
        shard = self._shard(video_id)
        located = self._tables[shard].get(group_name(video_id), {}).get(descriptor)
        if located is not None:
            offset, dtype, shape = located
            out = np.empty(shape, np.dtype(dtype))
            os.preadv(self._fds[shard], [out], offset)
            return out
        key = (video_id, descriptor)
        ds = self._datasets.get(key)
        if ds is None:
            extractor, _, output = descriptor.rpartition("/")
            group = self._video(video_id)
            try:
                ds = group[extractor][output]
            except KeyError:
                entry = self.entry(video_id, extractor) if extractor in group else None
                why = f" (status {entry.status}, flags {entry.flags})" if entry else ""
                raise KeyError(f"video {video_id!r} has no descriptor {descriptor!r}{why}") from None
            self._datasets[key] = ds
            if len(self._datasets) > self._max_open:
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(key)
        return ds[()]

    def flags(self, video_id: str, extractor: str) -> dict[str, str]:
        """The flags of one result ({} when none): a flagged result (``no_boxes``)
        may still hold arrays, such as a zero descriptor, that must not be
        trained on. Served from the offset table, without opening HDF5 objects."""
        shard = self._shard(video_id)
        if shard in self._with_table:
            return self._tables[shard].get(group_name(video_id), {}).get(f"{extractor}/{FLAGS_KEY}", {})
        try:
            return self.entry(video_id, extractor).flags
        except KeyError:
            return {}

    def entry(self, video_id: str, extractor: str) -> Entry:
        """Status, flags and provenance of one extractor's result (no arrays)."""
        group = self._video(video_id)
        if extractor not in group:
            raise KeyError(f"video {video_id!r} has no results of extractor {extractor!r}")
        return _read_entry(group[extractor], with_arrays=False)

    def arrays(self, video_id: str, extractor: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of each stored array of one result, without reading it."""
        group = self._video(video_id)[extractor]
        return {name: (ds.shape, str(ds.dtype)) for name, ds in group.items()}

    def extractors(self, video_id: str) -> list[str]:
        return list(self._video(video_id))

    def close(self) -> None:
        if os.getpid() == self._pid:
            for f in self._files.values():
                f.close()
        self._reset()


# ---------------------------------------------------------------- one run per store

LOCK_NAME, HOLDER_NAME = ".lock", ".lock.holder"


class StoreBusyError(HallucinateError):
    """Another run holds the store's lock."""


def _holder_text(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {started} ({holder.get('command', '?')})"
    )


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder process lives, when it ran on this host; None elsewhere."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


@contextmanager
def store_lock(root: str | Path, wait: float = 0.0, log=print) -> Iterator[None]:
    """Holds ``<root>/.lock`` for one run: the index's load-assign-save and the staging.

    Why: two runs on one folder both did all the work, then crashed each
    other clearing ``staging/``, and runs over different videos could put
    different videos in one shard. The lock is ``filelock.FileLock``, an
    flock(2) lock: the kernel drops it when its process dies, so a killed
    run never leaves a held lock, and it holds on NFSv4 and Lustre, where
    clusters keep their stores. ``.lock.holder`` says who holds it, so a
    second run can say whether the first is alive; one that finds a
    holder's note but takes the lock says the earlier run was interrupted.
    A second run waits ``wait`` seconds (0: not at all), then stops.
    """
    from filelock import FileLock, Timeout

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    holder_path = root / HOLDER_NAME
    lock = FileLock(str(root / LOCK_NAME))

    def holder() -> dict[str, Any]:
        try:
            return json.loads(holder_path.read_text())
        except (OSError, ValueError):
            return {}

    try:
        lock.acquire(timeout=wait)
    except Timeout:
        who = holder()
        alive = _alive_here(who)
        state = {
            True: "It is alive; wait for it to finish",
            False: "That process is gone, yet the lock is held: another process inherited it",
            None: f"Check with `ps -p {who.get('pid')}` on {who.get('host')}",
        }[alive]
        raise StoreBusyError(
            f"{root}: another run holds this store ({_holder_text(who) if who else 'no holder note'}). "
            f"{state}, re-run with lock_wait=SECONDS to wait for it, or set out=... to another folder."
        ) from None
    try:
        earlier = holder()
        if earlier and earlier.get("pid") != os.getpid():
            log(
                f"note: an earlier run on {root} was interrupted ({_holder_text(earlier)}); resuming its work"
            )
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        mine["command"] = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        holder_path.write_text(json.dumps(mine))
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()
