"""The default set on real video: ``../shared/data/real-clips`` (eight Apache-2.0 clips,
340x256 to 1080p, 6 to 30 frames/s) extracted as a folder dataset, as a user would.

What is asserted is about the clips, not only shapes: sampling follows each clip's
own rate, the 1080p clips are shrunk to the defaults' short side and the small
ones are left alone, the one clip with audio has it, and the 32-frame clip trains
through the clip sampler (looping, and saying so). Skipped, with the reason,
where ``../shared`` is absent; CI has it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from extractors import default_extractors
from extractors.base import DETECTION_FPS, MOTION_FPS, SHORT_SIDE, FrameSpec
from pipelines.cli import main
from pipelines.decode import iter_frames
from pipelines.store import TIMESTAMPS, ShardReader
from tests.helpers import CLIPS

pytestmark = pytest.mark.skipif(not CLIPS.is_dir(), reason=f"the real clips are not at {CLIPS}")

# The manifest's facts (ffprobe): native size and rate of each clip.
NATIVE = {
    "mpeg4_mp3_audio": ((320, 240), 25.0),
    "kinetics_style_10s": ((340, 256), 30.0),
    "people_426x240_2997fps": ((426, 240), 30000 / 1001),
    "kinetics_arm_wrestling": ((340, 256), 28.0),
    "ava_style_6fps": ((340, 256), 6.0),
    "short_32_frames": ((340, 256), 30.0),
    "ntu_rgbd_1080p_drink_water": ((1920, 1080), 30.0),
    "person_1080p_skeleton_demo": ((1920, 1080), 2160 / 77),
}


def test_every_clip_gets_every_default_descriptor(real_set):
    reader = ShardReader(real_set["store"])
    assert sorted(reader.video_ids) == sorted(NATIVE)
    for vid in NATIVE:
        statuses = {name: reader.entry(vid, name).status for name in reader.extractors(vid)}
        assert set(statuses) >= set(default_extractors())
        failed = {
            name: reader.entry(vid, name).attrs.get("error") for name, s in statuses.items() if s == "failed"
        }
        assert not failed, f"{vid}: {failed}"
    # Only the AVI has a sound track (MP3); the others are flagged, never failed.
    assert reader.entry("mpeg4_mp3_audio", "audio.logmel").status == "done"
    assert "no_audio" in reader.entry("kinetics_style_10s", "audio.logmel").flags


def test_1080p_is_shrunk_to_the_default_short_side_and_small_clips_are_not_enlarged(real_set):
    reader = ShardReader(real_set["store"])
    for vid, ((w, h), _) in NATIVE.items():
        flow = reader.get(vid, "flow/flow")
        short = min(SHORT_SIDE, h)
        expected = (short, round(w * short / h / 2) * 2) if h > SHORT_SIDE else (h, w)
        assert flow.shape[1:3] == expected, vid
        assert reader.entry(vid, "flow").attrs["frames_max_short_side"] == SHORT_SIDE  # in the provenance
    assert reader.get("ntu_rgbd_1080p_drink_water", "flow/flow").shape[1:3] == (256, 456)


def test_timestamps_follow_each_clips_own_rate(real_set):
    """6 frames/s stays 6 (the 15 frames/s cap is an upper bound); the 2160/77 frames/s clip is
    sampled at most 15 a second on its own frame times; detection at most 5 a second; every
    sampled time is one of the clip's own frames."""
    reader = ShardReader(real_set["store"])
    names = {p.stem: p.name for p in CLIPS.iterdir()}
    for vid, (_, rate) in NATIVE.items():
        flow_t = reader.get(vid, f"flow/{TIMESTAMPS}")
        odf_t = reader.get(vid, f"odf.motion/{TIMESTAMPS}")
        native = np.concatenate(
            [b.timestamps for b in iter_frames(CLIPS / names[vid], FrameSpec(size=(16, 16)))]
        )
        for stamps in (flow_t, odf_t):  # samples of the clip's own frames, at their own times
            assert np.abs(stamps[:, None] - native[None]).min(1).max() < 1e-6, vid
        duration = flow_t[-1] - flow_t[0]
        if rate <= MOTION_FPS:
            np.testing.assert_allclose(np.diff(flow_t), 1 / rate, atol=1e-3)  # every frame
        else:  # the cap is an upper bound; the AVI's own frame times have gaps, hence 85%
            assert 0.85 * duration * MOTION_FPS <= len(flow_t) <= duration * MOTION_FPS + 1.5, vid
        expected = (odf_t[-1] - odf_t[0]) * min(DETECTION_FPS, rate)
        assert 0.85 * expected <= len(odf_t) <= expected + 1.5, vid
    six = reader.get("ava_style_6fps", f"flow/{TIMESTAMPS}")
    assert len(six) == 57  # all of the clip's frames
    odd = reader.get("person_1080p_skeleton_demo", f"flow/{TIMESTAMPS}")
    assert np.diff(odd).min() >= 1 / MOTION_FPS - 1e-3  # never closer than the cap allows


def test_the_32_frame_clip_trains_through_the_sampler_and_the_loop_is_named(real_set, tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", f"dataset={real_set['definition']}", f"features={real_set['store']}", f"run={run}"]
    train += ["frames=40", "size=32", "short_side=36", "epochs=1", "batch_size=2", "hidden=16", "d=8"]
    train += ["backbone_options.width=4", "baseline=false", "export=false", "progress=false"]
    train += ["threads=1", "preload=true"]
    capsys.readouterr()
    assert main(train) == 0
    err = capsys.readouterr().err
    assert "people" in err and "scene" in err  # the class x split table
    # short_32_frames has 32 frames; arm wrestling 280: one of the two training clips loops.
    assert "note: 1 of 2 training videos have fewer than 40 frames" in err
    rows = [json.loads(line) for line in (run / "model" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["looped_clips"] == 1
