"""The fault matrix as tests: every kind of bad input through ``hallucinate extract``,
as a folder dataset a user brings, and what the user then sees.

Each row asserts the user-facing result (exit status, the message naming the
file and the fix), the ledger entry or the flag, that no video is lost from
the store, and that every shard reads in full. A fast extractor subset
(audio, flow and what reads flow) keeps it quick; the flags and failures it
exercises are the runner's, shared by every extractor.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.encode import write_audio_only, write_video
from pipelines.store import ShardReader, read_ledger
from tests.helpers import moving_frames, tone

FAST = "extractors=audio.logmel,flow,off.hofmbh,sdf.spectral_residual"


def _zoo(videos: Path) -> dict[str, str]:
    """Bad and awkward inputs beside good ones, in one class folder; name -> file name."""
    videos.mkdir(parents=True)
    frames = moving_frames(36)
    names: dict[str, str] = {}

    def put(key: str, name: str) -> Path:
        names[key] = name
        return videos / name

    write_video(put("good", "good.mp4"), frames, 12, tone(3, 440), faststart=True)
    good = (videos / "good.mp4").read_bytes()
    write_video(put("good_moov_last", "good moov last.mp4"), frames, 12, tone(3, 440))
    moov_last = (videos / "good moov last.mp4").read_bytes()
    put("corrupt", "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(20_000))
    put("truncated", "truncated.mp4").write_bytes(moov_last[: len(moov_last) // 3])  # index lost
    put("truncated_faststart", "truncated_faststart.mp4").write_bytes(good[: len(good) // 3])
    put("zero_byte", "zero_byte.mp4").write_bytes(b"")
    os.symlink(videos / "nowhere.mp4", put("broken_link", "broken_link.mp4"))
    write_audio_only(put("audio_only", "audio_only.mp4"), tone(2, 440))
    write_video(put("no_audio", "no_audio.mp4"), frames, 12, None)
    write_video(put("silent", "silent.mp4"), frames, 12, np.zeros(36000, np.float32))
    write_video(put("one_frame", "one_frame.mp4"), frames[:1], 12, None)
    write_video(
        put("huge", "huge.mp4"), np.repeat(np.repeat(frames[:3], 40, 1), 40, 2), 12, None
    )  # 2560x1920
    write_video(put("odd_name", "a clip @ 50% #1 — été.mp4"), frames, 12, None)
    return names


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    names = _zoo(root / "videos" / "things")
    definition = root / "zoo.yaml"
    definition.write_text(f"name: zoo\nformat: folder\nroot: {root}\nsplit_seed: 0\n")
    store = root / "features"
    args = [f"dataset={definition}", f"out={store}", "workers=0", "progress=false", FAST]
    code = main(["extract", *args])
    return {"root": root, "names": names, "store": store, "args": args, "code": code}


def _by_video(store: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in read_ledger(store):
        rows.setdefault(Path(row["path"]).name, []).append(row)
    return rows


def test_the_run_goes_on_and_loses_no_video(zoo_run):
    assert zoo_run["code"] == 0  # bad videos are recorded, not fatal
    reader = ShardReader(zoo_run["store"])
    stems = {Path(n).stem for n in zoo_run["names"].values()}
    assert len(reader.video_ids) == len(stems)  # every video has its place in the store
    for vid in reader.video_ids:  # and every shard reads in full
        for name in reader.extractors(vid):
            entry = reader.entry(vid, name)
            for key in reader.arrays(vid, name):
                assert np.isfinite(reader.get(vid, f"{name}/{key}").astype(np.float64)).all()
            assert entry.status in ("done", "flagged", "failed")


@pytest.mark.parametrize(
    "key, words",
    [
        ("corrupt", ["cannot be decoded", "re-encode"]),
        ("truncated", ["truncated", "index (the moov box", "re-download"]),
        ("truncated_faststart", ["truncated", "re-download"]),
        ("zero_byte", ["file is empty"]),
        ("broken_link", ["file not found"]),
        ("audio_only", ["no video stream", "folder dataset"]),
    ],
)
def test_each_bad_file_has_a_ledger_entry_that_names_it_and_the_fix(zoo_run, key, words):
    name = zoo_run["names"][key]
    rows = _by_video(zoo_run["store"]).get(name)
    assert rows, f"{name}: no ledger entry"
    for row in rows:
        assert name in row["message"], row
        for word in words:
            assert word.lower() in row["message"].lower(), (word, row["message"])
        assert "Error: " not in row["message"]  # a user's error, not a bug's repr


def test_legitimate_absences_are_flagged_not_failed(zoo_run):
    reader = ShardReader(zoo_run["store"])
    ledger = _by_video(zoo_run["store"])
    stem = {k: Path(v).stem for k, v in zoo_run["names"].items()}
    assert "no_audio" in reader.entry(stem["no_audio"], "audio.logmel").flags
    assert "silent track" in reader.entry(stem["silent"], "audio.logmel").flags["no_audio"]
    one = stem["one_frame"]
    for name in ("flow", "off.hofmbh"):  # flow needs two frames; what reads it is absent too
        entry = reader.entry(one, name)
        assert entry.status == "flagged" and "too_few_frames" in entry.flags, (name, entry.flags)
    assert zoo_run["names"]["one_frame"] not in ledger  # a named condition, not a failure
    for key in ("huge", "odd_name", "good", "good_moov_last"):
        for name in reader.extractors(stem[key]):
            assert reader.entry(stem[key], name).status in ("done", "flagged"), (key, name)


def test_a_declared_audio_track_that_stops_early_is_truncated_not_silent(tmp_path):
    """A cut-short MP4 that still decodes some frames but little of its sound is a decode
    failure, retried after a re-download, never masked as a silent track."""
    from pipelines.decode import read_audio
    from pipelines.errors import CutShortError, TruncatedVideoError

    good = tmp_path / "good.mp4"
    write_video(good, moving_frames(36), 12, tone(3, 440), faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    from extractors.base import AudioSpec

    assert read_audio(good, AudioSpec()).samples.size > 0
    with pytest.raises((TruncatedVideoError, CutShortError), match="truncated"):
        read_audio(cut, AudioSpec())


def test_a_rerun_with_nothing_changed_recomputes_nothing(zoo_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in Path(zoo_run["store"]).rglob("*.h5")}
    capsys.readouterr()
    assert main(["extract", *zoo_run["args"]]) == 0
    table = capsys.readouterr().out
    for line in table.splitlines():
        if line.startswith(("audio.logmel", "flow", "off.hofmbh", "sdf.spectral_residual")):
            assert line.split()[1] == "0", line  # nothing done again
    ledger = read_ledger(zoo_run["store"])
    retried = [r for r in ledger if r.get("attempt", 1) > 1]
    # Failed videos get one retry (max_attempts=2); settled ones are never touched again.
    assert {Path(r["path"]).name for r in retried} <= {
        zoo_run["names"][k]
        for k in ("corrupt", "truncated", "truncated_faststart", "zero_byte", "broken_link", "audio_only")
    }
    after = {p: p.stat().st_mtime_ns for p in Path(zoo_run["store"]).rglob("*.h5")}
    with_failures = {row["shard"] for row in ledger}
    settled = [p for p in before if p.stem not in with_failures]
    assert settled and all(after[p] == before[p] for p in settled)  # not even rewritten


def test_an_option_change_recomputes_that_extractor_only(zoo_run, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(zoo_run["store"], store)
    args = [a if not a.startswith("out=") else f"out={store}" for a in zoo_run["args"]]
    capsys.readouterr()
    assert main(["extract", *args, "options.off.hofmbh.grid=[2,2,2]"]) == 0
    rows = {
        line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()
    }
    assert int(rows["off.hofmbh"][1]) > 0  # recomputed
    for name in ("audio.logmel", "sdf.spectral_residual"):
        assert rows[name][1] == "0", rows[name]


def _hold_lock(store: Path, seconds: float):
    """Another run, as far as the store can tell: a process that holds its lock."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pipelines.store import store_lock\n"
        f"with store_lock({str(store)!r}):\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_store_says_who_holds_it_or_waits(zoo_run, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(zoo_run["store"], store)
    args = [a if not a.startswith("out=") else f"out={store}" for a in zoo_run["args"]]
    holder = _hold_lock(store, 4)
    try:
        capsys.readouterr()
        assert main(["extract", *args]) == 2
        err = capsys.readouterr().err
        assert f"another run holds this store (pid {holder.pid} on" in err and "It is alive" in err
        assert "lock_wait=" in err
        before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if not p.name.startswith(".lock")}
        assert main(["extract", *args]) == 2
        after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if not p.name.startswith(".lock")}
        assert after == before  # the refused run touched nothing
        assert main(["extract", *args, "lock_wait=30"]) == 0  # waits for the holder, then reuses
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_runs_lock_is_not_stale(zoo_run, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(zoo_run["store"], store)
    args = [a if not a.startswith("out=") else f"out={store}" for a in zoo_run["args"]]
    holder = _hold_lock(store, 60)
    holder.kill()  # kill -9: no clean-up ran, its holder note is still there
    holder.wait()
    assert (store / ".lock.holder").exists()
    capsys.readouterr()
    assert main(["extract", *args]) == 0
    err = capsys.readouterr().err
    assert f"an earlier run on {store} was interrupted (pid {holder.pid} on" in err
    assert not (store / ".lock.holder").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, which extraction fills; skips where mounting is not allowed (CI runs as root)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip() or 'not root'}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_message_and_resumes(tiny_demo_root, small_disk, tmp_path, capfd):
    import subprocess

    store = small_disk / "store"
    args = [f"data_root={tiny_demo_root}", "workers=2", "progress=false", "extractors=audio.logmel,flow"]
    args.append("options.flow.store=float16")  # the flow field fills 3 MB within a few videos
    capfd.readouterr()
    assert main(["extract", *args, f"out={store}"]) == 2
    err = capfd.readouterr().err
    assert "no space left on the device" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err and "Compute Failed" not in err  # dask's log is in logs/
    assert any("Compute Failed" in p.read_text() for p in (store / "logs").glob("worker-*.log"))
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    assert main(["extract", *args, f"out={store}"]) == 0
    clean = tmp_path / "clean"
    assert main(["extract", *args, f"out={clean}"]) == 0
    resumed, fresh = ShardReader(store), ShardReader(clean)
    assert sorted(resumed.video_ids) == sorted(fresh.video_ids)
    for vid in fresh.video_ids:
        for name in ("audio.logmel", "flow"):
            for key in fresh.arrays(vid, name):
                np.testing.assert_array_equal(
                    resumed.get(vid, f"{name}/{key}"), fresh.get(vid, f"{name}/{key}")
                )


def test_a_run_killed_mid_run_resumes_to_a_clean_runs_store(tiny_demo_root, tmp_path, capsys):
    """kill -9 of the whole run once some videos are staged; a partial shard file, as a kill
    inside the final write leaves, is there too. The re-run resumes, removes it, and ends
    with the store a run never interrupted makes, array for array."""
    import signal
    import subprocess
    import sys
    import time

    store, clean = tmp_path / "store", tmp_path / "clean"
    args = [f"data_root={tiny_demo_root}", "workers=0", "progress=false", FAST, "shard_size=8"]
    run = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "extract", *args, f"out={store}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list((store / "staging").rglob("*.npz"))) < 6 and run.poll() is None:
        assert time.monotonic() < deadline, "the run staged nothing in 2 minutes"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    (store / "shards").mkdir(exist_ok=True)
    orphan = store / "shards" / ".shard-00000.h5.tmp-99999"
    orphan.write_bytes(b"half a shard")
    capsys.readouterr()
    assert main(["extract", *args, f"out={store}"]) == 0
    err = capsys.readouterr().err
    assert "was interrupted" in err and "removed 1 partial file" in err
    assert not orphan.exists() and not list(store.rglob(".*.tmp-*"))
    assert main(["extract", *args, f"out={clean}"]) == 0
    resumed, fresh = ShardReader(store), ShardReader(clean)
    assert sorted(resumed.video_ids) == sorted(fresh.video_ids)
    for vid in fresh.video_ids:
        assert sorted(resumed.extractors(vid)) == sorted(fresh.extractors(vid))
        for name in fresh.extractors(vid):
            assert resumed.entry(vid, name).status == fresh.entry(vid, name).status
            for key in fresh.arrays(vid, name):
                np.testing.assert_array_equal(
                    resumed.get(vid, f"{name}/{key}"), fresh.get(vid, f"{name}/{key}")
                )


def test_the_default_set_meets_the_awkward_inputs_without_a_bug(zoo_run, tmp_path):
    """The one row with every default extractor (pretrained ones included): a 1-frame clip,
    a huge frame, a cut-short file and an audio-only one give flags or named errors, and
    nothing is recorded as a bug (an error with a traceback)."""
    root = tmp_path / "zoo"
    videos = root / "videos" / "things"
    videos.mkdir(parents=True)
    for key in ("one_frame", "huge", "truncated_faststart", "audio_only", "good"):
        name = zoo_run["names"][key]
        shutil.copy(zoo_run["root"] / "videos" / "things" / name, videos / name)
    (root / "zoo.yaml").write_text(f"name: zoo\nformat: folder\nroot: {root}\nsplit_seed: 0\n")
    store = tmp_path / "store"
    assert (
        main(["extract", f"dataset={root / 'zoo.yaml'}", f"out={store}", "workers=0", "progress=false"]) == 0
    )
    from pipelines.errors import HallucinateError

    def named(cls: type) -> set[str]:
        return {cls.__name__}.union(*(named(sub) for sub in cls.__subclasses__()))

    bugs = [row for row in read_ledger(store) if row["error_type"] not in named(HallucinateError)]
    assert not bugs, bugs
    reader = ShardReader(store)
    for name in reader.extractors("one_frame"):
        entry = reader.entry("one_frame", name)
        assert entry.status in ("done", "flagged") and "traceback" not in entry.attrs, (name, entry.attrs)
    for name in reader.extractors("good"):
        assert reader.entry("good", name).status in ("done", "flagged"), name
