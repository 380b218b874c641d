"""The method's formulas, checked directly (METHOD.md §3.1, §3.3, §4.3)."""

import math

import numpy as np
import pytest
import torch

from hallucinate.losses import UncertaintyLoss, masked_mse
from hallucinate.power_norm import POWER_NORMS, create_power_norm
from hallucinate.sketch import CountSketch, MultiSketch


def test_power_norms_match_their_formulas():
    x = torch.randn(4, 50, dtype=torch.float64)
    norm = x.norm(dim=-1, keepdim=True).numpy()
    xn = x.numpy()
    expected = {
        "asinhe": np.arcsinh(100 * xn) / math.asinh(100),
        "sigme": 2 / (1 + np.exp(-50 * xn / (norm + 1e-6))) - 1,
        "axmin": np.sign(xn) * np.minimum(30 * np.abs(xn) / (norm + 1e-6), 1),
        "gamma": np.sign(xn) * np.abs(xn) ** 0.5,
        "maxexp": 1 - (1 - np.clip(xn, 0, 1)) ** 10,
        "none": xn,
    }
    assert set(POWER_NORMS.names()) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(create_power_norm(name)(x).numpy(), want, rtol=1e-10, atol=1e-12)


def test_power_norm_parameters():
    x = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    np.testing.assert_allclose(
        create_power_norm("asinhe", gamma=3.0)(x).numpy(), np.arcsinh(3 * x.numpy()) / math.asinh(3)
    )
    assert create_power_norm("sigme")(torch.full((1, 4), 1e6)).max() <= 1.0


def test_count_sketch_is_the_sparse_matrix_and_seeded():
    sk = CountSketch(300, 40, seed=3)
    x = torch.randn(5, 300)
    p = sk.matrix()
    assert ((p != 0).sum(0) == 1).all() and set(p.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(sk(x), x @ p.T)
    torch.testing.assert_close(CountSketch(300, 40, seed=3)(x), sk(x))
    assert not torch.equal(CountSketch(300, 40, seed=4)(x), sk(x))
    assert MultiSketch(300, 40, 3, seed=1)(x).shape == (5, 120)


def test_count_sketch_preserves_inner_products_in_expectation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, generator=gen), torch.randn(500, generator=gen)
    b = 0.6 * a + 0.8 * b  # correlated, true inner product well away from 0
    true = float(a @ b)
    est = torch.tensor(
        [float(CountSketch(500, 64, seed=s)(a) @ CountSketch(500, 64, seed=s)(b)) for s in range(400)]
    )
    # Unbiased: the mean is within 4 standard errors of the truth; the spread
    # respects the variance bound (1/d)(<a,b>² + |a|²|b|²).
    bound = (true**2 + float(a @ a) * float(b @ b)) / 64
    assert abs(float(est.mean()) - true) < 4 * math.sqrt(bound / len(est))
    assert float(est.var()) < 1.3 * bound


def test_masked_mse_ignores_missing_ground_truth():
    r = torch.tensor([[[1.0, 1.0], [3.0, 0.0]], [[1.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    # stream 0: (2 + 1) / 2 samples; stream 1: 9 / 1 sample; mean over streams
    assert float(masked_mse(r, mask)) == pytest.approx((1.5 + 9.0) / 2)


def _dense_unc(loss: UncertaintyLoss, pred, target, mask, idx=None):
    """Eq. 19 built densely: the full d′ x d′ ω, rᵀωωᵀr − κ log det(ωωᵀ) on observed coords."""
    b, s, d = pred.shape
    out = loss.cenet(pred.detach().reshape(b, s * d))
    log_diag = out[:, : s * d].reshape(b, s, d).clamp(-loss.clamp, loss.clamp)
    tril = torch.tril_indices(s, s, offset=-1)
    values = []
    for n in range(b):
        omega = torch.diag(log_diag[n].exp().reshape(-1)).double()  # index i*d + k
        if loss.pattern == "grouped":
            off = out[n, s * d :].reshape(d, -1)
            for k in range(d):
                for m, (i, j) in enumerate(tril.T.tolist()):
                    omega[i * d + k, j * d + k] = off[k, m]
        elif loss.pattern == "literal":
            for m, (i, j) in enumerate(tril.T.tolist()):
                omega[i * d + idx[i], j * d + idx[j]] = out[n, s * d + m]
        obs = torch.tensor([bool(mask[n, i]) for i in range(s) for _ in range(d)])
        w = omega[obs][:, obs]
        r = (pred[n] - target[n]).reshape(-1)[obs].double()
        prec = w @ w.T
        values.append(r @ prec @ r - loss.kappa * torch.logdet(prec))
    return torch.stack(values).mean()


@pytest.mark.parametrize("pattern", ["grouped", "diagonal", "literal"])
def test_uncertainty_loss_equals_the_dense_formula(pattern):
    torch.manual_seed(0)
    b, s, d = 5, 3, 4
    loss = UncertaintyLoss(s, d, pattern=pattern, kappa=0.7, seed=11)
    for p in loss.cenet.parameters():  # move away from the Ω = I initialisation
        torch.nn.init.normal_(p, std=0.3)
    loss.cenet.eval()
    pred, target = torch.randn(b, s, d), torch.randn(b, s, d)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    idx = torch.randint(0, d, (s,), generator=torch.Generator().manual_seed(11)).tolist()
    got = loss(pred, target, mask)
    want = _dense_unc(loss, pred, target, mask, idx)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4, abs=1e-4)


def test_uncertainty_loss_parameter_count_and_start():
    loss = UncertaintyLoss(8, 128, "grouped")
    assert loss.n_parameters_predicted() == 128 * (8 * 8 - 8) // 2 + 8 * 128
    loss.eval()
    pred, target = torch.randn(2, 8, 128), torch.randn(2, 8, 128)
    ones = torch.ones(2, 8, dtype=torch.bool)
    # CENet starts at Ω = I: the loss is the plain sum of squares.
    assert float(loss(pred, target, ones)) == pytest.approx(float((pred - target).pow(2).sum((1, 2)).mean()))


def test_uncertainty_loss_does_not_backpropagate_through_cenet_input():
    loss = UncertaintyLoss(2, 3, "grouped")
    for p in loss.cenet.parameters():
        torch.nn.init.normal_(p, std=0.3)
    pred = torch.randn(4, 2, 3, requires_grad=True)
    loss(pred, torch.zeros(4, 2, 3), torch.ones(4, 2, dtype=torch.bool)).backward()
    # The gradient wrt pred is exactly 2Ωr: the path through CENet's input is cut.
    with torch.no_grad():
        omega, _ = loss.cholesky_blocks(pred)
        prec = omega @ omega.transpose(-1, -2)  # (B, d, S, S)
        expected = 2 * torch.einsum("bkij,bjk->bik", prec, pred) / pred.shape[0]
    torch.testing.assert_close(pred.grad, expected, rtol=1e-4, atol=1e-5)


def _net(dims, d=16):
    from hallucinate.backbones import create_backbone
    from hallucinate.model import HallucinationNet, StreamSpec

    torch.manual_seed(0)
    streams = [StreamSpec(f"s{i}/x", dim) for i, dim in enumerate(dims)]
    net = HallucinationNet(
        create_backbone("tiny3d", width=4), streams, 3, 8, 32, create_power_norm("asinhe"), d=d, hidden=8
    )
    return net, streams


def test_targets_have_the_same_scale_whatever_the_descriptor_size():
    """A count sketch keeps norms, so without rescaling an 8,000-d target would dwarf a 300-d one."""
    from hallucinate.model import TARGET_RMS

    net, streams = _net([300, 8000], d=64)
    gt = {s.name: torch.randn(32, s.dim) * 3 + 1 for s in streams}
    t = net.target(gt)  # (32, 2, 64)
    # Per stream, averaged over the videos: one video's sketch scatters around
    # its norm (a 300-d vector in 64 buckets), so a per-video bound is a matter
    # of luck; unrescaled, the 8,000-d stream would be five times the 300-d one.
    rms = t.pow(2).mean(-1).sqrt().mean(0)
    np.testing.assert_allclose(rms.numpy(), TARGET_RMS, rtol=0.1)


def test_stream_heads_start_by_predicting_zero():
    """Zero-initialised last layers: on the demo, randomly initialised heads silenced their
    noise by killing every hidden ReLU in the first epoch and then output a constant."""
    net, _ = _net([40, 50])
    clips = torch.rand(4, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        x = net.backbone(clips)
        assert net.hallucinate(x).abs().max() == 0
        assert x.std(0).mean() > 0  # the zero comes from the heads, not from a dead input


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_stream_heads_keep_their_hidden_units_alive(kind):
    """X_rgb comes out of a ReLU (non-negative, mean well above 0). Under Adam, heads
    without BatchNorm before their ReLUs lost over half their hidden units in 300
    steps of plain regression, and on the demo every unit of every stream head."""
    from hallucinate.model import StreamHead

    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 128, 4, generator=gen) + 1.0) * 1.5
    proj = torch.randn(128 * 4, 32, generator=gen) / (128 * 4) ** 0.5
    y = x.flatten(1) @ proj
    target = torch.tanh(y - y.mean(0))  # within reach of a power-normalised output
    torch.manual_seed(0)
    head, pn = StreamHead(128, 4, 32, 256, kind), create_power_norm("asinhe")
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(0, 64, (16,), generator=gen)
        loss = (pn(head(x[idx])) - target[idx]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        hidden = head.body[:-1](x) if kind == "fc" else head.body[:-2](x)
        dead = hidden.transpose(0, 1).flatten(1).amax(1) <= 0  # per unit, over clips (and time)
        pred = pn(head(x))
    assert dead.float().mean() < 0.1
    assert 1 - (pred - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum() > 0.7


def test_label_r2_is_the_share_of_the_target_the_classes_explain():
    from hallucinate.metrics import label_r2

    rng = np.random.default_rng(0)
    n, classes, d = 4000, 5, 8
    means = rng.normal(0, 1, (classes, d))  # between-class variance about 1 per coordinate
    y = torch.from_numpy(rng.integers(0, classes, n))
    informative = means[y.numpy()] + rng.normal(0, 1, (n, d))  # within-class variance 1: R² about 1/2
    nuisance = rng.normal(0, 1, (n, d))  # nothing to do with the class: R² 0
    t = torch.from_numpy(np.stack([informative, nuisance], 1)).float()
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[:50, 0] = False
    t[:50, 0] = 1e6  # missing ground truth is ignored, on both sides
    y[50:60] = -1  # so are clips without a label
    t[50:60] = 1e6
    half = n // 2
    fit, out = (t[:half], y[:half], mask[:half]), (t[half:], y[half:], mask[half:])
    share, none = label_r2(fit, out, classes)
    expected = means.var(0).mean() / (means.var(0).mean() + 1.0)
    assert share == pytest.approx(expected, abs=0.05)
    assert none == pytest.approx(0.0, abs=0.02)

    # Multi-label: multi-hot rows plus an intercept, so an affine target is recovered exactly.
    hot = torch.from_numpy(rng.integers(0, 2, (n, classes))).float()
    w = rng.normal(0, 1, (classes, d))
    affine = torch.from_numpy(hot.numpy() @ w + 3.0).float()[:, None]
    ones = torch.ones(n, 1, dtype=torch.bool)
    (exact,) = label_r2(
        (affine[:half], hot[:half], ones[:half]), (affine[half:], hot[half:], ones[half:]), classes
    )
    assert exact == pytest.approx(1.0, abs=1e-6)

    few = ones.clone()
    few[1:] = False  # one clip with ground truth: no R²
    assert math.isnan(label_r2((affine, hot, few), (affine, hot, ones), classes)[0])
