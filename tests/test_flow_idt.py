"""Optical flow, OFF, our IDT and the BoW / Fisher-vector codebooks (METHOD.md §2.1-2.2)."""

import math

import cv2
import numpy as np
import pytest
import torch

from extractors import create_extractor
from extractors.base import Result
from extractors.codebooks import (
    PARTS,
    Codebook,
    encode_cumulative,
    finish_bow,
    finish_fv,
    fit_codebook,
    pool_frames,
)
from extractors.flow import (
    FLOW_BACKENDS,
    FlowFrames,
    build_i3d,
    dequantise_flow,
    hofmbh_descriptor,
    motion_channels,
    quantise_flow,
    root_normalise,
)
from extractors.idt import IDTConfig, camera_flow, dense_trajectories, estimate_homography
from pipelines.cli import main
from pipelines.decode import VideoSource
from pipelines.encode import write_video
from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.store import ShardReader
from tests.helpers import manifest_rows

# ---------------------------------------------------------------- synthetic videos


def texture(h, w, seed=0, blur=2.0):
    t = np.random.default_rng(seed).random((h, w)).astype(np.float32) * 255
    t = cv2.GaussianBlur(t, (0, 0), blur)
    return ((t - t.min()) / (t.max() - t.min()) * 255).astype(np.uint8)


def scene(n=24, w=160, h=120, pan=0.0, obj_speed=None, obj_x0=20, obj=48):
    """Frames of a textured background seen by a camera panning ``pan`` px/frame (content moves
    left), with an optional textured square moving ``obj_speed`` px/frame in the image."""
    bg = texture(h + 20, w + int(abs(pan) * n) + 40, seed=1)
    patch = texture(obj, obj, seed=2, blur=1.5)
    frames = []
    for i in range(n):
        x = int(round(20 + pan * i))
        f = bg[10 : 10 + h, x : x + w].copy()
        if obj_speed is not None:
            ox = int(round(obj_x0 + obj_speed * i))
            f[h // 2 - obj // 2 : h // 2 + obj // 2, ox : ox + obj] = patch
        frames.append(np.repeat(f[..., None], 3, 2))
    return np.stack(frames)


def flow_of(frames, backend="dis"):
    cls = FLOW_BACKENDS.get(backend)
    b = cls(cls.Config())
    b.setup()
    return b.pairs(frames)


# ---------------------------------------------------------------- flow


@pytest.mark.parametrize("backend", ["dis", "farneback", "tvl1"])
def test_flow_backends_recover_a_known_translation(backend):
    frames = scene(n=4, w=96, h=72, pan=2.0)  # content moves 2 px left per frame
    flow = flow_of(frames, backend)
    assert flow.shape == (3, 72, 96, 2) and flow.dtype == np.float32
    inner = flow[:, 12:-12, 12:-12]
    assert np.median(inner[..., 0]) == pytest.approx(-2.0, abs=0.15)
    assert abs(np.median(inner[..., 1])) < 0.15


def test_raft_loads_a_saved_checkpoint(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(1)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    ex = create_extractor(
        "flow", backend={"name": "raft", "weights": str(path), "updates": 2, "device": "cpu"}
    )
    ex.setup()
    frames = scene(n=3, w=64, h=48, pan=1.0)
    flow = ex.backend.pairs(frames)
    assert flow.shape == (2, 48, 64, 2) and np.isfinite(flow).all()
    from pipelines.weights import file_sha256

    assert ex.backend.provenance() == {"weights": file_sha256(path)}
    missing = create_extractor("flow", backend={"name": "raft", "weights": str(tmp_path / "none.pth")})
    with pytest.raises(MissingWeightsError, match="none.pth"):
        missing.setup()


def test_flow_is_stored_only_when_asked(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, scene(n=6, w=64, h=48, pan=1.0), 12, None)
    video = VideoSource("v", str(path))
    plain = create_extractor("flow")
    plain.setup()
    result = plain.process(video, {})
    assert set(result.arrays) == {"stats"} and result.transient["flow"].shape == (5, 48, 64, 2)
    assert plain.transient_outputs() == ("flow",)
    q = create_extractor("flow", store="uint8", clip=10.0)
    q.setup()
    stored = q.process(video, {})
    assert stored.arrays["flow"].dtype == np.uint8 and q.transient_outputs() == ()
    back = dequantise_flow(stored.arrays["flow"], 10.0)
    exact = np.clip(stored.transient["flow"], -10, 10)
    assert np.abs(back - exact).max() <= 10.0 / 255 + 1e-6
    assert np.array_equal(quantise_flow(np.array([-99.0, 0.0, 99.0]), 10.0), [0, 128, 255])
    with pytest.raises(ConfigError, match="store"):
        create_extractor("flow", store="float64")


def test_a_new_dependent_recomputes_transient_flow(tiny_demo_root, tmp_path):
    """flow stored without its field; a later run adding off.hofmbh recomputes it in memory."""
    args = [f"data_root={tiny_demo_root}", f"out={tmp_path}", "limit=3", "workers=0", "progress=false"]
    assert main(["extract", "extractors=[flow]", *args]) == 0
    assert main(["extract", "extractors=[off.hofmbh]", *args]) == 0  # flow is added as its dependency
    reader = ShardReader(tmp_path)
    for vid in reader.video_ids:
        assert reader.get(vid, "off.hofmbh/descriptor").shape == (675,)
        assert reader.entry(vid, "off.hofmbh").status == "done"
        assert "flow" not in reader.arrays(vid, "flow")


def test_flow_frames_spill_to_disk_and_read_back_the_same_fields():
    rng = np.random.default_rng(1)
    fields = rng.normal(0, 3, (11, 6, 8, 2)).astype(np.float32)
    kept, spilled = FlowFrames(), FlowFrames(memory_bytes=3 * 6 * 8 * 2 * 4)
    for start in range(0, 11, 4):
        kept.append(fields[start : start + 4])
        spilled.append(fields[start : start + 4])
    assert not kept.spilled and spilled.spilled
    for flow in (kept, spilled):
        assert flow.shape == (11, 6, 8, 2) and len(flow) == 11
        np.testing.assert_array_equal(flow[3], fields[3])
        np.testing.assert_array_equal(flow[-1], fields[-1])
        np.testing.assert_array_equal(flow[2:9], fields[2:9])
        np.testing.assert_array_equal(np.asarray(flow), fields)
        with pytest.raises(IndexError):
            flow[11]
    np.testing.assert_array_equal(hofmbh_descriptor(spilled, [3, 3, 3]), hofmbh_descriptor(fields, [3, 3, 3]))
    spilled.close()


def test_flow_spilled_to_disk_gives_the_descriptors_kept_in_memory(tiny_demo_root, monkeypatch):
    """A long video's flow moves to a file; OFF and SDF read it there and get the same numbers."""
    import extractors.flow as flow_module

    row = manifest_rows(tiny_demo_root / "demo")[0]
    names = ["off.hofmbh", "sdf.flow"]
    extractors = {n: create_extractor(n) for n in ["flow", *names]}
    for ex in extractors.values():
        ex.setup()

    def run():
        video = VideoSource(row["video_id"], str(tiny_demo_root / "demo" / row["path"]))
        flow = extractors["flow"].process(video, {})
        out = {n: extractors[n].process(video, {"flow": flow}).arrays["descriptor"] for n in names}
        return flow.transient["flow"], out

    kept, in_memory = run()
    monkeypatch.setattr(flow_module, "FLOW_IN_MEMORY", 2 * kept[0].nbytes)
    spilled, on_disk = run()
    assert not kept.spilled and spilled.spilled
    for name in names:
        np.testing.assert_array_equal(in_memory[name], on_disk[name])


def test_hofmbh_mbh_ignores_uniform_motion():
    flow = np.zeros((6, 30, 30, 2), np.float32)
    flow[..., 0] = 3.0  # everything moves right: a camera pan
    d = hofmbh_descriptor(flow, [3, 3, 3]).reshape(27, 25)
    hof, mbh = d[:, :9], d[:, 9:]
    assert np.allclose(mbh, 0)  # no relative motion at all
    assert np.allclose(hof[:, 0], 1.0)  # RootSIFT of a one-bin histogram: the 0-rad bin


def test_hofmbh_grid_histograms_equal_the_channels_summed_per_cell():
    """The bincount form must give what summing ``motion_channels`` over each cell gives."""
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 2, (5, 37, 53, 2)).astype(np.float32)
    flow[:, :10] *= 0.05  # a still band, for HOF's "no motion" bin
    gx, gy, gt = 3, 2, 2
    n, h, w = flow.shape[:3]
    ys = np.minimum(np.arange(h) * gy // h, gy - 1)
    xs = np.minimum(np.arange(w) * gx // w, gx - 1)
    hist = np.zeros((gt, gy * gx, 25))
    for t in range(n):
        channels = motion_channels(flow[t]).astype(np.float64)
        for cy in range(gy):
            for cx in range(gx):
                block = channels[np.ix_(ys == cy, xs == cx)]
                hist[min(t * gt // n, gt - 1), cy * gx + cx] += block.sum((0, 1))
    split = np.cumsum([9, 8])
    expected = np.concatenate([root_normalise(b) for b in np.split(hist, split, axis=-1)], -1).reshape(-1)
    np.testing.assert_allclose(hofmbh_descriptor(flow, [gx, gy, gt]), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- OFF: I3D


def test_i3d_loads_the_pytorch_i3d_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    net = build_i3d(2, 400).eval()
    keys = set(net.state_dict())
    for key in (
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_1a_7x7.bn.running_mean",
        "Mixed_4b.b1b.conv3d.weight",
        "Mixed_5c.b3b.bn.bias",
        "logits.conv3d.bias",
    ):
        assert key in keys
    assert net.state_dict()["Mixed_5c.b0.conv3d.weight"].shape == (384, 832, 1, 1, 1)
    path = tmp_path / "flow_imagenet.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel-saved
    ex = create_extractor("off.i3d", weights=str(path), clip_frames=8, size=64)
    ex.setup()
    flow = np.random.default_rng(0).normal(0, 3, (8, 64, 64, 2)).astype(np.float32)
    out = ex.process(VideoSource("v", "v.mp4"), {"flow": Result(transient={"flow": flow})})
    x = torch.from_numpy(ex._prepare(flow)[None]).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        want = net.features(x)[0].numpy()
    assert out.arrays["descriptor"].shape == (1024,)
    np.testing.assert_allclose(out.arrays["descriptor"], want, rtol=1e-4, atol=1e-5)

    torch.save(build_i3d(2, 157).state_dict(), tmp_path / "charades.pt")
    with pytest.raises(ConfigError, match="num_classes=400"):
        create_extractor("off.i3d", weights=str(tmp_path / "charades.pt")).setup()
    with pytest.raises(MissingWeightsError, match="flow_imagenet.pt"):
        create_extractor("off.i3d").setup()


# ---------------------------------------------------------------- IDT


def test_trajectories_have_the_translation_displacement():
    frames = scene(n=20, pan=2.0)  # the whole image moves 2 px left per frame
    tracks = dense_trajectories(iter(frames), flow_of(frames), IDTConfig(camera=False))
    assert len(tracks.descriptors) > 100
    moved = tracks.end - tracks.start  # full-resolution pixels, over L = 15 frames
    np.testing.assert_allclose(np.median(moved, 0), [-30.0, 0.0], atol=1.0)
    assert (np.abs(moved[:, 0] + 30) < 3).mean() > 0.9
    assert set(np.unique(tracks.scale)) == set(range(4))  # every level of a 160×120 frame: 1, 1/√2, 1/2, 1/√8
    assert (tracks.end_frame >= 15).all()


def test_camera_pan_is_compensated_and_pruned():
    frames = scene(n=20, pan=2.5)
    flow = flow_of(frames)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[:2]]
    hom = estimate_homography(grey[0], grey[1], flow[0], cv2.ORB_create(500), 1.0)
    residual = flow[0] - camera_flow(hom, 160, 120)
    assert np.median(np.abs(residual[10:-10, 10:-10])) < 0.1
    uncompensated = dense_trajectories(iter(frames), flow, IDTConfig(camera=False))
    compensated = dense_trajectories(iter(frames), flow, IDTConfig())
    assert len(uncompensated.descriptors) > 200
    assert len(compensated.descriptors) <= 0.02 * len(uncompensated.descriptors)


def test_trajectories_survive_on_an_object_over_a_panning_background():
    speed, x0, size = 3.0, 20, 48
    frames = scene(n=24, pan=2.0, obj_speed=speed, obj_x0=x0, obj=size)
    tracks = dense_trajectories(iter(frames), flow_of(frames), IDTConfig())
    start_frame = tracks.end_frame - 15
    left = x0 + speed * start_frame
    rows = np.abs(tracks.start[:, 1] - 60) < size / 2 + 6
    on_object = rows & (tracks.start[:, 0] > left - 6) & (tracks.start[:, 0] < left + size + 6)
    assert on_object.sum() >= 20
    np.testing.assert_allclose(
        np.median(tracks.end[on_object] - tracks.start[on_object], 0)[0], 15 * speed, atol=3
    )
    # The panning background is pruned; what survives off the object sits in its rows, where
    # the object covers background points and drags them along (occlusion, as in real IDT).
    assert (~rows).mean() < 0.1


def test_descriptor_parts_have_their_dimensions_and_normalisation():
    frames = scene(n=20, pan=2.0)
    d = dense_trajectories(iter(frames), flow_of(frames), IDTConfig(camera=False)).descriptors
    assert d.shape[1] == 426 and [n for _, n in PARTS] == [30, 96, 108, 96, 96]
    parts = np.split(d, np.cumsum([30, 96, 108, 96]), axis=1)
    shape = parts[0].reshape(len(d), 15, 2)
    np.testing.assert_allclose(np.linalg.norm(shape, axis=2).sum(1), 1.0, atol=1e-4)
    for block in parts[1:5]:  # RootSIFT: ℓ1 then √, so the squares sum to one
        np.testing.assert_allclose((block.astype(np.float64) ** 2).sum(1), 1.0, atol=1e-4)


def test_idt_without_a_codebook_says_how_to_get_one():
    with pytest.raises(ConfigError, match="fit-codebooks"):
        create_extractor("idt")
    with pytest.raises(ConfigError, match="does not exist"):
        create_extractor("idt", codebook="/nowhere/demo.npz")


# ---------------------------------------------------------------- codebooks and encodings


@pytest.fixture(scope="module")
def book():
    x = np.random.default_rng(0).normal(size=(600, 426))
    return fit_codebook(x, components=5, words=12, seed=0, gmm_iterations=30)


def test_fisher_vector_matches_the_formula(book):
    x = book.project(np.random.default_rng(1).normal(size=(7, 426)))
    first, second = book.fisher_sums(x)
    w, m, s = book.gmm_weights, book.gmm_means, book.gmm_sigmas
    want1, want2 = np.zeros_like(m), np.zeros_like(m)
    for xi in x:  # p(k|x) straight from the densities
        dens = np.array(
            [
                w[k] * np.prod(np.exp(-0.5 * ((xi - m[k]) / s[k]) ** 2) / (math.sqrt(2 * math.pi) * s[k]))
                for k in range(5)
            ]
        )
        post = dens / dens.sum()
        for k in range(5):
            want1[k] += post[k] / math.sqrt(w[k]) * (xi - m[k]) / s[k]
            want2[k] += post[k] / math.sqrt(w[k]) * (((xi - m[k]) / s[k]) ** 2 - 1) / math.sqrt(2)
    np.testing.assert_allclose(first, want1.reshape(-1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(second, want2.reshape(-1), rtol=1e-6, atol=1e-9)


def test_fisher_vector_agrees_with_skimage(book):
    from skimage.feature import fisher_vector
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(book.components, covariance_type="diag")
    gmm.weights_, gmm.means_ = book.gmm_weights, book.gmm_means
    gmm.covariances_ = book.gmm_sigmas**2
    gmm.precisions_cholesky_ = 1.0 / book.gmm_sigmas
    x = book.project(np.random.default_rng(2).normal(size=(40, 426)))
    fv = fisher_vector(x, gmm)  # [d_π (K), d_μ (K·D), d_σ (K·D)], averaged, not normalised
    k, d = book.components, book.dim
    first, second = book.fisher_sums(x)
    np.testing.assert_allclose(first / 40, fv[k : k + k * d], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(second / 40, -fv[k + k * d :], rtol=1e-6, atol=1e-9)  # skimage's sign


def test_bow_is_hard_assignment_to_the_nearest_word(book):
    x = book.project(np.random.default_rng(3).normal(size=(30, 426)))
    nearest = np.argmin(((x[:, None] - book.words[None]) ** 2).sum(2), 1)
    assert np.array_equal(book.assign(x), nearest)
    cum = encode_cumulative(book, np.random.default_rng(3).normal(size=(30, 426)), np.zeros(30, int), 1, 1)
    np.testing.assert_allclose(cum["bow_cum"][-1], np.bincount(nearest, minlength=12))
    np.testing.assert_allclose(finish_bow(cum["bow_cum"][-1], 30).sum(), 1.0, rtol=1e-6)


def test_subsequence_pooling_equals_direct_pooling(book):
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(200, 426))
    ends = rng.integers(0, 40, 200)
    cum = encode_cumulative(book, raw, ends, 40, every=1)
    for first, last in [(0, 39), (5, 17), (20, 20), (31, 39)]:
        rows = (ends >= first) & (ends <= last)
        z = book.project(raw[rows])
        s1, s2 = book.fisher_sums(z)
        np.testing.assert_allclose(pool_frames(cum, "fv1", first, last), finish_fv(s1, rows.sum()), atol=1e-5)
        np.testing.assert_allclose(pool_frames(cum, "fv2", first, last), finish_fv(s2, rows.sum()), atol=1e-5)
        words = np.bincount(book.assign(z), minlength=12)
        np.testing.assert_allclose(pool_frames(cum, "bow", first, last), words / rows.sum(), atol=1e-6)
    coarse = encode_cumulative(book, raw, ends, 40, every=8)  # knots at 8, 16, …: exact on knot bounds
    np.testing.assert_allclose(pool_frames(coarse, "fv1", 9, 16), pool_frames(cum, "fv1", 9, 16), atol=1e-5)
    v = pool_frames(cum, "fv1", 0, 39)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_codebook_file_round_trip_and_hash(book, tmp_path):
    path = book.save(tmp_path, "k400")
    assert path.name == f"k400-{book.sha}.npz"
    back = Codebook.load(path)
    assert back.sha == Codebook.file_sha(path, "x") and back.dim == 213 and back.components == 5
    x = np.random.default_rng(5).normal(size=(9, 426))
    np.testing.assert_allclose(back.project(x), book.project(x))
    with pytest.raises(ConfigError, match="samples|sample"):
        fit_codebook(x, components=5, words=12)


def test_fit_codebooks_then_extract_then_clip_targets(tiny_demo_root, tmp_path):
    """The whole IDT path on the tiny demo: fit, encode, and per-clip targets (Prop. 1)."""
    from hallucinate.data import ClipDataset, ClipSpec, discover_streams
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    common = [f"data_root={tiny_demo_root}", f"out={tmp_path}", "workers=0", "progress=false"]
    assert main(["fit-codebooks", "videos=8", "components=4", "words=16", *common]) == 0
    link = tmp_path / "codebooks" / "demo.npz"
    assert link.is_symlink() and Codebook.load(link).meta["videos"] == 8
    assert main(["extract", "extractors=[idt]", f"options.idt.codebook={link}", "limit=4", *common]) == 0
    reader = ShardReader(tmp_path)
    vid = reader.video_ids[0]
    assert reader.get(vid, "idt/fv1").shape == (4 * 213,) and reader.get(vid, "idt/bow").shape == (16,)
    assert reader.entry(vid, "idt").attrs["codebook_sha"] == Codebook.load(link).sha

    defn = load_definition("demo", {})
    records = [r for r in load_dataset(defn, resolve_paths(defn, tiny_demo_root, None, None)).records][:4]
    streams = discover_streams(tmp_path, [r.video_id for r in records], ["idt"])
    assert {s.name for s in streams} == {"idt/bow", "idt/fv1", "idt/fv2"}
    data = ClipDataset(records, 6, ClipSpec(frames=8), train=False, store=tmp_path, streams=streams)
    whole, _ = data.ground_truth(records[0])
    item = data[0]
    assert item["mask"].all()
    assert not torch.allclose(item["gt"]["idt/fv1"], whole["idt/fv1"])  # an 8-frame crop, not the video
    assert item["gt"]["idt/fv1"].norm().item() == pytest.approx(1.0, abs=1e-4)
