import json
import struct
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from extractors.base import AudioSpec, FrameSpec
from pipelines.decode import VideoSource, iter_frames, output_size, probe, read_audio, read_clip
from pipelines.demo import DEMO_CLASSES, DemoSpec, generate_demo, render_clip
from pipelines.encode import write_video
from pipelines.errors import (
    CorruptVideoError,
    EmptyVideoError,
    MissingVideoError,
    NoVideoStreamError,
    TruncatedVideoError,
    VideoError,
)
from tests.helpers import moving_frames, tone, write_broken_videos


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_videos(tmp_path_factory.mktemp("broken"))


def test_fps_and_size_sampling(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, tone(2, 440))
    info = probe(path)
    assert (info.width, info.height, info.fps, info.has_audio) == (64, 48, 12.0, True)
    batches = list(iter_frames(path, FrameSpec(fps=4, size=(32, 24)), chunk=3))
    stamps = np.concatenate([b.timestamps for b in batches])
    assert [len(b.frames) for b in batches] == [3, 3, 2]
    assert batches[0].frames.shape[1:] == (24, 32, 3) and batches[0].frames.dtype == np.uint8
    np.testing.assert_allclose(np.diff(stamps), 0.25, atol=1e-6)
    native = np.concatenate([b.timestamps for b in iter_frames(path, FrameSpec())])
    assert len(native) == 24  # fps=None keeps every frame; fps above native never duplicates
    assert len(np.concatenate([b.timestamps for b in iter_frames(path, FrameSpec(fps=50))])) == 24


def test_sampled_content_is_the_right_frame(tmp_path):
    path = tmp_path / "v.mp4"
    frames = moving_frames(24)
    write_video(path, frames, 12, None, bit_rate=4_000_000)
    got = np.concatenate([b.frames for b in iter_frames(path, FrameSpec(fps=6))])
    # the moving square's left edge is at x = 4 + i; every other frame is kept
    for k, frame in enumerate(got):
        red = np.where(frame[18, :, 0] > 150)[0]
        assert red.min() == pytest.approx(4 + 2 * k, abs=1)


# mpeg4: a keyframe every 12 frames; libx264: only the first; WebM (SSv2's format) has no
# frame count, only a duration.
@pytest.mark.parametrize("codec, name", [("mpeg4", "v.mp4"), ("libx264", "v.mp4"), ("libvpx-vp9", "v.webm")])
@pytest.mark.parametrize("fps", [None, 6])
def test_read_clip_gives_the_frames_a_whole_decode_gives(tmp_path, codec, name, fps):
    """A streamed clip seeks to the keyframe before it and converts only its own
    frames; they must be those of decoding everything and slicing."""
    path = tmp_path / name
    write_video(path, moving_frames(60, width=96), 12, None, codec=codec)
    spec = FrameSpec(fps=fps, short_side=24)
    batches = list(iter_frames(path, spec))
    frames, times = (
        np.concatenate([b.frames for b in batches]),
        np.concatenate([b.timestamps for b in batches]),
    )
    n = len(frames)
    for start in (0, 9, 17, n - 8):
        offered = []
        clip = read_clip(path, spec, 8, lambda k, s=start, seen=offered: seen.append(k) or s)
        assert offered == [n]  # the frame count it picks from is the whole decode's
        np.testing.assert_array_equal(clip.frames, frames[start : start + 8])
        np.testing.assert_allclose(clip.timestamps, times[start : start + 8], atol=1e-6)
    assert read_clip(path, spec, n + 1, lambda k: 0) is None  # longer than the video: decode it all
    assert read_clip(path, FrameSpec(fps=50), 8, lambda k: 0) is None  # above the native rate


def test_short_side_keeps_aspect():
    assert output_size(FrameSpec(short_side=24), 64, 48) == (32, 24)
    assert output_size(FrameSpec(size=(10, 20)), 64, 48) == (10, 20)
    # An upper bound shrinks larger frames only: 1080p to 456x256, a 64x48 video unchanged.
    assert output_size(FrameSpec(max_short_side=256), 1920, 1080) == (456, 256)
    assert output_size(FrameSpec(max_short_side=256), 1080, 1920) == (256, 456)  # portrait
    assert output_size(FrameSpec(max_short_side=256), 64, 48) == (64, 48)


def test_audio_mono_resampled(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, tone(2, 440))
    track = read_audio(path, AudioSpec(rate=8000))
    assert track.rate == 8000 and track.samples.ndim == 1
    assert abs(len(track.samples) - 16000) < 1200
    spectrum = np.abs(np.fft.rfft(track.samples[2000:10000]))
    assert np.fft.rfftfreq(8000, 1 / 8000)[spectrum.argmax()] == pytest.approx(440, abs=5)


@pytest.mark.parametrize(
    "kind, error",
    [
        ("corrupt", CorruptVideoError),
        ("truncated", TruncatedVideoError),
        ("zero_byte", EmptyVideoError),
        ("video_less", NoVideoStreamError),
    ],
)
def test_bad_files_raise_errors_naming_the_file(broken, kind, error):
    with pytest.raises(error) as info:
        list(iter_frames(broken[kind], FrameSpec(fps=6)))
    assert str(broken[kind]) in str(info.value) and info.value.fix


def test_missing_file(tmp_path):
    with pytest.raises(MissingVideoError, match="VIDEO_ROOT"):
        probe(tmp_path / "nope.mp4")


def test_audio_cases(broken):
    assert read_audio(broken["no_audio"], AudioSpec()) is None
    assert np.abs(read_audio(broken["silent"], AudioSpec()).samples).max() < 1e-3
    assert read_audio(broken["video_less"], AudioSpec()).samples.size > 0
    with pytest.raises(VideoError):
        read_audio(broken["corrupt"], AudioSpec())


def test_video_source_reuses_decode_and_records_timestamps(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, None)
    spec = FrameSpec(fps=6)
    src = VideoSource("v", str(path))
    first = np.concatenate([b.frames for b in src.frames(spec)])
    path.unlink()  # a second pass must come from the cache, not the file
    second = np.concatenate([b.frames for b in src.frames(spec, chunk=5)])
    np.testing.assert_array_equal(first, second)
    assert len(src.timestamps[spec]) == 12


def test_one_decode_serves_every_sampling_of_the_run(tmp_path):
    """The first request decodes once for all the run's samplings; each equals its own decode."""
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, None)
    specs = (FrameSpec(fps=6, max_short_side=24), FrameSpec(fps=4, size=(16, 12)), FrameSpec())
    alone = {s: np.concatenate([b.frames for b in iter_frames(path, s)]) for s in specs}
    src = VideoSource("v", str(path), specs)
    first = np.concatenate([b.frames for b in src.frames(specs[0], chunk=5)])
    path.unlink()  # the other samplings must come from that one decode
    np.testing.assert_array_equal(first, alone[specs[0]])
    for spec in specs[1:]:
        np.testing.assert_array_equal(np.concatenate([b.frames for b in src.frames(spec)]), alone[spec])
        assert len(src.timestamps[spec]) == len(alone[spec])


def test_a_sampling_over_the_budget_is_decoded_again_not_kept(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, None)
    small, big = FrameSpec(size=(8, 6)), FrameSpec()
    src = VideoSource("v", str(path), (small, big), cache_bytes=24 * 8 * 6 * 3 + 100)
    frames = np.concatenate([b.frames for b in src.frames(small)])
    assert big not in src._frame_cache and len(src._frame_cache[small]) and len(frames) == 24
    assert big not in src.timestamps  # dropped mid-decode: recorded when it is decoded
    assert len(np.concatenate([b.frames for b in src.frames(big)])) == 24


def test_video_source_does_not_cache_beyond_budget(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(24), 12, None)
    src = VideoSource("v", str(path), cache_bytes=1000)
    list(src.frames(FrameSpec()))
    path.unlink()
    with pytest.raises(MissingVideoError):
        list(src.frames(FrameSpec()))


def test_demo_render_is_deterministic_and_varied():
    spec = DemoSpec()
    a, audio_a, boxes_a, _ = render_clip(spec, 2, 7)
    b, audio_b, boxes_b, _ = render_clip(spec, 2, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(audio_a, audio_b)
    assert boxes_a == boxes_b
    c, *_ = render_clip(spec, 2, 8)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5  # nuisance differs per clip
    assert a.shape == (spec.n_frames, spec.height, spec.width, 3)


def test_demo_boxes_cover_the_main_object():
    spec = DemoSpec(noise_sigma=0.0, max_distractors=1)
    frames, _, boxes, _ = render_clip(spec, 0, 1)
    for frame, frame_boxes in zip(frames, boxes, strict=True):
        main = [b for b in frame_boxes if b["role"] == "main"][0]["box"]
        x1, y1, x2, y2 = (int(v) for v in main)
        assert x2 > x1 and y2 > y1
        inside = frame[y1 : y2 + 1, x1 : x2 + 1].astype(int)
        outside = np.ones(frame.shape[:2], bool)
        outside[y1 : y2 + 1, x1 : x2 + 1] = False
        # the object's colour differs from the background inside its box
        assert np.abs(inside.mean((0, 1)) - frame[outside].mean(0)).max() > 10


def test_generated_demo_layout(tiny_demo_root):
    root = tiny_demo_root / "demo"
    manifest = (root / "annotations" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 6 * 5
    assert len(DEMO_CLASSES) >= 5
    vid = manifest[1].split(",")[0]
    boxes = json.loads((root / "annotations" / "boxes" / f"{vid}.json").read_text())
    assert len(boxes["frames"]) == DemoSpec().n_frames
    info = probe(root / manifest[1].split(",")[1])
    assert (info.width, info.height) == (160, 120)


def test_generate_demo_is_byte_deterministic(tmp_path):
    spec = DemoSpec(clips_per_class=1, held_out_per_class=1)
    generate_demo(tmp_path / "a", spec, workers=1, progress=False)
    generate_demo(tmp_path / "b", spec, workers=2, progress=False)
    for path in sorted((tmp_path / "a" / "videos").rglob("*.mp4")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == twin.read_bytes()
    assert (tmp_path / "a" / "annotations" / "manifest.csv").read_text() == (
        tmp_path / "b" / "annotations" / "manifest.csv"
    ).read_text()


def test_held_out_clips_grow_val_and_test_but_not_train():
    from pipelines.demo import split_of, total_clips_per_class

    spec = DemoSpec(clips_per_class=5, held_out_per_class=4)
    assert Counter(split_of(i, spec) for i in range(total_clips_per_class(spec))) == {
        "train": 3,
        "val": 3,
        "test": 3,
    }
    # the first clips keep their split and their pixels whatever the held-out count
    plain = DemoSpec(clips_per_class=5, held_out_per_class=0)
    assert [split_of(i, spec) for i in range(5)] == [split_of(i, plain) for i in range(5)]
    np.testing.assert_array_equal(render_clip(spec, 1, 3)[0], render_clip(plain, 1, 3)[0])
    assert total_clips_per_class(DemoSpec()) == 80


def test_demo_audio_kinds_spread_over_splits():
    spec = DemoSpec()
    from pipelines.demo import clip_audio_kind, split_of

    kinds = {}
    for c in range(len(DEMO_CLASSES)):
        for i in range(spec.clips_per_class):
            kinds.setdefault(clip_audio_kind(spec, c, i), set()).add(split_of(i, spec))
    assert kinds["silent"] >= {"train", "test"} and "none" in kinds


# ---------------------------------------------------------------- phone and web video variants


def _write_timed(path, frames, times, codec="libx264", fmt=None):
    """H.264 (or ``codec``) with frames presented at ``times`` (seconds): variable rate if uneven."""
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, t in zip(frames, times, strict=True):
            out = av.VideoFrame.from_ndarray(frame, format="rgb24")
            out.pts, out.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))


def _quadrant_frames(n, h=48, w=64):
    """Frames whose top-left quadrant is bright, so any turn or flip shows."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:, : h // 2, : w // 2] = 230
    return frames


def test_phone_rotation_in_the_display_matrix_turns_the_frames_upright(tmp_path):
    """A portrait phone clip stored landscape with a 90-degree display matrix (in the MP4 track
    header, as phones write it) decodes upright: sizes are the display's, and so is the content."""
    path = tmp_path / "phone.mp4"
    frames = _quadrant_frames(6)
    _write_timed(path, frames, np.arange(6) / 10)
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd") + 44  # version 0: the 3x3 matrix after 40 bytes of fields
    data[at : at + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    decoded = np.concatenate([b.frames for b in iter_frames(path, FrameSpec())])
    assert decoded.shape == (6, 64, 48, 3)  # portrait
    upright = np.rot90(frames[0], -1)  # shown turned a quarter clockwise: bright quadrant top right
    assert np.abs(decoded[0].astype(int) - upright).mean() < 12
    assert decoded[0][:32, 24:].mean() > 150 and decoded[0][:32, :24].mean() < 60
    half = np.concatenate([b.frames for b in iter_frames(path, FrameSpec(short_side=24))])
    assert half.shape[1:3] == (32, 24)  # short_side is the upright picture's
    clip = read_clip(path, FrameSpec(), 4, lambda n: 1)
    np.testing.assert_array_equal(clip.frames, decoded[1:5])  # a streamed clip turns the same way


def test_a_display_matrix_that_is_not_a_quarter_turn_is_a_named_error(tmp_path):
    path = tmp_path / "skew.mp4"
    _write_timed(path, _quadrant_frames(3), np.arange(3) / 10)
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd") + 44
    c, s = round(0x10000 * np.cos(np.pi / 6)), round(0x10000 * np.sin(np.pi / 6))  # 30 degrees
    data[at : at + 36] = struct.pack(">9i", c, s, 0, -s, c, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    message = r"skew\.mp4.*display rotation of -?(29|30) degrees, not a multiple of 90"
    with pytest.raises(CorruptVideoError, match=message):
        list(iter_frames(path, FrameSpec()))


def test_variable_frame_rate_keeps_the_presentation_times(tmp_path):
    """Phone clips vary their rate: frames keep their own times, and a rate cap samples by time."""
    times = np.array([0.0, 0.05, 0.1, 0.3, 0.35, 0.7, 0.75, 0.8, 1.2, 1.5])
    path = tmp_path / "vfr.mp4"
    _write_timed(path, moving_frames(len(times)), times)
    native = np.concatenate([b.timestamps for b in iter_frames(path, FrameSpec())])
    np.testing.assert_allclose(native, times, atol=1e-3)
    capped = np.concatenate([b.timestamps for b in iter_frames(path, FrameSpec(fps=5))])
    # The first frame at or after each 0.2 s target, never one twice.
    np.testing.assert_allclose(capped, [0.0, 0.3, 0.7, 0.8, 1.2, 1.5], atol=1e-3)
    # A streamed clip is placed by the average rate, so on variable-rate video it is not the
    # clip a whole decode would cut for the same draw; it is still consecutive real frames.
    clip = read_clip(path, FrameSpec(), 3, lambda n: 2)
    if clip is not None:
        first = int(np.argmin(np.abs(native - clip.timestamps[0])))
        np.testing.assert_allclose(clip.timestamps, native[first : first + 3], atol=1e-3)


def test_av1_decodes_where_pyav_has_a_decoder(tmp_path):
    import av

    try:
        av.Codec("libsvtav1", "w")
        av.Codec("libdav1d", "r")
    except av.FFmpegError:
        pytest.skip("this PyAV build has no AV1 encoder (libsvtav1) or decoder (libdav1d)")
    path = tmp_path / "web.mp4"
    frames = _quadrant_frames(8, 64, 64)
    _write_timed(path, frames, np.arange(8) / 10, codec="libsvtav1")
    decoded = np.concatenate([b.frames for b in iter_frames(path, FrameSpec())])
    assert decoded.shape == (8, 64, 64, 3)
    assert np.abs(decoded.astype(int) - frames).mean() < 12
