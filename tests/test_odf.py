"""ODF: multi-moment pooling against the formula, detectors against the demo's boxes, re-pooling."""

import json

import numpy as np
import pytest

from extractors import create_extractor
from extractors.detectors import LABEL_RANGES, LABEL_SLOTS, box_iou
from extractors.encoders import fix_signs, multi_moment_pool, rbf_embed
from extractors.odf import box_vector_dim, box_vectors, odf_descriptor
from pipelines.cli import main
from pipelines.decode import VideoSource, probe
from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.store import ShardReader
from tests.helpers import manifest_rows

# ---------------------------------------------------------------- formulas


def direct_multi_moment(x, frames, n_vectors):
    """Eq. 16 written out with a d x d eigendecomposition, as the paper states it."""
    n, d = x.shape
    mu = x.mean(0)
    frame_ids = sorted(set(frames))
    J = len(frame_ids)
    columns = []
    for f in frame_ids:
        rows = x[frames == f]
        columns += [(r - mu) / len(rows) for r in rows]
    upsilon = np.array(columns).T / J  # d x N, columns in frame order
    eigval, eigvec = np.linalg.eigh(upsilon @ upsilon.T)  # λ², ascending
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    u = []
    for k in range(n_vectors):
        v = eigvec[:, k]
        u.append(v if v[np.abs(v).argmax()] > 0 else -v)
    c = x - mu
    k2, k3, k4 = (c**2).mean(0), (c**3).mean(0), (c**4).mean(0)
    eig = np.clip(eigval, 0, None) / np.clip(eigval, 0, None).sum()
    return np.concatenate([mu / np.linalg.norm(mu), *u, k3 / k2**1.5, k4 / k2**2, eig])


def test_multi_moment_pooling_matches_the_formula():
    rng = np.random.default_rng(0)
    d, n = 6, 40
    # Anisotropic data so the leading eigenvalues are well separated.
    x = rng.normal(size=(n, d)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2]) + 1.0
    frames = rng.integers(0, 7, n)  # uneven boxes per frame: the weighting matters
    ours = multi_moment_pool(x, frames, n_vectors=3)
    ref = direct_multi_moment(x, frames, 3)
    assert ours.shape == (d * 7,)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    # The frame weighting is not a no-op: pooling without frames differs in u and λ.
    unweighted = multi_moment_pool(x, None, n_vectors=3)
    assert not np.allclose(unweighted[d : 4 * d], ours[d : 4 * d], atol=1e-3)


def test_eigenvector_sign_rule_and_padding():
    flipped = fix_signs(np.array([[0.1, -0.9, 0.3], [0.5, 0.2, -0.1]]))
    np.testing.assert_array_equal(flipped, [[-0.1, 0.9, -0.3], [0.5, 0.2, -0.1]])
    # Two boxes span one direction: u₂, u₃ are zero and λ² has one non-zero entry.
    x = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    out = multi_moment_pool(x, np.array([0, 1]), n_vectors=3)
    u = out[3:12].reshape(3, 3)
    np.testing.assert_allclose(u[0], [1, 0, 0], atol=1e-12)
    np.testing.assert_array_equal(u[1:], 0)
    np.testing.assert_allclose(out[-3:], [1, 0, 0])
    np.testing.assert_array_equal(out[12:15], 0)  # two symmetric values: no skew
    np.testing.assert_array_equal(out[15:18], [1, 0, 0])  # constant dims get 0, not NaN


def test_rbf_embedding():
    phi = rbf_embed(np.array([0.0, 0.5]), pivots=7, sigma=0.5)
    zeta = np.linspace(0, 1, 7)
    np.testing.assert_allclose(phi[1], np.exp(-((0.5 - zeta) ** 2) / 0.25))
    wrapped = rbf_embed(np.array([0.02, 0.98]), pivots=12, sigma=1 / 11, circular=True)
    # Circular: 0.02 and 0.98 are 0.04 apart, so both embed next to pivot 0.
    assert wrapped[0].argmax() == 0 and wrapped[1].argmax() == 0


def test_box_vector_layout():
    boxes = np.array([[0, 172, 0.9, 0.1, 0.2, 0.3, 0.4], [3, 1, 0.5, 0.0, 0.0, 1.0, 1.0]], np.float32)
    crops = np.arange(10, dtype=np.float32).reshape(2, 5)
    v = box_vectors(boxes, crops, n_frames=4, rbf=False)
    assert v.shape == (2, box_vector_dim(5, False)) == (2, LABEL_SLOTS + 5 + 6)
    assert v[0, 172] == 1 and v[0, :172].sum() == 0 and v[1, 1] == 1
    np.testing.assert_allclose(v[0, LABEL_SLOTS : LABEL_SLOTS + 5], crops[0])
    np.testing.assert_allclose(v[0, -6:], [0.9, 0.1, 0.2, 0.3, 0.4, 0.0], atol=1e-6)
    assert v[1, -1] == 1.0  # frame 3 of 4 -> (t-1)/(τ-1) = 1
    assert box_vectors(boxes, crops, 4, rbf=True).shape == (2, LABEL_SLOTS + 5 + 42)
    assert LABEL_RANGES["moving_object"] == (172, 173)


def test_empty_video_gets_a_zero_descriptor():
    out = odf_descriptor(np.zeros((0, 7)), np.zeros((0, 5)), 10, 3, False, "sigme", {})
    assert out.shape == (box_vector_dim(5, False) * 7,) and not out.any()


# ---------------------------------------------------------------- detectors on the demo


def _iou(a, b):
    return float(box_iou(np.asarray(a, np.float64)[None], np.asarray(b, np.float64)[None])[0, 0])


def test_moving_object_boxes_overlap_the_generated_ground_truth(tiny_demo_root):
    """On static-camera clips the main object is found in most frames, and most boxes are on objects."""
    root = tiny_demo_root / "demo"
    ex = create_extractor("odf.motion")
    ex.setup()
    best, on_object = [], []
    for row in manifest_rows(root):
        truth = json.loads((root / "annotations" / "boxes" / f"{row['video_id']}.json").read_text())
        if truth["nuisance"]["pan"]:  # the detector assumes a static camera
            continue
        video = VideoSource(row["video_id"], str(root / row["path"]))
        result = ex.process(video, {})
        scale = np.array([truth["width"], truth["height"]] * 2)
        boxes = result.arrays["boxes"]
        assert result.arrays["crops"].shape == (len(boxes), ex.crop_features.dim)
        # Detection samples at most 5 frames/s: sampled frame k is native frame round(t_k * fps).
        rate = probe(video.path).fps
        for k, t in enumerate(video.timestamps[ex.needs().frames]):
            objects = truth["frames"][round(t * rate)]
            found = [b[3:] * scale for b in boxes if b[0] == k]
            main_box = next(o["box"] for o in objects if o["role"] == "main")
            best.append(max((_iou(main_box, d) for d in found), default=0.0))
            on_object += [max(_iou(o["box"], d) for o in objects) for d in found]
    best, on_object = np.array(best), np.array(on_object)
    assert len(best) > 80
    assert (best > 0.3).mean() > 0.5, f"main object found (IoU>0.3) in {(best > 0.3).mean():.0%} of frames"
    assert (on_object > 0.3).mean() > 0.7, f"only {(on_object > 0.3).mean():.0%} of boxes are on objects"


def test_odf_result_provenance_and_ranges(tiny_demo_root):
    root = tiny_demo_root / "demo"
    row = manifest_rows(root)[0]
    ex = create_extractor("odf.motion", n_vectors=2)
    ex.setup()
    result = ex.process(VideoSource(row["video_id"], str(root / row["path"])), {})
    assert result.arrays["descriptor"].shape == (box_vector_dim(ex.crop_features.dim, False) * 6,)
    boxes = result.arrays["boxes"]
    assert len(boxes) and (boxes[:, 3:] >= 0).all() and (boxes[:, 3:] <= 1).all()
    assert (boxes[:, 1] == 172).all() and (boxes[:, 2] >= 0.3).all()
    assert np.bincount(boxes[:, 0].astype(int)).max() <= 20
    assert json.loads(result.attrs["label_ranges"])["coco"] == [0, 91]
    assert result.attrs["label_range"] == "moving_object"
    assert result.attrs["crop_features"] == "appearance"
    assert result.attrs["frames"] == 13  # 32 frames at 12 frames/s (2.58 s) sampled every 0.2 s
    # SigmE output: bounded by 1 in magnitude.
    assert np.abs(result.arrays["descriptor"]).max() <= 1


def test_deep_detector_loads_a_saved_checkpoint(deep_options, tiny_demo_root):
    """torchvision's SSDlite, built small and random, saved, and loaded back via ``weights=``."""
    root = tiny_demo_root / "demo"
    row = manifest_rows(root)[0]
    ex = create_extractor("odf.ssdlite", **deep_options["odf.ssdlite"])
    ex.setup()
    result = ex.process(VideoSource(row["video_id"], str(root / row["path"])), {})
    boxes = result.arrays["boxes"]
    assert len(boxes) and set(np.unique(boxes[:, 1])) <= set(range(1, 91))  # COCO slots
    assert result.attrs["label_range"] == "coco" and len(result.attrs["weights"]) == 16


def test_missing_weights_and_missing_detectron2_are_clear(tmp_path):
    ex = create_extractor("odf.fasterrcnn", detector={"weights": str(tmp_path / "frcnn.pth")})
    with pytest.raises(MissingWeightsError, match="frcnn.pth"):
        ex.setup()
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        create_extractor("odf.yolo", detector={"model": str(tmp_path / "nope.pt")}).setup()
    try:
        import detectron2  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="detectron2 is not installed.*git\\+https"):
            create_extractor("odf.detectron2").setup()
    with pytest.raises(ConfigError, match="options.odf.motion.detector"):
        create_extractor("odf.motion", detector={"histroy": 3})
    with pytest.raises(ConfigError, match="options.odf.motion.power_norm.*unknown power normalisation"):
        create_extractor("odf.motion", power_norm="sigmoid")
    with pytest.raises(ConfigError, match="power_norm_params"):
        create_extractor("odf.repool", power_norm_params={"etta": 3.0})
    with pytest.raises(ConfigError, match="crop feature backend"):
        create_extractor("odf.motion", crop={"name": "nope"})


@pytest.mark.parametrize("backend", ["torchvision", "timm"])
def test_crop_classifier_backends_give_probabilities(backend, tmp_path):
    """Each classifier backend, built small and random, saved, and loaded back via ``weights=``."""
    import timm
    import torch
    from torchvision.models import get_model

    from extractors.crops import CROP_FEATURES

    torch.manual_seed(0)
    path = tmp_path / f"{backend}.pth"
    cls = CROP_FEATURES.get(backend)
    if backend == "torchvision":
        torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), path)
        config = cls.Config(model="mobilenet_v3_small", weights=str(path), device="cpu", size=64)
    else:
        torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
        config = cls.Config(model="resnet10t", weights=str(path), device="cpu")
    clf = cls(config)
    clf.setup()
    assert clf.provenance()["crop_weights"] != "random"
    crops = [np.full((h, 20, 3), 100, np.uint8) for h in (10, 30, 50)]
    probs = clf(crops)
    assert probs.shape == (3, 1000)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


# ---------------------------------------------------------------- store, trainer mask, repool


def test_repool_from_stored_boxes_and_no_box_videos_are_masked(tiny_demo_root, tmp_path):
    out = tmp_path / "features"
    common = [f"data_root={tiny_demo_root}", f"out={out}", "workers=0", "progress=false", "limit=6"]
    assert main(["extract", "extractors=odf.motion,odf.hog", *common]) == 0
    reader = ShardReader(out)
    vid = reader.video_ids[0]
    stored = reader.get(vid, "odf.motion/descriptor")
    boxes, crops = reader.get(vid, "odf.motion/boxes"), reader.get(vid, "odf.motion/crops")
    frames = reader.entry(vid, "odf.motion").attrs["frames"]
    # The stored table reproduces the stored descriptor (crop features are kept as float16).
    again = odf_descriptor(boxes, crops.astype(np.float32), frames, 3, False, "sigme", {})
    np.testing.assert_allclose(again, stored, atol=2e-3)

    assert main(["repool", "source=odf.motion", "n_vectors=1", "power_norm=asinhe", *common]) == 0
    reader = ShardReader(out)
    repooled = reader.get(vid, "odf.repool/descriptor")
    want = odf_descriptor(boxes, crops, frames, 1, False, "asinhe", {})
    np.testing.assert_allclose(repooled, want, rtol=1e-5, atol=1e-6)
    assert repooled.shape == (box_vector_dim(crops.shape[1], False) * 5,)

    # HOG finds no people in the demo: zero descriptor + flag, and the trainer masks it.
    flagged = [
        v for v in reader.video_ids if reader.flags(v, "odf.hog") and not reader.flags(v, "odf.motion")
    ]
    assert flagged and "no_boxes" in reader.flags(flagged[0], "odf.hog")
    assert not reader.get(flagged[0], "odf.hog/descriptor").any()
    assert reader.flags(vid, "odf.motion") == {}

    from hallucinate.data import ClipDataset, ClipSpec
    from hallucinate.model import StreamSpec
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition("demo", {})
    records = {r.video_id: r for r in load_dataset(defn, resolve_paths(defn, str(tiny_demo_root))).records}
    streams = [
        StreamSpec("odf.hog/descriptor", stored.size),
        StreamSpec("odf.motion/descriptor", stored.size),
    ]
    data = ClipDataset([records[flagged[0]]], 6, ClipSpec(), train=False, store=out, streams=streams)
    _, mask = data.ground_truth(records[flagged[0]])
    assert mask.tolist() == [False, True]
