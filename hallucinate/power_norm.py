"""Power normalisations g(.) of METHOD.md §3.1, as small torch modules.

Every stream output, the HAF output and the ground-truth targets (before
sketching, §7.4-7.5) pass through the same g, so hallucinated and true
descriptors live in one range. AsinhE is the default, as in the paper after
its ablation; SigmE is what the paper names for the ODF/SDF ground truth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.registry import Registry

POWER_NORMS: Registry[nn.Module] = Registry("power normalisation")


@POWER_NORMS.register("asinhe")
class AsinhE(nn.Module):
    """g(x) = arcsinh(γ′x) / arcsinh(γ′): smooth and unbounded."""

    def __init__(self, gamma: float = 100.0) -> None:
        super().__init__()
        self.gamma, self.scale = gamma, math.asinh(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.asinh(self.gamma * x) / self.scale


@POWER_NORMS.register("sigme")
class SigmE(nn.Module):
    """g(x) = 2 / (1 + exp(−η′x / (‖x‖₂ + ε′))) − 1, saturating at ±1; the norm is per vector."""

    def __init__(self, eta: float = 50.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.eta, self.eps = eta, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        return 2.0 * torch.sigmoid(self.eta * x / (norm + self.eps)) - 1.0


@POWER_NORMS.register("axmin")
class AxMin(nn.Module):
    """g(x) = sign(x)·min(η″|x| / (‖x‖₂ + ε′), 1): the piecewise-linear SigmE (|x| is our reading)."""

    def __init__(self, eta: float = 30.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.eta, self.eps = eta, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        return torch.sign(x) * torch.clamp(self.eta * x.abs() / (norm + self.eps), max=1.0)


@POWER_NORMS.register("gamma")
class Gamma(nn.Module):
    """g(x) = sign(x)·|x|^γ, 0 < γ ≤ 1 (reference only in the paper)."""

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * x.abs().pow(self.gamma)


@POWER_NORMS.register("maxexp")
class MaxExp(nn.Module):
    """g(x) = 1 − (1 − x)^η for x in [0, 1] (reference only); inputs are clamped to [0, 1]."""

    def __init__(self, eta: float = 10.0) -> None:
        super().__init__()
        self.eta = eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - x.clamp(0.0, 1.0)).pow(self.eta)


@POWER_NORMS.register("none")
class NoNorm(nn.Identity):
    """No power normalisation (for ablations)."""


def create_power_norm(name: str, **params: float) -> nn.Module:
    return POWER_NORMS.get(name)(**params)
