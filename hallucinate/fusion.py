"""Fusion of the stream outputs and HAF before PredNet (METHOD.md §1.4).

``concat``: ψ_tot = [ψ̃_1; …; ψ̃_|H|; ψ_haf], then the fixed count sketch
P_tot (about 2,000 outputs), the paper's main pipeline.

``weighted_mean`` (Eqs. 21–22): streams of one family (``odf.*``, ``sdf.*``)
are first averaged with weights, then the families and HAF, with
w_i = (1/|T|)·max(w′_i, ρ)^β / Σ_{j∈T} max(w′_j, ρ)^β over the set T being
pooled. w′ comes from how well each stream's ground truth alone classifies
(``set_prior``) and β is searched on validation data during training
(``golden_section``); β = 0 gives equal weights and β → ∞ winner-takes-all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hallucinate.sketch import CountSketch
from pipelines.registry import Registry

FUSIONS: Registry[nn.Module] = Registry("fusion")


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    equal_sizes = False  # HAF keeps size d whatever the streams' size (MSK copies)

    def __init__(self, stream_names: list[str], dim: int, haf_dim: int, fused_dim: int | None, seed: int):
        super().__init__()
        total = dim * len(stream_names) + haf_dim
        self.sketch = CountSketch(total, fused_dim, seed) if fused_dim else nn.Identity()
        self.out_dim = fused_dim or total

    def forward(self, streams: torch.Tensor, haf: torch.Tensor) -> torch.Tensor:
        return self.sketch(torch.cat([streams.flatten(1), haf], 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before fusion was a module kept P_tot at "fuse.hash"/"fuse.sign".
        for name in ("hash", "sign"):
            if prefix + name in state_dict:
                state_dict[f"{prefix}sketch.{name}"] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def family(stream_name: str) -> str:
    """``odf.motion/descriptor`` -> ``odf``: the streams pooled together at the first level."""
    return stream_name.split("/", 1)[0].split(".", 1)[0]


def mean_weights(prior: torch.Tensor, beta: torch.Tensor, rho: float) -> torch.Tensor:
    """w_i = (1/|T|)·max(w′_i, ρ)^β / Σ_j max(w′_j, ρ)^β (Eq. 22), computed in log space
    so that a large β (winner-takes-all) does not overflow."""
    logits = beta * torch.log(prior.clamp(min=rho))
    return torch.softmax(logits, 0) / len(prior)


@FUSIONS.register("weighted_mean")
class WeightedMeanFusion(nn.Module):
    """Eqs. 21–22; the output has the streams' dimension (HAF must match it)."""

    equal_sizes = True

    def __init__(
        self,
        stream_names: list[str],
        dim: int,
        haf_dim: int,
        fused_dim: int | None,
        seed: int,
        rho: float = 0.1,
    ):
        super().__init__()
        if haf_dim != dim:
            raise ValueError(f"weighted-mean fusion needs HAF of the streams' size ({haf_dim} != {dim})")
        self.rho, self.out_dim = rho, dim
        families: dict[str, list[int]] = {}
        for i, name in enumerate(stream_names):
            families.setdefault(family(name), []).append(i)
        self.families = list(families.values())
        self.register_buffer("prior", torch.ones(len(stream_names)))  # w′ per stream
        self.register_buffer("beta", torch.zeros(()))

    def set_prior(self, prior: torch.Tensor) -> None:
        self.prior.copy_(prior)

    def forward(self, streams: torch.Tensor, haf: torch.Tensor) -> torch.Tensor:
        items, priors = [], []
        for members in self.families:
            idx = torch.tensor(members, device=streams.device)
            prior = self.prior[idx]
            if len(members) == 1:
                items.append(streams[:, members[0]])
            else:  # ODF = (1/|D|) Σ_k w_k ψ̃_k, the same for SDF (Eq. 21)
                w = mean_weights(prior, self.beta, self.rho)
                items.append((streams[:, idx] * w[:, None]).sum(1) / len(members))
            priors.append(prior.mean())
        n = len(items) + 1
        priors.append(torch.full((), 1.0 / n, device=haf.device))  # w′_haf = 1/(|H*|+1)
        w = mean_weights(torch.stack(priors), self.beta, self.rho)
        stacked = torch.stack([*items, haf], 1)  # (B, |H*|+1, d)
        return (stacked * w[:, None]).sum(1) / n


def golden_section(f: Callable[[float], float], low: float, high: float, iterations: int = 20) -> float:
    """The minimiser of a unimodal ``f`` on [low, high] by golden-section search."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2
