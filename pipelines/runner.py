"""Processing one shard for one group of extractors (runs inside a worker).

The unit of work is a shard: the worker works out, per video, which
extractors still have something to do (not in the shard with this config,
not staged by an interrupted attempt, not failed too often), runs them in
dependency order on one shared decode, stages every result as soon as it
exists and finally rewrites the shard in one atomic step.
"""

from __future__ import annotations

import graphlib
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extractors.base import Extractor, FlaggedInput, FrameSpec, Result
from pipelines.datasets import VideoRecord
from pipelines.decode import VideoSource
from pipelines.errors import DiskFullError, HallucinateError, is_disk_full
from pipelines.store import (
    DONE,
    FAILED,
    FLAGGED,
    TIMESTAMPS,
    Entry,
    Staging,
    load_entry,
    read_shard,
    shard_path,
    write_shard,
)


@dataclass(frozen=True)
class ExtractorSpec:
    """A picklable recipe for an extractor: its class and typed config.

    Shipping the class (by reference) rather than a name means a worker
    imports the defining module, and so knows extractors that were
    registered in the client process only (plugins, tests).
    """

    cls: type[Extractor]
    config: Any

    def build(self) -> Extractor:
        return self.cls(self.config)


class ExtractorPool:
    """Extractor instances of one worker process, set up once and reused.

    Models load in ``setup`` the first time a shard needs them and stay
    loaded for every later shard on this worker; ``close`` tears them down
    when the worker exits.
    """

    def __init__(self) -> None:
        self._live: dict[tuple[str, str, str], Extractor] = {}

    def get(self, spec: ExtractorSpec) -> Extractor:
        fresh = spec.build()
        key = (spec.cls.__module__, spec.cls.__qualname__, fresh.config_hash)
        if key not in self._live:
            fresh.setup()
            self._live[key] = fresh
        return self._live[key]

    def close(self) -> None:
        for extractor in self._live.values():
            extractor.teardown()
        self._live.clear()


@dataclass(frozen=True)
class ShardJob:
    out_root: str
    shard: str
    videos: list[VideoRecord]
    extractors: list[ExtractorSpec]
    shard_videos: tuple[str, ...] = ()  # every video assigned to the shard, requested or not
    max_attempts: int = 2
    compression: str | None = "gzip"


@dataclass
class ShardReport:
    """What one shard job did, merged by the client into the run summary."""

    shard: str
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    videos: int = 0
    restarted: int = 0


def dependency_order(extractors: Mapping[str, Extractor]) -> list[str]:
    """Extractor names so that every extractor comes after the ones it reads."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name, extractor in extractors.items():
        missing = [d for d in extractor.needs().inputs if d not in extractors]
        if missing:
            raise HallucinateError(
                f"extractor {name!r} reads {missing}, which is not in this run; add it to extractors"
            )
        sorter.add(name, *extractor.needs().inputs)
    return list(sorter.static_order())


def frame_samplings(todo: list[str], extractors: Mapping[str, Extractor]) -> tuple[FrameSpec, ...]:
    """The frame samplings a video's pending extractors may decode: theirs, and
    those of the dependencies whose transient outputs they make the runner
    recompute. One decode then serves them all (``VideoSource``)."""
    names = list(todo)
    for name in todo:
        names += [d for d in extractors[name].needs().inputs if extractors[d].transient_outputs()]
    specs = (extractors[n].needs().frames for n in dict.fromkeys(names))
    return tuple(dict.fromkeys(s for s in specs if s is not None))


def failure_entry(extractor: Extractor, exc: BaseException, attempts: int) -> Entry:
    """A failed result: user errors keep their message, bugs also keep the traceback."""
    user_error = isinstance(exc, HallucinateError)
    message = str(exc) if user_error else "".join(traceback.format_exception_only(exc)).strip()
    attrs = dict(extractor.provenance())
    attrs.update(attempts=attempts, error_type=type(exc).__name__, error=message, failed_at=time.time())
    if not user_error:
        attrs["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
    return Entry(FAILED, attrs=attrs)


def result_entry(extractor: Extractor, result: Result, video: VideoSource) -> Entry:
    attrs = dict(extractor.provenance())
    attrs.update(result.attrs)
    arrays = dict(result.arrays)
    frames = extractor.needs().frames
    if frames is not None and frames in video.timestamps and arrays:
        arrays[TIMESTAMPS] = video.timestamps[frames]
    status = FLAGGED if result.flags and not result.arrays else DONE
    return Entry(status, arrays, dict(result.flags), attrs)


def entry_as_result(entry: Entry) -> Result:
    arrays = {k: v for k, v in entry.arrays.items() if k != TIMESTAMPS}
    return Result(arrays, dict(entry.flags), dict(entry.attrs))


class _ShardState:
    """Entries of one shard: stored in the file, staged earlier, or made now."""

    def __init__(self, job: ShardJob) -> None:
        self.path = shard_path(job.out_root, job.shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stored, self.complete = read_shard(self.path)
        self.staging = Staging(job.out_root, job.shard)
        self.new: dict[tuple[str, str], Entry] = self.staging.entries()

    def get(self, video_id: str, name: str) -> Entry | None:
        return self.new.get((video_id, name)) or self.stored.get((video_id, name))

    def put(self, video_id: str, name: str, entry: Entry) -> None:
        self.staging.put(video_id, name, entry)
        self.new[(video_id, name)] = entry


def process_shard(
    job: ShardJob,
    pool: ExtractorPool,
    progress: Callable[[int], None] = lambda n: None,
) -> ShardReport:
    """Brings one shard up to date for ``job.extractors``; see the module docstring."""
    report = ShardReport(job.shard)
    extractors = {spec.cls.name: pool.get(spec) for spec in job.extractors}
    order = dependency_order(extractors)
    state = _ShardState(job)

    for record in job.videos:
        todo = []
        for name in order:
            entry = state.get(record.video_id, name)
            if entry is not None and entry.settled(extractors[name].config_hash, job.max_attempts):
                report.counts[name]["given_up" if entry.status == FAILED else "reused"] += 1
            else:
                todo.append(name)
        if todo:
            _run_video(job, record, todo, extractors, state, report)
        report.videos += 1
        progress(1)

    complete = {k: v for k, v in state.complete.items() if k not in extractors}
    members = sorted(set(job.shard_videos) | {r.video_id for r in job.videos})
    status_counts = {}
    for name, extractor in extractors.items():
        entries = [state.get(vid, name) for vid in members]
        if all(e is not None and e.settled(extractor.config_hash, job.max_attempts) for e in entries):
            complete[name] = extractor.config_hash
        status_counts[name] = dict(Counter(e.status for e in entries if e is not None))
    video_attrs = {
        r.video_id: {"path": r.path, "split": r.split, "labels": list(r.labels)} for r in job.videos
    }
    write_shard(state.path, state.new, complete, video_attrs, job.compression, status_counts)
    state.staging.clear()
    return report


def _run_video(
    job: ShardJob,
    record: VideoRecord,
    todo: list[str],
    extractors: Mapping[str, Extractor],
    state: _ShardState,
    report: ShardReport,
) -> None:
    vid = record.video_id
    starts = state.staging.starts(vid)
    # Started before, yet some result is missing: a worker (or the run) died inside this video.
    cut_off = starts and any((vid, n) not in state.new for n in todo)
    if cut_off and starts >= job.max_attempts:
        exc = HallucinateError(
            f"{record.path}: processing this video was cut off {starts} times (a worker or the "
            "run died inside it: out of memory, a crash in native code, or a kill -9), so it is "
            "skipped. Check the file, or give workers more memory; if you killed the run "
            f"yourself, re-run with max_attempts={starts + 1} to try it again."
        )
        for name in todo:
            _record_failure(state, report, record, extractors[name], exc, job)
        return
    report.restarted += bool(cut_off)
    state.staging.mark_started(vid, starts + 1)
    try:
        _run_extractors(job, record, todo, extractors, state, report)
    except KeyboardInterrupt:  # Ctrl-C: the user stopped the run, the video killed nothing
        state.staging.mark_started(vid, starts)
        raise


def _run_extractors(
    job: ShardJob,
    record: VideoRecord,
    todo: list[str],
    extractors: Mapping[str, Extractor],
    state: _ShardState,
    report: ShardReport,
) -> None:
    """Runs ``todo`` on one decode of the video, staging each result as it comes."""
    vid = record.video_id
    video = VideoSource(vid, record.path, frame_samplings(todo, extractors))
    results: dict[str, Result] = {}

    def inputs_of(name: str) -> dict[str, Result]:
        inputs = {}
        for dep in extractors[name].needs().inputs:
            dep_entry = state.get(vid, dep)
            if dep in results:
                inputs[dep] = results[dep]
            elif dep_entry is None or dep_entry.status == FAILED:
                # Its own message, which says what is wrong with the file and the fix.
                why = dep_entry.attrs.get("error", "") if dep_entry is not None else ""
                cause = f" ({why.removeprefix(record.path + ': ')})" if why else ""
                raise HallucinateError(f"{record.path}: {dep!r} failed on it{cause}, so {name!r} cannot run")
            elif extractors[dep].transient_outputs() and dep_entry.status == DONE:
                # Stored without what dependents read (e.g. flow): recompute in memory, store nothing.
                t0 = time.perf_counter()
                results[dep] = extractors[dep].process(video, inputs_of(dep))
                report.seconds[dep] += time.perf_counter() - t0
                inputs[dep] = results[dep]
            else:
                if dep_entry.status == DONE and not dep_entry.arrays:  # stored: load lazily
                    dep_entry = load_entry(state.path, vid, dep)
                inputs[dep] = entry_as_result(dep_entry)
        return inputs

    for name in todo:
        extractor = extractors[name]
        try:
            inputs = inputs_of(name)
            t0 = time.perf_counter()
            try:
                result = extractor.process(video, inputs)
            except FlaggedInput as exc:  # e.g. flow of a 1-frame clip: this one is absent too
                result = Result(flags=exc.flags, attrs={"flagged_input": exc.source})
            report.seconds[name] += time.perf_counter() - t0
            entry = result_entry(extractor, result, video)
        except DiskFullError:
            raise
        except Exception as exc:  # recorded in the shard and the ledger; the run goes on
            if is_disk_full(exc):
                raise DiskFullError(job.out_root) from exc
            _record_failure(state, report, record, extractor, exc, job)
            continue
        results[name] = result
        report.counts[name]["flagged" if entry.status == FLAGGED else "done"] += 1
        state.put(vid, name, entry)


def _record_failure(
    state: _ShardState,
    report: ShardReport,
    record: VideoRecord,
    extractor: Extractor,
    exc: BaseException,
    job: ShardJob,
) -> None:
    previous = state.get(record.video_id, extractor.name)
    earlier = 0
    if previous is not None and previous.status == FAILED and previous.config_hash == extractor.config_hash:
        earlier = previous.attempts
    entry = failure_entry(extractor, exc, earlier + 1)
    state.put(record.video_id, extractor.name, entry)
    report.counts[extractor.name]["failed"] += 1
    report.failures.append(
        {
            "time": entry.attrs["failed_at"],
            "video_id": record.video_id,
            "path": record.path,
            "extractor": extractor.name,
            "error_type": entry.attrs["error_type"],
            "message": entry.attrs["error"],
            "attempt": entry.attrs["attempts"],
            "shard": job.shard,
        }
    )
