"""Running extraction over a dataset on dask.distributed.

By default a LocalCluster with one single-threaded worker process per core;
``scheduler=tcp://host:port`` joins an existing cluster, and
``cluster=slurm|pbs|sge|lsf|htcondor`` starts workers through dask-jobqueue.
``workers=0`` runs everything in this process, which is what you want under
a debugger. The unit of work is one shard for the whole group of requested
extractors; see ``pipelines.runner``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipelines.datasets import VideoRecord
from pipelines.errors import ConfigError, DiskFullError
from pipelines.process import configure_process, default_threads
from pipelines.runner import ExtractorPool, ExtractorSpec, ShardJob, ShardReport, process_shard
from pipelines.store import (
    ShardIndex,
    append_ledger,
    read_complete,
    remove_orphan_temporaries,
    store_lock,
)

PLUGIN_NAME = "hallucinate-extractors"
WORKER_LOGS = "logs"  # <out>/logs/worker-<host>-<pid>.log: each dask worker's log
PROGRESS_TOPIC = "hallucinate-progress"

# dask-jobqueue class for each batch system; looked up, never branched on.
JOBQUEUE_CLUSTERS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
}


@dataclass(frozen=True)
class ClusterOptions:
    workers: int | None = None  # None: one per core; 0: no dask, run in this process
    scheduler: str | None = None
    cluster: str = "local"
    jobqueue: dict[str, Any] = field(default_factory=dict)
    threads_per_worker: int = 1  # dask task threads: one shard at a time per worker
    # OpenCV's and torch's threads in each worker. None: this machine's cores divided
    # by the local workers (workers=0: all of them); on a scheduler or batch cluster,
    # each worker's own dask thread count (jobqueue: cores / processes).
    threads: int | None = None
    local_gpus: bool = False  # LocalCluster workers declare a GPU resource

    def local_threads(self) -> int:
        """Library threads of each process this machine runs the extraction in."""
        if self.threads is not None:
            return self.threads
        processes = 1 if self.workers == 0 else self.workers or os.cpu_count() or 1
        return default_threads(processes)


@dataclass
class RunSummary:
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    shard_errors: list[dict[str, Any]] = field(default_factory=list)
    videos: int = 0
    restarted: int = 0  # videos begun before by a worker (or run) that died inside them
    skipped_shards: int = 0
    wall_seconds: float = 0.0

    def add(self, report: ShardReport, out: Path) -> None:
        """Merges one shard's report and appends its failures to the ledger at once."""
        append_ledger(out, report.failures)
        for name, counts in report.counts.items():
            self.counts[name].update(counts)
        self.seconds.update(report.seconds)
        self.failures.extend(report.failures)
        self.videos += report.videos
        self.restarted += report.restarted

    def rate(self) -> str:
        """Videos a second, or seconds a video where that reads better (slow 1080p videos
        showed as "0.0 videos/s")."""
        if not self.videos or not self.wall_seconds:
            return "no video processed"
        per_second = self.videos / self.wall_seconds
        return f"{per_second:.1f} videos/s" if per_second >= 1 else f"{1 / per_second:.1f} s/video"

    def table(self) -> str:
        cols = ("done", "reused", "flagged", "failed", "given_up")
        header = f"{'extractor':<24}" + "".join(f"{c:>10}" for c in cols) + f"{'time (s)':>10}{'s/video':>10}"
        lines = [header, "-" * len(header)]
        for name in sorted(self.counts):
            c = self.counts[name]
            computed = c["done"] + c["flagged"] + c["failed"]
            per = self.seconds[name] / computed if computed else 0.0
            lines.append(
                f"{name:<24}"
                + "".join(f"{c[k]:>10}" for k in cols)
                + f"{self.seconds[name]:>10.2f}{per:>10.4f}"
            )
        lines.append(
            f"{self.videos} videos in {self.wall_seconds:.1f}s ({self.rate()}); "
            f"{self.skipped_shards} shard(s) already complete"
        )
        if self.restarted:
            lines.append(
                f"{self.restarted} video(s) started again: a worker (or the run) died inside them "
                "before; their finished results were kept"
            )
        return "\n".join(lines)


def auto_shard_size(n_videos: int) -> int:
    """At least ~16 shards, so workers finish together; 4 to 64 videos each."""
    return max(4, min(64, -(-n_videos // 16)))


def plan_jobs(
    records: Sequence[VideoRecord],
    specs: Sequence[ExtractorSpec],
    out: Path,
    shard_size: int | None,
    max_attempts: int,
    compression: str | None,
) -> tuple[list[ShardJob], dict[str, dict[str, dict[str, int]]]]:
    """Shard jobs that still have work, and the status counts of each complete shard."""
    out.mkdir(parents=True, exist_ok=True)
    index = ShardIndex.load(out)
    index.assign([r.video_id for r in records], shard_size or auto_shard_size(len(records)))
    index.save(out)
    where = index.video_to_shard()
    by_shard: dict[str, list[VideoRecord]] = defaultdict(list)
    for record in records:
        by_shard[where[record.video_id]].append(record)
    wanted = {spec.cls.name: spec.build().config_hash for spec in specs}
    jobs, complete = [], {}
    for shard in sorted(by_shard):
        done, counts = read_complete(out, shard)
        if all(done.get(name) == h for name, h in wanted.items()):
            complete[shard] = {name: counts.get(name, {}) for name in wanted}
            continue
        jobs.append(
            ShardJob(
                str(out),
                shard,
                by_shard[shard],
                list(specs),
                shard_videos=tuple(index.shards[shard]),
                max_attempts=max_attempts,
                compression=compression,
            )
        )
    return jobs, complete


class _ThrottledProgress:
    """Sends progress to the client at most every ``interval`` seconds.

    One event per video costs the scheduler and client CPU that, on a small
    machine, the workers need; a few events per second keep the bar live.
    """

    def __init__(self, send, interval: float = 0.25) -> None:
        self._send, self._interval = send, interval
        self._pending, self._last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self._pending += n
        if time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._send(self._pending)
        self._pending, self._last = 0, time.monotonic()


def _run_shard_task(job: ShardJob) -> ShardReport:
    """The dask task: the worker's plugin holds the extractors already set up."""
    from distributed import get_worker

    worker = get_worker()
    progress = _ThrottledProgress(lambda n: worker.log_event(PROGRESS_TOPIC, n))
    try:
        return process_shard(job, worker.plugins[PLUGIN_NAME].pool, progress)
    finally:
        progress.flush()


def _pool_plugin(threads: int | None, log_dir: Path):
    from distributed.diagnostics.plugin import WorkerPlugin

    class ExtractorPoolPlugin(WorkerPlugin):
        """Keeps loaded models alive between shards and tears them down at worker exit.

        It also sends the worker's own log to ``<out>/logs/``: dask logs a
        failed task ("Compute Failed") with its traceback, which reached the
        terminal above the one clear message the client prints (a full disk,
        say). The traceback stays, in the file that message points to.
        """

        name = PLUGIN_NAME

        def setup(self, worker) -> None:
            # Without a number, one library thread per dask thread: OpenCV's and
            # torch's own pools would otherwise oversubscribe the machine.
            configure_process(threads or worker.state.nthreads)
            self.pool = ExtractorPool()
            log_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_dir / f"worker-{socket.gethostname()}-{os.getpid()}.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            worker_log = logging.getLogger("distributed.worker")
            worker_log.addHandler(handler)
            worker_log.propagate = False
            logging.raiseExceptions = False  # a log write on a full disk must not print its own traceback

        def teardown(self, worker) -> None:
            self.pool.close()

    return ExtractorPoolPlugin()


def jobqueue_cluster(options: ClusterOptions):
    """A dask-jobqueue cluster for ``options.cluster`` built from ``options.jobqueue``.

    Nothing is submitted until it is scaled; ``cluster.job_script()`` shows
    the batch script the workers will be started with.
    """
    import dask_jobqueue

    try:
        cluster_cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[options.cluster])
    except KeyError:
        raise ConfigError(
            f"cluster={options.cluster!r} is not known; use local, "
            f"{', '.join(JOBQUEUE_CLUSTERS)}, or scheduler=tcp://host:port"
        ) from None
    # The scheduler's dashboard on a free port unless one is given: dask's default,
    # 8787, is taken by any other dask on the host and printed a warning every run.
    scheduler_options = {"dashboard_address": ":0", **options.jobqueue.get("scheduler_options", {})}
    try:
        return cluster_cls(**{**options.jobqueue, "scheduler_options": scheduler_options})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"jobqueue options for cluster={options.cluster}: {exc}") from None


@contextlib.contextmanager
def open_client(options: ClusterOptions) -> Iterator[Any]:
    """A dask Client for ``options``; clusters it starts are closed on exit."""
    from distributed import Client, LocalCluster

    if options.scheduler:
        with Client(options.scheduler) as client:
            yield client
        return
    if options.cluster != "local":
        with jobqueue_cluster(options) as cluster, Client(cluster) as client:
            cluster.scale(options.workers or 1)
            client.wait_for_workers(1)
            yield client
        return
    workers = options.workers or os.cpu_count() or 1
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=options.threads_per_worker,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            resources={"GPU": 1} if options.local_gpus else None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def run_extraction(
    records: Sequence[VideoRecord],
    specs: Sequence[ExtractorSpec],
    out: str | Path,
    options: ClusterOptions = ClusterOptions(),
    shard_size: int | None = None,
    max_attempts: int = 2,
    compression: str | None = "gzip",
    progress: bool = True,
    lock_wait: float = 0.0,
) -> RunSummary:
    """Brings ``out`` up to date for ``specs`` over ``records``; returns the summary.

    Per-video failures are recorded (shard and ledger) and never stop the
    run; a shard whose worker died is reported and resumes on the next run;
    a full disk stops the run, keeping everything finished so far. One run
    at a time holds ``out`` (``store_lock``); another waits ``lock_wait``
    seconds for it, then stops with who holds it.
    """
    out = Path(out)
    with store_lock(out, lock_wait, log=lambda text: print(text, file=sys.stderr)):
        orphans = remove_orphan_temporaries(out)
        if orphans:
            print(f"note: removed {len(orphans)} partial file(s) a killed run left in {out}", file=sys.stderr)
        return _run_extraction(records, specs, out, options, shard_size, max_attempts, compression, progress)


def _run_extraction(
    records: Sequence[VideoRecord],
    specs: Sequence[ExtractorSpec],
    out: Path,
    options: ClusterOptions,
    shard_size: int | None,
    max_attempts: int,
    compression: str | None,
    progress: bool,
) -> RunSummary:
    started = time.perf_counter()
    jobs, complete = plan_jobs(records, specs, out, shard_size, max_attempts, compression)
    summary = RunSummary(skipped_shards=len(complete))
    for shard_counts in complete.values():
        for name, counts in shard_counts.items():
            summary.counts[name]["given_up"] += counts.get("failed", 0)
            summary.counts[name]["reused"] += sum(counts.values()) - counts.get("failed", 0)
    skipped_videos = len(records) - sum(len(job.videos) for job in jobs)
    summary.videos += skipped_videos
    bar = tqdm(
        total=len(records),
        initial=skipped_videos,
        unit="video",
        desc="extract",
        disable=not progress,
        smoothing=0.1,
    )
    try:
        if options.workers == 0 and not options.scheduler and options.cluster == "local":
            configure_process(options.local_threads())
            pool = ExtractorPool()
            try:
                for job in jobs:
                    summary.add(process_shard(job, pool, bar.update), out)
            finally:
                pool.close()
        else:
            _run_on_dask(jobs, options, summary, bar, out)
    finally:
        bar.close()
        summary.wall_seconds = time.perf_counter() - started
    return summary


def gpu_resources(specs: Sequence[ExtractorSpec]) -> dict[str, int]:
    """The dask resources a shard task needs: GPU stages go to workers that declare GPUs."""
    gpus = max((spec.cls.resources.gpus for spec in specs), default=0)
    return {"GPU": gpus} if gpus else {}


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _check_gpu_workers(client, needed: dict[str, int], specs: Sequence[ExtractorSpec]) -> None:
    """Fails now, not by waiting forever, when no worker could run a GPU stage."""
    if not needed:
        return
    workers = client.scheduler_info()["workers"].values()
    if not any(w.get("resources", {}).get("GPU", 0) >= needed["GPU"] for w in workers):
        gpu_stages = [s.cls.name for s in specs if s.cls.resources.gpus]
        raise ConfigError(
            f"{', '.join(gpu_stages)} need(s) a GPU, but no dask worker declares one. Start "
            "workers with `dask worker ... --resources GPU=1` (or jobqueue.worker_extra_args="
            "[--resources,GPU=1]); a local cluster declares them itself when CUDA devices exist."
        )


def _run_on_dask(
    jobs: list[ShardJob], options: ClusterOptions, summary: RunSummary, bar: tqdm, out: Path
) -> None:
    from distributed import as_completed

    if not jobs:
        return
    needed = gpu_resources(jobs[0].extractors)
    if needed and options.cluster == "local" and not options.scheduler and _cuda_devices():
        options = dataclasses.replace(options, local_gpus=True)
    with open_client(options) as client:
        _check_gpu_workers(client, needed, jobs[0].extractors)
        local = options.cluster == "local" and not options.scheduler
        plugin = _pool_plugin(options.local_threads() if local else options.threads, out / WORKER_LOGS)
        client.register_plugin(plugin)
        client.subscribe_topic(PROGRESS_TOPIC, lambda event: bar.update(event[1]))
        futures = {
            client.submit(_run_shard_task, job, pure=False, resources=needed or None): job for job in jobs
        }
        try:
            for future in as_completed(futures):
                job = futures[future]
                try:
                    summary.add(future.result(), out)
                except DiskFullError:
                    for other in futures:
                        other.cancel()
                    raise
                except Exception as exc:  # a dead worker or a bug: this shard resumes next run
                    error = {
                        "time": time.time(),
                        "video_id": "*",
                        "path": "",
                        "extractor": "*",
                        "error_type": type(exc).__name__,
                        "message": f"shard {job.shard} did not finish ({exc}); finished videos "
                        "are staged, re-run the same command to resume it",
                        "attempt": 0,
                        "shard": job.shard,
                    }
                    summary.shard_errors.append(error)
                    append_ledger(out, [error])
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
