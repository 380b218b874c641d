"""SDF: Eq. 17 against a per-pixel reference, orientation wrap-around, saliency peaks on a blob."""

import math

import numpy as np
import pytest

from extractors import create_extractor
from extractors.saliency import FRAME_DIM, SALIENCY, eq17, frame_vectors
from pipelines.errors import MissingWeightsError
from tests.helpers import moving_frames


def naive_eq17(s, sigma_o=1 / 12, sigma_s=1 / 4):
    """υ′ = Σ_ij Λ_ij φ(θ_ij/2π) ⊗ φ(x_j) ⊗ φ(y_i), one pixel at a time, from METHOD.md §2.4."""
    h, w = s.shape
    out = np.zeros((12, 5, 5))
    zeta_o = np.arange(12) / 12
    zeta_s = np.linspace(0, 1, 5)
    for i in range(h):
        for j in range(w):
            gx = s[i, min(j + 1, w - 1)] - s[i, max(j - 1, 0)]  # [-1, 0, 1], replicated border
            gy = s[min(i + 1, h - 1), j] - s[max(i - 1, 0), j]
            mag = math.hypot(gx, gy)
            theta = (math.atan2(gy, gx) % (2 * math.pi)) / (2 * math.pi)
            d = np.abs(theta - zeta_o)
            d = np.minimum(d, 1 - d)
            phi_o = np.exp(-(d**2) / sigma_o**2)
            phi_x = np.exp(-((j / (w - 1) - zeta_s) ** 2) / sigma_s**2)
            phi_y = np.exp(-((i / (h - 1) - zeta_s) ** 2) / sigma_s**2)
            out += mag * np.einsum("a,b,c->abc", phi_o, phi_x, phi_y)
    return out.reshape(-1)


def test_eq17_matches_the_per_pixel_formula():
    maps = np.random.default_rng(0).random((2, 9, 13))
    ours = eq17(maps, double=True)
    assert ours.shape == (2, 300)
    for k in range(2):
        np.testing.assert_allclose(ours[k], naive_eq17(maps[k]), rtol=1e-6, atol=1e-6)
    # The default float32 path agrees with float64 on a realistic map size.
    big = np.random.default_rng(1).random((2, 128, 160))
    np.testing.assert_allclose(eq17(big), eq17(big, double=True), rtol=1e-4, atol=1e-4 * eq17(big).max())


def ramp(angle, h=24, w=32):
    """A map whose gradient points at ``angle`` everywhere."""
    y, x = np.mgrid[0:h, 0:w].astype(float)
    return math.cos(angle) * x + math.sin(angle) * y


def test_orientation_wraps_around_the_circle():
    near_zero, near_two_pi, opposite = (eq17(ramp(a)[None])[0] for a in (0.0, 2 * math.pi - 1e-3, math.pi))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert cos(near_zero, near_two_pi) > 0.9999
    assert cos(near_zero, opposite) < 0.2


def test_frame_vector_is_556_with_normalised_parts():
    v = frame_vectors(np.random.default_rng(1).random((3, 32, 40)))
    assert v.shape == (3, FRAME_DIM) == (3, 556)
    np.testing.assert_allclose(np.linalg.norm(v[:, :300], axis=1), 1)
    np.testing.assert_allclose(v[:, 300:].sum(1), 1)


def blob_clip(n=12, h=96, w=128):
    """A still textured background with a bright blob that drifts right; its box in the last frame."""
    rng = np.random.default_rng(0)
    background = (90 + rng.normal(0, 4, (h, w, 3))).clip(0, 255)
    frames = np.repeat(background[None], n, 0)
    for t in range(n):
        x = 30 + 3 * t
        frames[t, 35:60, x : x + 25] = (250, 240, 60)
    return frames.astype(np.uint8), (35, 60, 30 + 3 * (n - 1), 55 + 3 * (n - 1))


def brightness_net(path):
    """A 'saliency net' that is the mean brightness: the deep backend's plumbing, checked exactly.

    Exported as a user would: TorchScript for ``.pt``, ONNX for ``.onnx``.
    """
    import torch
    from torch import nn

    net = nn.Conv2d(3, 1, 1, bias=False).eval()
    with torch.no_grad():
        net.weight.fill_(1 / 3)
    example = torch.zeros(1, 3, 48, 64)
    if path.suffix == ".onnx":
        torch.onnx.export(
            net, example, str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}}
        )
    else:
        torch.jit.trace(net, example).save(str(path))
    return path


BACKENDS = [b for b in SALIENCY.names() if b != "deep"] + ["deep:.pt", "deep:.onnx"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_puts_its_peak_on_the_blob(backend, tmp_path):
    frames, (top, bottom, left, right) = blob_clip()
    backend, _, suffix = backend.partition(":")
    cls = SALIENCY.get(backend)
    options = {}
    if backend == "deep":
        options = {
            "model": str(brightness_net(tmp_path / f"b{suffix}")),
            "input_size": [64, 48],
            "output": "minmax",
        }
        options.update(mean=[0, 0, 0], std=[1, 1, 1])
    model = cls(cls.Config(**options))
    model.setup()
    model.reset(frames)
    maps = model.maps(frames)
    assert maps.shape == frames.shape[:3] and maps.min() >= 0 and maps.max() <= 1
    last = maps[-1]
    strongest = np.argwhere(last >= np.quantile(last, 0.99))
    cy, cx = strongest.mean(0)
    margin = 6
    assert top - margin <= cy <= bottom + margin and left - margin <= cx <= right + margin, (backend, cy, cx)


def test_sdf_extractor_output_and_stored_maps(tmp_path):
    from pipelines.decode import VideoSource
    from pipelines.encode import write_video

    path = tmp_path / "v.mp4"
    write_video(path, moving_frames(20), 12, None)
    ex = create_extractor("sdf.motion", store_maps=24, n_vectors=2)
    ex.setup()
    result = ex.process(VideoSource("v", str(path)), {})
    assert result.arrays["descriptor"].shape == (556 * 6,)
    assert result.arrays["per_frame"].shape == (20, 556)
    assert result.arrays["maps"].shape == (20, 24, 24) and result.arrays["maps"].dtype == np.uint8
    assert result.attrs["saliency"] == "motion" and result.attrs["frames"] == 20
    assert np.abs(result.arrays["descriptor"]).max() <= 1  # SigmE


def test_deep_saliency_without_a_model_is_a_clear_error():
    with pytest.raises(MissingWeightsError, match="TorchScript or ONNX"):
        create_extractor("sdf.deep").setup()
