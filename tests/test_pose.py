"""Pose / skeleton features (GSF): layouts, normalisation, tracking, backends and ST-GCN."""

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from extractors import create_extractor
from extractors.base import Result
from extractors.pose import (
    BLAZEPOSE33,
    COCO17,
    OPENPOSE18,
    ROW_DIM,
    Poses,
    blazepose_to_coco,
    build_stgcn,
    coco_to_openpose,
    main_people,
    openpose_spatial_graph,
    skeleton_descriptor,
    skeleton_rows,
    stgcn_input,
    track_people,
    usable_joints,
)
from pipelines.decode import VideoSource
from pipelines.encode import write_video
from pipelines.errors import ConfigError, MissingWeightsError
from tests.conftest import add_to_manifest
from tests.helpers import save_stgcn, save_yolo_pose


def people_frames(n: int = 16) -> np.ndarray:
    """A slow pan over the right-hand person of ultralytics' bundled zidane.jpg: a real photo of a person."""
    import ultralytics

    path = Path(ultralytics.__file__).parent / "assets" / "zidane.jpg"
    right = cv2.imread(str(path))[:, 640:, ::-1]
    return np.stack(
        [cv2.resize(np.ascontiguousarray(right[:, 40 - 2 * i : 600 - 2 * i]), (280, 360)) for i in range(n)]
    )


@pytest.fixture(scope="module")
def people_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("people") / "people.mp4"
    write_video(path, people_frames(), 12, None)
    return path


# ---------------------------------------------------------------- layouts


def test_blazepose_to_coco_moves_each_joint_by_name():
    marks = np.arange(33 * 3, dtype=np.float32).reshape(33, 3)  # joint i's x is 3i
    coco = blazepose_to_coco(marks)
    assert coco.shape == (17, 3)
    # From MediaPipe's landmark list: left_shoulder 11, right_hip 24, right_ankle 28, left_eye 2.
    for name, blaze_index in (("left_shoulder", 11), ("right_hip", 24), ("right_ankle", 28), ("left_eye", 2)):
        assert coco[COCO17.index(name), 0] == 3 * blaze_index
        assert BLAZEPOSE33[blaze_index] == name
    assert coco[0, 0] == 0  # the nose


def test_coco_to_openpose_adds_the_neck_and_reorders():
    coco = np.zeros((17, 3), np.float32)
    coco[:, 0] = np.arange(17)
    coco[:, 2] = 0.9
    coco[COCO17.index("left_shoulder")] = (10.0, 4.0, 0.8)
    coco[COCO17.index("right_shoulder")] = (20.0, 8.0, 0.6)
    op = coco_to_openpose(coco)
    assert op.shape == (18, 3)
    np.testing.assert_allclose(op[1], (15.0, 6.0, 0.6))  # neck: the shoulders' midpoint, the lower confidence
    assert tuple(op[2]) == tuple(coco[6])  # OpenPose 2 is the right shoulder (COCO 6)
    assert op[OPENPOSE18.index("left_ankle"), 0] == COCO17.index("left_ankle")
    assert op[OPENPOSE18.index("right_ear"), 0] == COCO17.index("right_ear")
    coco[COCO17.index("left_shoulder"), 2] = 0.0  # one shoulder missing: the neck is missing
    assert (coco_to_openpose(coco)[1] == 0).all()


# ---------------------------------------------------------------- descriptor


def walking_skeleton(n: int = 20, seed: int = 0) -> np.ndarray:
    """(n, 1, 17, 3) keypoints in pixels: a stick figure waving its arms while walking right."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 12, (17, 2)) + (160, 120)
    base[[11, 12]] = (150, 150), (170, 150)  # hips
    base[[5, 6]] = (148, 100), (172, 100)  # shoulders
    out = np.zeros((n, 1, 17, 3))
    for t in range(n):
        pose = base.copy()
        pose[[9, 10], 1] += 15 * np.sin(0.6 * t)  # wrists
        pose[:, 0] += 3 * t
        out[t, 0, :, :2] = pose
        out[t, 0, :, 2] = 0.9
    return out


def as_normalised(kp_pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    out = kp_pixels.copy()
    out[..., :2] /= (width, height)
    return out


def test_skeleton_descriptor_is_invariant_to_translation_and_scale():
    times = np.arange(20) / 10.0
    px = walking_skeleton()
    rows, frames = skeleton_rows(as_normalised(px, 320, 240), 320, 240, times, 0.3)
    assert rows.shape == (20, ROW_DIM) and (frames == np.arange(20)).all()
    moved = px.copy()
    moved[..., :2] = px[..., :2] * 2.5 + (-300.0, 75.0)  # larger and elsewhere, in a larger frame
    rows2, _ = skeleton_rows(as_normalised(moved, 800, 600), 800, 600, times, 0.3)
    np.testing.assert_allclose(rows2, rows, atol=1e-9)
    d1 = skeleton_descriptor(rows, frames, 3, "sigme", {})
    d2 = skeleton_descriptor(rows2, frames, 3, "sigme", {})
    np.testing.assert_allclose(d1, d2, atol=1e-6)
    # ...but not to the motion itself: another pose sequence gives another descriptor.
    other, _ = skeleton_rows(as_normalised(walking_skeleton(seed=1), 320, 240), 320, 240, times, 0.3)
    assert np.abs(skeleton_descriptor(other, frames, 3, "sigme", {}) - d1).max() > 0.01
    # Centred on the hips and in torso lengths: the mid-hip is at the origin, the torso is 1 long.
    pos = rows[0].reshape(17, 5)[:, :2]
    np.testing.assert_allclose(pos[[11, 12]].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(pos[[5, 6]].mean(0) - pos[[11, 12]].mean(0)), 1.0)
    # Velocities in torso lengths per second: walking 3 px a frame at 10 frames/s, torso 50 px.
    vel = rows[5].reshape(17, 5)[:, 2:4]
    np.testing.assert_allclose(vel[0], (3 * 10 / 50, 0.0), atol=1e-9)


def test_missing_joints_enter_as_zeros_and_a_hidden_torso_uses_the_median():
    times = np.arange(20) / 10.0
    kp = as_normalised(walking_skeleton(), 320, 240)
    kp[4, 0, COCO17.index("left_wrist"), 2] = 0.1  # below min_confidence: missing
    kp[7, 0, [5, 6], 2] = 0.0  # no shoulders: no torso in this frame
    kp[9, 0, :, 2] = 0.0  # nobody in frame 9
    rows, frames = skeleton_rows(kp, 320, 240, times, 0.3)
    assert 9 not in frames and len(rows) == 19
    wrist = rows[list(frames).index(4)].reshape(17, 5)[COCO17.index("left_wrist")]
    assert (wrist == 0).all()  # position, velocity and confidence
    after = rows[list(frames).index(5)].reshape(17, 5)[COCO17.index("left_wrist")]
    assert (after[2:4] == 0).all() and after[4] > 0  # no velocity across the gap
    frame7 = rows[list(frames).index(7)].reshape(17, 5)
    np.testing.assert_allclose(frame7[11:13, :2].mean(0), 0, atol=1e-12)  # still hip-centred
    np.testing.assert_allclose(np.abs(frame7[13, :2]), np.abs(rows[0].reshape(17, 5)[13, :2]), rtol=0.2)
    assert np.isfinite(skeleton_descriptor(rows, frames, 3, "sigme", {})).all()


def test_false_people_are_dropped_off_frame_tiny_or_fleeting():
    times = np.arange(20) / 10.0
    kp = as_normalised(walking_skeleton(), 320, 240)
    assert len(skeleton_rows(kp, 320, 240, times, 0.3, min_torso=0.04, min_frames=3)[0]) == 20
    low = kp.copy()
    low[..., 1] += 0.5  # hips (y 0.625) now 1.125: below the image, so missing
    rows, _ = skeleton_rows(low, 320, 240, times, 0.3)
    assert len(rows) == 0  # only the shoulders remain, and no torso was ever seen whole
    tiny = walking_skeleton()
    tiny[..., :2] = (tiny[..., :2] - (160, 150)) * 0.15 + (160, 150)  # a 7.5 px torso: 3% of 240 px
    tiny = as_normalised(tiny, 320, 240)
    assert len(skeleton_rows(tiny, 320, 240, times, 0.3, min_torso=0.04)[0]) == 0
    assert len(skeleton_rows(tiny, 320, 240, times, 0.3, min_torso=0.02)[0]) == 20
    brief = kp.copy()
    brief[2:, 0, :, 2] = 0.0  # seen in two frames only
    assert len(skeleton_rows(brief, 320, 240, times, 0.3, min_frames=3)[0]) == 0
    assert len(skeleton_rows(brief, 320, 240, times, 0.3, min_frames=2)[0]) == 2


# ---------------------------------------------------------------- tracking


def two_people(n: int = 30, seed: int = 0) -> tuple[list[Poses], list[list[int]]]:
    """Two people walking towards each other (without overlapping) in shuffled order, plus clutter.

    Returns the per-frame poses and, per frame, which true person each
    detection is (0 = the tall one, 1 = the small one, 2 = a brief passer-by).
    """
    rng = np.random.default_rng(seed)
    frames, truth = [], []
    for t in range(n):
        boxes, who = [], []
        if t != 12:  # person 0 is missed in frame 12
            x = 0.05 + 0.01 * t
            boxes.append([x, 0.2, x + 0.2, 0.9])
            who.append(0)
        x = 0.75 - 0.008 * t
        boxes.append([x, 0.5, x + 0.12, 0.9])
        who.append(1)
        if 20 <= t < 23:  # a small passer-by for three frames
            boxes.append([0.45, 0.1, 0.5, 0.2])
            who.append(2)
        order = rng.permutation(len(boxes))
        boxes = np.asarray(boxes, np.float32)[order]
        kp = np.zeros((len(boxes), 17, 3), np.float32)
        kp[:, :, 0] = np.asarray(who)[order, None]  # the keypoints carry the true identity
        kp[:, :, 2] = 1.0
        frames.append(Poses(kp, boxes, np.ones(len(boxes), np.float32)))
        truth.append(list(np.asarray(who)[order]))
    return frames, truth


def test_tracker_keeps_identities_and_the_main_two_people():
    frames, _ = two_people()
    tracks = track_people(frames, iou_threshold=0.3, max_gap=3)
    assert len(tracks) == 3  # person 0 kept through the missed frame; the passer-by on their own
    kept = main_people(tracks, len(frames), people=2)
    assert kept.shape == (30, 2, 17, 3)
    # Slot 0 is the largest-longest person (0), slot 1 the other (1); identities never swap.
    seen0 = kept[:, 0, 0, 2] > 0
    assert (kept[seen0, 0, 0, 0] == 0).all() and seen0.sum() == 29 and not seen0[12]
    assert (kept[:, 1, 0, 0] == 1).all() and (kept[:, 1, 0, 2] > 0).all()
    # With no gap allowed the missed frame splits person 0 into two tracks.
    assert len(track_people(frames, iou_threshold=0.3, max_gap=0)) == 4


# ---------------------------------------------------------------- backends on video


def test_mediapipe_finds_the_person_in_a_real_photo(people_video):
    ex = create_extractor("pose.skeleton", fps=None)  # every frame of the 12 frames/s video
    ex.setup()
    result = ex.process(VideoSource("p", str(people_video)), {})
    assert not result.flags
    kp = result.arrays["keypoints"]
    assert kp.shape == (16, 2, 17, 3)
    assert result.attrs["frames_with_person"] >= 14
    # One person in view: whatever the second pass reports (here a few frames of an
    # upside-down phantom with its hips above the image) makes no skeleton row.
    c = ex.config
    usable = usable_joints(kp, 280, 360, c.min_confidence, c.min_torso, c.min_frames)
    assert usable.valid[:, 0].sum() >= 14 and not usable.valid[:, 1].any()
    seen = kp[:, 0, :, 2] > 0.5
    nose, hips = (kp[:, 0, COCO17.index(j), 1] for j in ("nose", "left_hip"))
    both = seen[:, 0] & seen[:, 11]
    assert both.sum() >= 10 and (nose[both] < hips[both]).all()  # the head is above the hips
    assert np.median(nose[seen[:, 0]]) < 0.45 and np.median(hips[seen[:, 11]]) > 0.6
    assert result.arrays["descriptor"].shape == ex.produces()["descriptor"].shape


def test_a_video_with_nobody_is_flagged_and_masked(demo_copy, people_video, tmp_path):
    from hallucinate.data import ClipDataset, ClipSpec, discover_streams
    from pipelines.cli import main
    from pipelines.datasets import load_dataset, load_definition, resolve_paths
    from pipelines.store import ShardReader

    add_to_manifest(demo_copy, {"zidane": people_video})
    out = tmp_path / "store"
    args = [f"data_root={demo_copy}", f"out={out}", "workers=0", "progress=false"]
    assert main(["extract", *args, "extractors=pose.skeleton", "options.pose.skeleton.fps=4"]) == 0
    reader = ShardReader(out)
    defn = load_definition("demo")
    records = load_dataset(defn, resolve_paths(defn, demo_copy)).records
    flagged = {r.video_id: reader.entry(r.video_id, "pose.skeleton").flags for r in records}
    assert not flagged["zidane"]
    nobody = [v for v in flagged if v != "zidane"]
    assert all("no_skeleton" in flagged[v] for v in nobody)  # the demo's shapes are not people
    streams = discover_streams(out, [r.video_id for r in records])
    assert [s.name for s in streams] == ["pose.skeleton/descriptor"]
    ds = ClipDataset(records, 6, ClipSpec(frames=8, size=32, short_side=36), False, out, streams)
    masks = {r.video_id: bool(ds[i]["mask"].all()) for i, r in enumerate(records)}
    assert masks["zidane"] and not any(masks[v] for v in nobody)


def test_yolo_pose_loads_a_saved_checkpoint_and_refuses_a_detector(people_video, tmp_path):
    from tests.helpers import save_yolo

    path = save_yolo_pose(tmp_path / "pose.pt")
    backend = {"name": "ultralytics", "model": str(path), "imgsz": 128, "conf": 0.0, "device": "cpu"}
    # A random model's people are any size and flicker: the quality filter is off, as
    # this checks the loading path, not the poses (it flagged them now and then).
    filters = {"min_confidence": 0.0, "min_torso": 0.0, "min_frames": 1}
    ex = create_extractor("pose.skeleton", backend=backend, fps=4.0, **filters)
    ex.setup()
    result = ex.process(VideoSource("p", str(people_video)), {})
    assert result.attrs["weights"] and result.attrs["tracks"] >= 1
    assert result.arrays["keypoints"].shape[1:] == (2, 17, 3)
    wrong = create_extractor(
        "pose.skeleton", backend={**backend, "model": str(save_yolo(tmp_path / "det.pt"))}
    )
    with pytest.raises(ConfigError, match="COCO-17 pose model"):
        wrong.setup()


def test_top_down_backend_needs_boxes_and_a_clear_install_hint():
    with pytest.raises(ConfigError, match="person_boxes"):
        create_extractor("pose.skeleton", backend={"name": "mmpose"})
    ex = create_extractor("pose.skeleton", backend={"name": "mmpose"}, person_boxes="odf.hog")
    assert ex.needs().inputs == ("odf.hog",)
    if "mmpose" not in sys.modules:
        with pytest.raises(ConfigError, match="make install-mmpose"):
            ex.setup()
    with pytest.raises(ConfigError, match="backend"):
        create_extractor("pose.skeleton", backend={"name": "openpose"})


def test_mmpose_backend_crops_the_detectors_person_boxes(people_video, tmp_path, monkeypatch):
    """The mmpose glue, against a stand-in for mmpose.apis that records what it is given."""
    seen = []

    class Model:
        dataset_meta = {"num_keypoints": 17}

    def inference_topdown(model, image, boxes, fmt):
        seen.append((image.shape, np.asarray(boxes).copy(), fmt))
        samples = []
        for x1, y1, x2, y2 in boxes:
            kp = np.zeros((1, 17, 2))
            kp[..., 0], kp[..., 1] = np.linspace(x1, x2, 17), np.linspace(y1, y2, 17)
            inst = types.SimpleNamespace(keypoints=kp, keypoint_scores=np.full((1, 17), 0.9))
            samples.append(types.SimpleNamespace(pred_instances=inst))
        return samples

    apis = types.ModuleType("mmpose.apis")
    apis.init_model = lambda config, weights, device: Model()
    apis.inference_topdown = inference_topdown
    monkeypatch.setitem(sys.modules, "mmpose", types.ModuleType("mmpose"))
    monkeypatch.setitem(sys.modules, "mmpose.apis", apis)
    config, weights = tmp_path / "td.py", tmp_path / "td.pth"
    backend = {"name": "mmpose", "config": str(config), "weights": str(weights)}
    ex = create_extractor("pose.skeleton", backend=backend, person_boxes="odf.hog", fps=4.0)
    with pytest.raises(MissingWeightsError, match="td.py"):
        ex.setup()
    config.write_text("# config")
    weights.write_bytes(b"weights")
    ex.setup()
    video = VideoSource("p", str(people_video))
    n = sum(len(b.frames) for b in video.frames(ex.needs().frames))
    table = np.array([[f, 1, 0.9, 0.2, 0.1, 0.7, 0.95] for f in range(n) if f != 2], np.float32)
    boxes = Result({"boxes": table}, attrs={"frames": n})
    result = ex.process(video, {"odf.hog": boxes})
    assert len(seen) == n - 1  # frame 2 had no person box
    shape, given, fmt = seen[0]
    h, w = shape[:2]
    assert fmt == "xyxy" and min(h, w) == 256  # short_side=256 bounds the size
    np.testing.assert_allclose(given[0], [0.2 * w, 0.1 * h, 0.7 * w, 0.95 * h], rtol=1e-5)
    kp = result.arrays["keypoints"]
    np.testing.assert_allclose(kp[0, 0, 0, :2], (0.2, 0.1), atol=1e-5)  # back in [0, 1] coordinates
    assert (kp[2, 0, :, 2] == 0).all()
    with pytest.raises(ConfigError, match="same fps"):
        ex.process(video, {"odf.hog": Result({"boxes": table}, attrs={"frames": n + 5})})


# ---------------------------------------------------------------- ST-GCN


def test_stgcn_graph_matches_the_spatial_partitioning():
    a = openpose_spatial_graph()
    assert a.shape == (3, 18, 18)
    np.testing.assert_allclose(a.sum((0, 1)), 1.0)  # each column normalised by its in-degree
    # The neck (1) has 3 bones + itself; the right wrist (4) 1 bone + itself.
    assert a[0, 1, 1] == pytest.approx(1 / 4) and a[0, 4, 4] == pytest.approx(1 / 2)
    assert a[1, 2, 1] == pytest.approx(1 / 4)  # right shoulder → neck: farther from the centre
    assert a[2, 1, 2] == pytest.approx(1 / 4)  # neck → right shoulder: nearer the centre
    assert a[1, 1, 2] == 0 and a[2, 2, 1] == 0
    assert (a[0] == np.diag(np.diag(a[0]))).all()


def test_stgcn_loads_the_kinetics_layout_and_scores_the_skeletons(tmp_path):
    import torch

    path = save_stgcn(tmp_path / "st_gcn.kinetics.pt")
    state = torch.load(path, weights_only=True)
    shapes = {
        "A": (3, 18, 18),
        "data_bn.running_mean": (54,),
        "st_gcn_networks.0.gcn.conv.weight": (192, 3, 1, 1),
        "st_gcn_networks.0.tcn.2.weight": (64, 64, 9, 1),
        "st_gcn_networks.4.residual.0.weight": (128, 64, 1, 1),
        "st_gcn_networks.7.residual.1.running_var": (256,),
        "edge_importance.9": (3, 18, 18),
        "fcn.weight": (400, 256, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "st_gcn_networks.0.residual.0.weight" not in state  # the first block has no residual
    kp = np.zeros((40, 2, 17, 3), np.float32)
    kp[..., :2] = np.random.default_rng(0).random((40, 2, 17, 2))
    kp[..., 2] = 0.8
    kp[:, 1, :, 2] = 0.0  # one person
    source = Result({"keypoints": kp, "descriptor": np.zeros(3, np.float32)})
    ex = create_extractor("pose.stgcn", weights=str(path), device="cpu", window=16)
    ex.setup()
    got = ex.process(None, {"pose.skeleton": source}).arrays["descriptor"]
    assert got.shape == (400,) and got.dtype == np.float32
    net = build_stgcn().eval()
    net.load_state_dict(state)
    x = torch.from_numpy(stgcn_input(kp))[None]
    assert (x[0, :2, :, :, 1] == 0).all()  # the absent person is zeros
    with torch.no_grad():
        windows = [(net(x[:, :, s : s + 16]), min(16, 40 - s)) for s in range(0, 40, 16)]
    want = sum(out[0] * n for out, n in windows) / 40
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    flagged = ex.process(None, {"pose.skeleton": Result(flags={"no_skeleton": "nobody"})})
    assert flagged.flags == {"no_skeleton": "nobody"} and not flagged.arrays
    with pytest.raises(ConfigError, match="not an ST-GCN checkpoint"):
        create_extractor("pose.stgcn", weights=str(path), num_class=60).setup()
    with pytest.raises(MissingWeightsError, match="st_gcn.kinetics.pt"):
        create_extractor("pose.stgcn").setup()


def test_the_default_set_has_pretrained_pose_and_needs_no_checkpoint():
    """pose.skeleton runs MediaPipe's bundled model, so it is default; ST-GCN needs a checkpoint."""
    from extractors import default_extractors, get_extractor_class

    defaults = set(default_extractors())
    assert "pose.skeleton" in defaults and "pose.stgcn" not in defaults
    kinds = {get_extractor_class(n).weights for n in defaults}
    assert kinds <= {"pretrained", "heuristic"}
    assert sum(get_extractor_class(n).weights == "pretrained" for n in defaults) >= 4
