"""End to end on the demo dataset, through the CLI, on a 2-worker LocalCluster."""

import json

import dask
import distributed  # noqa: F401  (its config defaults, before dask.config.set adds to them)
import h5py
import pytest

from pipelines.cli import main
from pipelines.store import SHARDS, ShardIndex, ShardReader, read_ledger
from tests.conftest import add_to_manifest
from tests.helpers import CALLS_ENV, CRASH_ENV, DISK_FULL_ENV, calls_per_video, write_broken_videos

pytestmark = pytest.mark.slow


def extract(data_root, out, *extra):
    return main(
        [
            "extract",
            "dataset=demo",
            f"data_root={data_root}",
            f"out={out}",
            "workers=2",
            "progress=false",
            "shard_size=8",
            *extra,
        ]
    )


def all_shards_readable(out):
    for path in (out / SHARDS).iterdir():
        assert path.suffix == ".h5" and not path.name.startswith("."), f"stray file {path}"
        with h5py.File(path, "r", locking=False) as f:
            json.loads(f.attrs["complete"])


def test_bad_inputs_are_recorded_and_the_run_goes_on(demo_copy, tmp_path, capsys):
    files = write_broken_videos(demo_copy / "demo" / "videos" / "broken")
    add_to_manifest(demo_copy, files)
    out = tmp_path / "out"
    assert extract(demo_copy, out, "extractors=audio.logmel,test.frame_stats") == 0
    ledger = read_ledger(out)
    failed = {(row["video_id"], row["extractor"]) for row in ledger}
    for kind in ("corrupt", "truncated", "zero_byte", "video_less"):
        assert (kind, "test.frame_stats") in failed
        row = next(r for r in ledger if r["video_id"] == kind and r["extractor"] == "test.frame_stats")
        assert str(files[kind]) in row["message"] and row["path"] == str(files[kind])
    assert ("corrupt", "audio.logmel") in failed and ("zero_byte", "audio.logmel") in failed
    reader = ShardReader(out)
    for kind in ("silent", "no_audio"):
        assert "no_audio" in reader.entry(kind, "audio.logmel").flags
        assert reader.get(kind, "test.frame_stats/mean").shape == (3,)
    good = [v for v in reader.video_ids if v not in files]
    assert len(good) == 30
    for vid in good:
        assert reader.get(vid, "test.frame_stats/per_frame").shape[1] == 3
    printed = capsys.readouterr().out
    assert "failure(s) recorded" in printed and "test.frame_stats" in printed
    all_shards_readable(out)
    assert main(["inspect", f"out={out}"]) == 0
    assert "corrupt" in capsys.readouterr().out


def test_worker_killed_mid_shard_resumes_without_loss(demo_copy, tmp_path, monkeypatch, capsys):
    out, calls, crash = tmp_path / "out", tmp_path / "calls", tmp_path / "crash"
    crash.mkdir()
    monkeypatch.setenv(CALLS_ENV, str(calls))
    monkeypatch.setenv(CRASH_ENV, str(crash))
    # Shard assignment is deterministic: compute it to plant the crash mid-shard.
    index = ShardIndex()
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition("demo")
    ids = [r.video_id for r in load_dataset(defn, resolve_paths(defn, demo_copy)).records]
    index.assign(ids, 8)
    victim = index.shards["shard-00000"][4]
    (crash / victim).touch()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        assert extract(demo_copy, out, "extractors=test.frame_stats") == 1
    assert "re-run the same command" in capsys.readouterr().out
    assert any(r["shard"] == "shard-00000" and r["video_id"] == "*" for r in read_ledger(out))
    all_shards_readable(out)
    before = calls_per_video(calls)
    assert all(before.get(v) == 1 for v in index.shards["shard-00000"][:4])

    (crash / victim).unlink()
    capsys.readouterr()
    assert extract(demo_copy, out, "extractors=test.frame_stats") == 0
    assert "1 video(s) started again: a worker (or the run) died inside them" in capsys.readouterr().out
    after = calls_per_video(calls)
    assert set(after) == set(ids)
    for vid in ids:  # nothing finished was recomputed; only the victim ran twice
        assert after[vid] == (2 if vid == victim else 1), vid
    reader = ShardReader(out)
    assert all(reader.get(v, "test.frame_stats/mean").shape == (3,) for v in ids)
    all_shards_readable(out)
    assert not (out / "staging" / "shard-00000").exists()


def test_video_that_always_kills_its_worker_is_given_up(demo_copy, tmp_path, monkeypatch):
    out, crash = tmp_path / "out", tmp_path / "crash"
    crash.mkdir()
    monkeypatch.setenv(CRASH_ENV, str(crash))
    (crash / "ball_bounce_002").touch()
    assert extract(demo_copy, out, "extractors=test.frame_stats") == 0
    [row] = [r for r in read_ledger(out) if r["video_id"] == "ball_bounce_002"]
    assert "cut off 2 times" in row["message"]
    reader = ShardReader(out)
    assert reader.entry("ball_bounce_002", "test.frame_stats").status == "failed"
    assert len([v for v in reader.video_ids if reader.entry(v, "test.frame_stats").status == "done"]) == 29


def test_disk_full_stops_cleanly_and_resumes(demo_copy, tmp_path, monkeypatch, capsys):
    out, full = tmp_path / "out", tmp_path / "full"
    full.mkdir()
    monkeypatch.setenv(DISK_FULL_ENV, str(full))
    (full / "box_slide_001").touch()
    assert extract(demo_copy, out, "extractors=test.frame_stats") == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "re-run the same command to resume" in err
    all_shards_readable(out)
    (full / "box_slide_001").unlink()
    assert extract(demo_copy, out, "extractors=test.frame_stats") == 0
    reader = ShardReader(out)
    assert all(reader.entry(v, "test.frame_stats").status == "done" for v in reader.video_ids)


def test_gpu_stage_without_gpu_workers_fails_clearly(demo_copy, tmp_path, capsys, monkeypatch):
    import pipelines.orchestrate as orchestrate

    monkeypatch.setattr(orchestrate, "_cuda_devices", lambda: 0)
    assert extract(demo_copy, tmp_path / "out", "extractors=test.needs_gpu") == 2
    err = capsys.readouterr().err
    assert "test.needs_gpu" in err and "--resources GPU=1" in err


def test_gpu_stage_runs_on_workers_that_declare_gpus(demo_copy, tmp_path, monkeypatch):
    import pipelines.orchestrate as orchestrate

    monkeypatch.setattr(orchestrate, "_cuda_devices", lambda: 1)  # as on a CUDA machine
    assert extract(demo_copy, tmp_path / "out", "extractors=test.needs_gpu") == 0
    reader = ShardReader(tmp_path / "out")
    assert all(reader.get(v, "test.needs_gpu/mean").shape == (3,) for v in reader.video_ids)
