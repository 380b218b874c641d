"""Extraction on real cluster engines: a one-node SLURM cluster started on this host
(``tests/cluster/slurm_up.sh``) with workers submitted through ``sbatch`` by
dask-jobqueue, and a dask scheduler and workers started as separate OS processes.
Workers are killed mid-run (``scancel``, SIGKILL); the stores must then equal a
local run's, with every shard readable and nothing lost.

SLURM is installed from Debian's packages when missing (root only). Where it cannot
be, the SLURM tests skip and say why, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.store import read_shard
from tests.helpers import SLOW_ENV

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "cluster"
# The CLI in a child process, with the test extractors registered (their workers import them too).
CLI = [
    sys.executable,
    "-c",
    "import sys, tests.helpers; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))",
]


def store_contents(out: Path) -> dict:
    """(video, extractor) -> (status, flags, arrays) over every shard: each shard must read."""
    contents = {}
    for shard in sorted((out / "shards").glob("*.h5")):
        entries, _ = read_shard(shard, with_arrays=True)
        for key, entry in entries.items():
            contents[key] = (entry.status, entry.flags, entry.arrays)
    return contents


def assert_same_store(got: Path, want: Path) -> None:
    a, b = store_contents(got), store_contents(want)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key, (status, flags, arrays) in b.items():
        other = a[key]
        assert other[0] == status and other[1] == flags, key
        assert set(other[2]) == set(arrays), key
        for name, value in arrays.items():
            np.testing.assert_array_equal(other[2][name], value, err_msg=f"{key} {name}")


def extract_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", f"data_root={data_root}", f"out={out}", "progress=false", *extra]


@pytest.fixture(scope="module")
def local_store(tiny_demo_root, tmp_path_factory) -> Path:
    """The reference: the same extraction in this process, no dask."""
    out = tmp_path_factory.mktemp("local") / "store"
    assert (
        main(extract_args(tiny_demo_root, out, "extractors=test.frame_stats,audio.logmel", "workers=0")) == 0
    )
    return out


# ---------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for this module, torn down after it; yields its SLURM_CONF."""
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_up.sh"), str(state)], capture_output=True, text=True, timeout=900
    )
    if up.returncode != 0:
        why = (up.stdout + up.stderr).strip() or f"slurm_up.sh exited {up.returncode}"
        if up.returncode == 3 and not os.environ.get("CI"):
            pytest.skip(f"no SLURM on this machine: {why}")
        pytest.fail(f"could not start SLURM: {why}; logs in {state}")
    conf = up.stdout.strip().rpartition("=")[2]
    try:
        yield {"SLURM_CONF": conf, "state": state}
    finally:
        subprocess.run(["bash", str(SCRIPTS / "slurm_down.sh"), str(state)], check=False, timeout=60)


def slurm_args(state: Path, workers: int = 2) -> list[str]:
    return [
        "cluster=slurm",
        f"workers={workers}",
        "jobqueue.cores=1",
        "jobqueue.processes=1",
        "jobqueue.memory=2GB",
        "jobqueue.walltime=00:20:00",
        f"jobqueue.log_directory={state / 'jobs'}",
    ]


def our_jobs(conf: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": conf},
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["RUNNING"]]


def test_extraction_through_sbatch_jobs_equals_a_local_run(
    slurm, tiny_demo_root, local_store, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.chdir(ROOT)  # the jobs start in the submission directory, where tests/ imports from
    out = tmp_path / "store"
    jobs_dir = slurm["state"] / "jobs"
    before = set(jobs_dir.glob("*.err")) if jobs_dir.is_dir() else set()
    args = extract_args(tiny_demo_root, out, "extractors=test.frame_stats,audio.logmel", "shard_size=5")
    assert main([*args, *slurm_args(slurm["state"])]) == 0
    assert_same_store(out, local_store)
    started = set(jobs_dir.glob("*.err")) - before
    # The work ran in batch jobs (a job's log exists once it starts; on a busy machine the
    # first job can finish the 30 clips before the second starts, so at least one).
    assert started and any("Registered to" in f.read_text() for f in started)


def test_a_worker_job_cancelled_mid_shard_loses_nothing(slurm, tiny_demo_root, local_store, tmp_path):
    """``scancel`` one of two worker jobs once shards are being written: dask moves its
    shard to the other worker, finished results stay, and the store ends equal to a local run's."""
    env = {**os.environ, "SLURM_CONF": slurm["SLURM_CONF"], SLOW_ENV: "1.0", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "store"
    args = extract_args(tiny_demo_root, out, "extractors=test.frame_stats,audio.logmel", "shard_size=3")
    command = [*CLI, *args, *slurm_args(slurm["state"])]
    run = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            jobs = our_jobs(slurm["SLURM_CONF"])
            if len(jobs) == 2 and len(list((out / "shards").glob("*.h5"))) >= 1:
                break
            time.sleep(0.2)
        assert run.poll() is None, "the run finished before a job could be cancelled: make it slower"
        assert len(jobs) == 2, f"two worker jobs never ran at once: {jobs}"
        written_before = {p.name for p in (out / "shards").glob("*.h5")}
        subprocess.run(["scancel", jobs[0]], check=True, env=env)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    if run.returncode != 0:  # the shard of the cancelled job may be left for the next run
        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, output + again.stdout + again.stderr
    assert written_before <= {p.name for p in (out / "shards").glob("*.h5")}  # finished shards kept
    assert_same_store(out, local_store)


# ---------------------------------------------------------------- a dask cluster in other processes


def _start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), SLOW_ENV: "0.3"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture
def dask_processes(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes (no nanny, so a killed worker stays
    dead); the first declares a GPU. Yields (address, {pid: declares a GPU})."""
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    info = tmp_path / "scheduler.json"
    procs = [
        _start(
            [dask, "scheduler", "--scheduler-file", str(info), "--port", "0", "--dashboard-address", ":0"],
            tmp_path / "scheduler.log",
        )
    ]
    try:
        for i, extra in enumerate((["--resources", "GPU=1"], [])):
            worker = [dask, "worker", "--scheduler-file", str(info), "--nthreads", "1", "--no-nanny", *extra]
            deadline = time.monotonic() + 60
            while not info.is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            procs.append(_start(worker, tmp_path / f"worker{i}.log"))
        with Client(scheduler_file=str(info), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
            pids = client.run(os.getpid)
            workers = client.scheduler_info()["workers"]
            gpu = {pid: bool(workers[a].get("resources", {}).get("GPU")) for a, pid in pids.items()}
        yield address, gpu, procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_extraction_on_a_scheduler_in_another_process_survives_a_killed_worker(
    dask_processes, tiny_demo_root, local_store, tmp_path
):
    address, gpu, procs = dask_processes
    out = tmp_path / "store"
    args = extract_args(tiny_demo_root, out, "extractors=test.frame_stats,audio.logmel", "shard_size=3")
    command = [*CLI, *args, f"scheduler={address}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None and not list((out / "shards").glob("*.h5")):
            time.sleep(0.1)
        assert run.poll() is None, "the run finished before a worker could be killed"
        victim = procs[2]  # the worker without a GPU
        os.kill(victim.pid, signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    if run.returncode != 0:
        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
    assert victim.poll() is not None  # it stayed dead: the other worker finished the run
    assert_same_store(out, local_store)


def test_a_gpu_stage_runs_only_on_the_worker_that_declares_a_gpu(dask_processes, tiny_demo_root, tmp_path):
    address, gpu, _ = dask_processes
    out = tmp_path / "store"
    args = extract_args(
        tiny_demo_root, out, "extractors=test.gpu_pid", "shard_size=2", f"scheduler={address}"
    )
    assert main(args) == 0
    pids = {int(arrays["pid"][0]) for (_, extractor), (_, _, arrays) in store_contents(out).items()}
    assert len(store_contents(out)) == 30
    assert pids and all(gpu[p] for p in pids), (pids, gpu)  # never on the worker without one
