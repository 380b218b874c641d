import errno
import multiprocessing
import pickle

import h5py
import numpy as np
import pytest

from extractors import create_extractor
from pipelines.datasets import load_dataset, load_definition, resolve_paths
from pipelines.errors import DiskFullError
from pipelines.orchestrate import ClusterOptions, run_extraction
from pipelines.runner import ExtractorPool, ExtractorSpec, ShardJob, process_shard
from pipelines.store import (
    DONE,
    FAILED,
    FLAGGED,
    SHARDS,
    TIMESTAMPS,
    Entry,
    ShardIndex,
    ShardReader,
    Staging,
    read_ledger,
    read_shard,
    shard_path,
    write_shard,
)
from tests.helpers import CALLS_ENV, FAIL_ENV, calls_per_video

IN_PROCESS = ClusterOptions(workers=0)


def spec(name, **options):
    ex = create_extractor(name, **options)
    return ExtractorSpec(type(ex), ex.config)


@pytest.fixture
def demo_records(tiny_demo_root):
    defn = load_definition("demo")
    return load_dataset(defn, resolve_paths(defn, tiny_demo_root)).records


def _entry(value: float) -> Entry:
    return Entry(DONE, {"x": np.full(100, value, np.float32)}, attrs={"config_hash": "h", "version": "1"})


def test_shard_roundtrip_and_id_escaping(tmp_path):
    path = tmp_path / "s.h5"
    write_shard(
        path,
        {("a/b", "e"): _entry(1.0), ("c", "e"): Entry(FLAGGED, flags={"no_audio": "none"})},
        {"e": "h"},
        {"a/b": {"split": "train"}},
    )
    entries, complete = read_shard(path, with_arrays=True)
    assert complete == {"e": "h"}
    assert entries[("a/b", "e")].arrays["x"][0] == 1.0
    assert entries[("c", "e")].status == FLAGGED and entries[("c", "e")].flags == {"no_audio": "none"}
    with h5py.File(path) as f:
        assert f["a%2Fb"]["e"]["x"].compression == "gzip"
        assert f["a%2Fb"].attrs["split"] == "train"


def test_rewrite_keeps_old_entries_and_replaces_new(tmp_path):
    path = tmp_path / "s.h5"
    write_shard(path, {("v", "e1"): _entry(1.0), ("v", "e2"): _entry(2.0)}, {}, {})
    write_shard(path, {("v", "e2"): _entry(3.0), ("w", "e1"): _entry(4.0)}, {}, {})
    entries, _ = read_shard(path, with_arrays=True)
    assert {k: float(e.arrays["x"][0]) for k, e in entries.items()} == {
        ("v", "e1"): 1.0,
        ("v", "e2"): 3.0,
        ("w", "e1"): 4.0,
    }


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_write_leaves_old_shard_whole(tmp_path, monkeypatch, error):
    path = tmp_path / "s.h5"
    write_shard(path, {("v", "e"): _entry(1.0)}, {"e": "h"}, {})
    before = path.read_bytes()
    import pipelines.store as store

    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(store, "_write_entry", explode)
    expected = DiskFullError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as info:
        write_shard(path, {("w", "e"): _entry(2.0)}, {"e": "h"}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary file left
    if expected is DiskFullError:
        assert str(path) in str(info.value) and "re-run" in str(info.value)


def test_reader_fast_path_and_compressed_fallback_agree(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((40, 3)).astype(np.float32)
    sparse = np.zeros(5000, np.float32)
    sparse[::97] = 1.0
    index = ShardIndex()
    index.assign(["v"], 1)
    index.save(tmp_path)
    entry = Entry(DONE, {"dense": dense, "sparse": sparse, "tiny": np.arange(3)}, attrs={"config_hash": "h"})
    write_shard(shard_path(tmp_path, "shard-00000"), {("v", "e"): entry}, {}, {})
    with h5py.File(shard_path(tmp_path, "shard-00000"), "r") as f:
        assert f["v/e/dense"].compression is None and f["v/e/dense"].chunks is None
        assert f["v/e/sparse"].compression == "gzip"
    reader = ShardReader(tmp_path)
    table = reader._tables[reader._shard("v")]["v"]
    assert "e/dense" in table and "e/sparse" not in table  # served by pread / by h5py
    for name, want in (("dense", dense), ("sparse", sparse), ("tiny", np.arange(3))):
        got = reader.get("v", f"e/{name}")
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and got.flags.writeable


def test_staging_roundtrip_and_markers(tmp_path):
    staging = Staging(tmp_path, "shard-00000")
    staging.put("v/1", "audio.logmel", _entry(5.0))
    staging.put("v/1", "other", Entry(FAILED, attrs={"attempts": 1, "config_hash": "h"}))
    staging.mark_started("v/1", 2)
    got = staging.entries()
    assert got[("v/1", "audio.logmel")].arrays["x"][0] == 5.0
    assert got[("v/1", "other")].attempts == 1
    assert staging.starts("v/1") == 2 and staging.starts("w") == 0
    assert not list(staging.dir.glob(".*tmp*"))
    staging.clear()
    assert staging.entries() == {}


def test_index_assignments_are_permanent(tmp_path):
    index = ShardIndex()
    assert index.assign(["a", "b", "c"], 2) == ["shard-00000", "shard-00001"]
    index.save(tmp_path)
    again = ShardIndex.load(tmp_path)
    assert again.assign(["e", "a", "b", "c", "d"], 2) == ["shard-00002"]
    assert again.shards == {"shard-00000": ["a", "b"], "shard-00001": ["c"], "shard-00002": ["e", "d"]}


def _read_in_child(reader, vid, queue):
    queue.put(reader.get(vid, "test.frame_stats/mean").tolist())


def test_reader_is_fork_and_pickle_safe(tmp_path, demo_records):
    run_extraction(demo_records[:4], [spec("test.frame_stats")], tmp_path, IN_PROCESS, progress=False)
    reader = ShardReader(tmp_path)
    vid = demo_records[0].video_id
    expected = reader.get(vid, "test.frame_stats/mean").tolist()  # opens a handle pre-fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.get(vid, "test.frame_stats/mean").tolist() == expected
    for method in ("fork", "spawn"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(reader, vid, queue))
        child.start()
        assert queue.get(timeout=60) == expected
        child.join()
    with pytest.raises(KeyError, match="not in the index"):
        reader.get("nope", "test.frame_stats/mean")
    with pytest.raises(KeyError, match="no descriptor 'test.frame_stats/nope'"):
        reader.get(vid, "test.frame_stats/nope")


def test_reader_without_extraction_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make extract"):
        ShardReader(tmp_path)


def test_outputs_provenance_and_dependencies(tmp_path, demo_records):
    specs = [spec("test.scaled_mean"), spec("test.frame_stats")]
    summary = run_extraction(demo_records[:3], specs, tmp_path, IN_PROCESS, shard_size=2, progress=False)
    assert summary.counts["test.frame_stats"]["done"] == 3
    reader = ShardReader(tmp_path)
    vid = demo_records[0].video_id
    mean = reader.get(vid, "test.frame_stats/mean")
    np.testing.assert_allclose(reader.get(vid, "test.scaled_mean/scaled"), 2 * mean, rtol=1e-6)
    stamps = reader.get(vid, f"test.frame_stats/{TIMESTAMPS}")
    np.testing.assert_allclose(np.diff(stamps), 1 / 6, atol=1e-6)
    assert len(stamps) == len(reader.get(vid, "test.frame_stats/per_frame"))
    attrs = reader.entry(vid, "test.frame_stats").attrs
    assert attrs["frames_fps"] == 6.0 and list(attrs["frames_size"]) == [64, 48]
    assert attrs["extractor"] == "test.frame_stats" and attrs["config_hash"]


def test_rerun_reuses_and_config_change_recomputes_only_that(tmp_path, demo_records, monkeypatch):
    calls = tmp_path / "calls"
    monkeypatch.setenv(CALLS_ENV, str(calls))
    out = tmp_path / "out"
    specs = [spec("test.frame_stats"), spec("audio.logmel")]
    run_extraction(demo_records[:6], specs, out, IN_PROCESS, shard_size=4, progress=False)
    assert sum(calls_per_video(calls).values()) == 6
    again = run_extraction(demo_records[:6], specs, out, IN_PROCESS, shard_size=4, progress=False)
    assert again.skipped_shards == 2 and again.counts["test.frame_stats"]["reused"] == 6
    assert sum(calls_per_video(calls).values()) == 6
    changed = [spec("test.frame_stats"), spec("audio.logmel", n_mels=32)]
    third = run_extraction(demo_records[:6], changed, out, IN_PROCESS, shard_size=4, progress=False)
    assert third.counts["audio.logmel"]["done"] + third.counts["audio.logmel"]["flagged"] == 6
    assert third.counts["test.frame_stats"]["reused"] == 6
    assert sum(calls_per_video(calls).values()) == 6
    assert ShardReader(out).get(demo_records[0].video_id, "audio.logmel/pyramid").size == 7 * 32


def test_failed_video_is_retried_once_then_given_up(tmp_path, demo_records, monkeypatch):
    calls, fail = tmp_path / "calls", tmp_path / "fail"
    fail.mkdir()
    bad = demo_records[1].video_id
    (fail / bad).touch()
    monkeypatch.setenv(CALLS_ENV, str(calls))
    monkeypatch.setenv(FAIL_ENV, str(fail))
    out = tmp_path / "out"
    specs = [spec("test.frame_stats")]
    for expected_calls in (1, 2, 2):
        summary = run_extraction(demo_records[:3], specs, out, IN_PROCESS, progress=False)
        assert calls_per_video(calls)[bad] == expected_calls
    assert summary.counts["test.frame_stats"]["given_up"] == 1
    ledger = read_ledger(out)
    assert [(r["video_id"], r["attempt"], r["error_type"]) for r in ledger] == [
        (bad, 1, "RuntimeError"),
        (bad, 2, "RuntimeError"),
    ]
    assert demo_records[1].path in ledger[0]["path"] and "planted failure" in ledger[0]["message"]
    reader = ShardReader(out)
    assert reader.entry(bad, "test.frame_stats").status == FAILED
    assert reader.get(demo_records[0].video_id, "test.frame_stats/mean").shape == (3,)


def test_interrupted_shard_resumes_without_recomputing(tmp_path, demo_records, monkeypatch):
    calls = tmp_path / "calls"
    monkeypatch.setenv(CALLS_ENV, str(calls))
    out = tmp_path / "out"
    index = ShardIndex()
    index.assign([r.video_id for r in demo_records[:5]], 5)
    index.save(out)
    job = ShardJob(str(out), "shard-00000", demo_records[:5], [spec("test.frame_stats")])
    seen = []

    def stop_after_three(n):
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the process is interrupted in the middle of the shard

    with pytest.raises(KeyboardInterrupt):
        process_shard(job, ExtractorPool(), stop_after_three)
    assert not shard_path(out, "shard-00000").exists()
    assert len(Staging(out, "shard-00000").entries()) == 3
    report = process_shard(job, ExtractorPool())
    assert report.counts["test.frame_stats"] == {"reused": 3, "done": 2}
    assert set(calls_per_video(calls).values()) == {1}
    assert not (out / "staging" / "shard-00000").exists()
    assert len(read_shard(shard_path(out, "shard-00000"))[0]) == 5


def test_video_that_keeps_killing_workers_is_given_up(tmp_path, demo_records):
    out = tmp_path / "out"
    index = ShardIndex()
    index.assign([r.video_id for r in demo_records[:3]], 3)
    index.save(out)
    poison = demo_records[1].video_id
    Staging(out, "shard-00000").mark_started(poison, 2)  # two workers died inside it already
    job = ShardJob(str(out), "shard-00000", demo_records[:3], [spec("test.frame_stats")])
    report = process_shard(job, ExtractorPool())
    assert report.counts["test.frame_stats"] == {"done": 2, "failed": 1}
    assert "cut off 2 times" in report.failures[0]["message"]
    assert "max_attempts=3" in report.failures[0]["message"]  # the way on, if the user killed the run
    assert report.failures[0]["path"] == demo_records[1].path


def test_ctrl_c_inside_a_video_does_not_charge_it(tmp_path, demo_records, monkeypatch):
    """A user's Ctrl-C is no evidence against the video being processed, unlike a dead worker."""
    from tests.helpers import FrameStats

    out = tmp_path / "out"
    index = ShardIndex()
    index.assign([r.video_id for r in demo_records[:2]], 2)
    index.save(out)
    staging = Staging(out, "shard-00000")
    staging.mark_started(demo_records[0].video_id, 1)  # one earlier attempt died inside it
    monkeypatch.setattr(
        FrameStats, "process", lambda self, video, inputs: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    job = ShardJob(str(out), "shard-00000", demo_records[:2], [spec("test.frame_stats")])
    with pytest.raises(KeyboardInterrupt):
        process_shard(job, ExtractorPool())
    assert staging.starts(demo_records[0].video_id) == 1


def test_disk_full_stops_the_run_and_keeps_finished_work(tmp_path, demo_records, monkeypatch):
    out = tmp_path / "out"
    specs = [spec("test.frame_stats")]
    real_put = Staging.put
    puts = []

    def put_until_full(self, *args):
        if len(puts) == 4:
            raise DiskFullError(self.dir)
        puts.append(args)
        real_put(self, *args)

    monkeypatch.setattr(Staging, "put", put_until_full)
    with pytest.raises(DiskFullError, match="re-run"):
        run_extraction(demo_records[:6], specs, out, IN_PROCESS, shard_size=3, progress=False)
    monkeypatch.setattr(Staging, "put", real_put)
    for path in (out / SHARDS).glob("*.h5"):
        read_shard(path)  # every shard that exists is whole
    summary = run_extraction(demo_records[:6], specs, out, IN_PROCESS, shard_size=3, progress=False)
    assert summary.counts["test.frame_stats"]["reused"] == 4
    assert summary.counts["test.frame_stats"]["done"] == 2


def test_the_run_summary_rate_reads_as_seconds_per_video_when_slow():
    from pipelines.orchestrate import RunSummary

    assert RunSummary(videos=30, wall_seconds=10.0).rate() == "3.0 videos/s"
    assert RunSummary(videos=2, wall_seconds=50.0).rate() == "25.0 s/video"  # was "0.0 videos/s"
    assert RunSummary().rate() == "no video processed"
    assert "25.0 s/video" in RunSummary(videos=2, wall_seconds=50.0).table()
