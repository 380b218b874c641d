"""Weighted-mean fusion (Eqs. 21-22) and the golden-section search for β."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from hallucinate.fusion import WeightedMeanFusion, golden_section, mean_weights
from hallucinate.trainer import Schedule, Trainer, build_hallucination_loss
from tests.test_trainer import STREAMS, _Data


def eq22(prior, beta, rho=0.1):
    """w_i = (1/|T|) max(w′_i, ρ)^β / Σ_j max(w′_j, ρ)^β, written out."""
    p = [max(v, rho) ** beta for v in prior]
    return [v / sum(p) / len(prior) for v in p]


def test_weights_follow_eq22_and_their_limits():
    prior = [0.9, 0.5, 0.05]
    for beta in (0.0, 1.0, 7.5):
        got = mean_weights(torch.tensor(prior, dtype=torch.float64), torch.tensor(beta), 0.1)
        torch.testing.assert_close(got, torch.tensor(eq22(prior, beta), dtype=torch.float64))
    equal = mean_weights(torch.tensor(prior), torch.tensor(0.0), 0.1)
    torch.testing.assert_close(equal, torch.full((3,), 1 / 9))
    winner = mean_weights(torch.tensor(prior), torch.tensor(1e4), 0.1)  # no overflow
    torch.testing.assert_close(winner, torch.tensor([1 / 3, 0.0, 0.0]))


def test_weighted_mean_fusion_matches_eq21():
    names = ["odf.a/descriptor", "odf.b/descriptor", "sdf.c/descriptor", "audio.d/stats"]
    fusion = WeightedMeanFusion(names, dim=4, haf_dim=4, fused_dim=None, seed=0)
    prior = [0.8, 0.4, 0.6, 0.3]
    fusion.set_prior(torch.tensor(prior))
    fusion.beta.fill_(2.0)
    streams, haf = torch.randn(3, 4, 4), torch.randn(3, 4)
    got = fusion(streams, haf)
    w_det = eq22(prior[:2], 2.0)
    odf = (w_det[0] * streams[:, 0] + w_det[1] * streams[:, 1]) / 2  # (1/|D|) Σ w_k ψ̃_k
    items = [odf, streams[:, 2], streams[:, 3], haf]
    top_prior = [(prior[0] + prior[1]) / 2, prior[2], prior[3], 1 / 4]  # w′_haf = 1/(|H*|+1)
    w = eq22(top_prior, 2.0)
    want = sum(wi * item for wi, item in zip(w, items, strict=True)) / 4
    torch.testing.assert_close(got, want)


def test_golden_section_finds_the_minimum():
    assert golden_section(lambda b: (b - 3.7) ** 2, 0, 50, iterations=40) == pytest.approx(3.7, abs=1e-3)
    assert golden_section(lambda b: math.exp(b), 0, 50) == pytest.approx(0, abs=0.05)  # at the edge


def test_beta_is_searched_after_the_warm_up(tmp_path):
    from hallucinate.backbones import create_backbone
    from hallucinate.model import HallucinationNet
    from hallucinate.power_norm import create_power_norm
    from tests.test_trainer import CLIP

    model = HallucinationNet(
        create_backbone("tiny3d", width=4), STREAMS, 3, CLIP.frames, CLIP.size,
        create_power_norm("asinhe"), d=16, hidden=32, fusion="weighted_mean",
    )  # fmt: skip
    hal = build_hallucination_loss("mse", len(STREAMS), 16, "grouped", 1.0, 0)
    schedule = Schedule(epochs=3, lr=1e-2, beta_warmup=2)
    trainer = Trainer(model, hal, schedule, tmp_path, log=lambda m: None)
    trainer.model.fuse.set_prior(torch.tensor([0.9, 0.2]))
    history = trainer.fit(
        DataLoader(_Data(), batch_size=4), DataLoader(_Data(), batch_size=4), progress=False
    )
    assert "beta" not in history[0] and "beta" in history[1] and "beta" in history[2]
    assert 0 <= history[-1]["beta"] <= 50
    assert float(trainer.model.fuse.beta) == pytest.approx(history[-1]["beta"])
    assert trainer.model.prednet[0].num_features == 16  # the mean keeps the streams' size


def test_checkpoints_from_before_the_fusion_module_still_load():
    from hallucinate.backbones import create_backbone
    from hallucinate.model import HallucinationNet
    from hallucinate.power_norm import create_power_norm
    from tests.test_trainer import CLIP

    net = HallucinationNet(
        create_backbone("tiny3d", width=4), STREAMS, 3, CLIP.frames, CLIP.size, create_power_norm("asinhe"),
        d=16, hidden=32, fused_dim=50,
    )  # fmt: skip
    old = {k.replace("fuse.sketch.", "fuse."): v for k, v in net.state_dict().items()}
    assert "fuse.hash" in old
    net.load_state_dict(old)  # strict
