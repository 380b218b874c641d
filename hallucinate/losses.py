"""Hallucination losses (METHOD.md §4): masked MSE and the uncertainty loss of Eq. 19.

Both take the stacked residual of all streams, shaped (batch, streams, d),
and a (batch, streams) mask that is False where a modality is absent (no
audio, no skeleton, no boxes): such entries contribute nothing, so missing
ground truth never pulls a stream towards zero.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mse(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/|H|) Σ_i ‖ψ̃_i − ψ′_i‖², averaged over the samples where stream i has ground truth."""
    per = residual.pow(2).sum(-1) * mask  # (B, S)
    counts = mask.sum(0).clamp(min=1)
    return (per.sum(0) / counts).mean()


class CENet(nn.Module):
    """Covariance estimation network: FC → BatchNorm → ReLU → FC (METHOD.md §4.3).

    Predicts the non-zero entries of a lower-triangular ω with Ω = ωωᵀ the
    precision of the stacked residual; the diagonal is predicted as log ω_ii.
    """

    def __init__(self, d_in: int, n_out: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, n_out)
        )
        nn.init.zeros_(self.net[-1].weight)  # start at Ω = I, i.e. plain MSE
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UncertaintyLoss(nn.Module):
    """L = rᵀΩr − κ·log|Ω| with Ω = ωωᵀ and a sparse lower-triangular ω (Eq. 19).

    ``pattern`` fixes which entries of ω may be non-zero (METHOD.md §7.2):

    * ``grouped`` (default): for every coordinate k of the d sketch
      coordinates, the k-th coordinate of each of the S streams forms a
      group with a dense S×S lower-triangular block;
    * ``diagonal``: ω diagonal (heteroscedastic, Kendall & Gal);
    * ``literal``: the diagonal plus one dense S×S block over one randomly
      sampled coordinate per stream, re-drawn at every call.

    CENet's input is the detached stacked prediction, so a large predicted
    variance cannot explain the residual away through ψ̃ (§4.3).
    """

    def __init__(
        self,
        streams: int,
        d: int,
        pattern: str = "grouped",
        kappa: float = 1.0,
        log_diag_clamp: float = 5.0,
        hidden: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if pattern not in ("grouped", "diagonal", "literal"):
            raise ValueError(f"unknown Cholesky pattern {pattern!r}; use grouped, diagonal or literal")
        self.streams, self.d, self.pattern = streams, d, pattern
        self.kappa, self.clamp = kappa, log_diag_clamp
        self.tril = torch.tril_indices(streams, streams, offset=-1)
        n_block = self.tril.shape[1]
        n_off = {"grouped": d * n_block, "diagonal": 0, "literal": n_block}[pattern]
        self.cenet = CENet(streams * d, streams * d + n_off, hidden)
        self.generator = torch.Generator().manual_seed(seed)

    def n_parameters_predicted(self) -> int:
        return self.cenet.net[-1].out_features

    def cholesky_blocks(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ω as (B, d, S, S) lower-triangular blocks, one per sketch coordinate
        (grouped/diagonal), and the clamped log-diagonal (B, S, d)."""
        b, s, d = pred.shape[0], self.streams, self.d
        out = self.cenet(pred.detach().reshape(b, s * d))
        log_diag = out[:, : s * d].reshape(b, s, d).clamp(-self.clamp, self.clamp)
        omega = torch.diag_embed(log_diag.exp().transpose(1, 2))  # (B, d, S, S)
        if self.pattern == "grouped":
            off = out[:, s * d :].reshape(b, d, -1)
            omega = _put_tril(omega, off, self.tril)
        return omega, log_diag

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of rᵀΩr − κ·log|Ω| on the observed coordinates."""
        b, s, d = pred.shape
        m = mask.to(pred.dtype)  # (B, S)
        r = (pred - target) * m[..., None]
        if self.pattern == "literal":
            return self._literal(pred, r, m).mean()
        omega, log_diag = self.cholesky_blocks(pred)
        # Keep only entries whose row and column are both observed: ω restricted to
        # the observed coordinates is again a valid Cholesky factor.
        pair = (m[:, None, :, None] * m[:, None, None, :]).expand(b, d, s, s)
        eye = torch.eye(s, dtype=pred.dtype, device=pred.device)
        omega = omega * (pair * (1 - eye) + eye)
        quad = torch.einsum("bkij,bik->bkj", omega, r).pow(2).sum((1, 2))  # ‖ωᵀ r‖²
        log_det = 2 * (log_diag * m[..., None]).sum((1, 2))
        return (quad - self.kappa * log_det).mean()

    def _literal(self, pred: torch.Tensor, r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b, s, d = pred.shape
        out = self.cenet(pred.detach().reshape(b, s * d))
        log_diag = out[:, : s * d].reshape(b, s, d).clamp(-self.clamp, self.clamp)
        diag = log_diag.exp()
        # One sampled coordinate per stream forms the dense block.
        idx = torch.randint(0, d, (s,), generator=self.generator).to(pred.device)
        streams = torch.arange(s, device=pred.device)
        block = torch.diag_embed(diag[:, streams, idx])  # (B, S, S)
        block = _put_tril(block[:, None], out[:, None, s * d :], self.tril)[:, 0]
        obs = m[:, :, None] * m[:, None, :]
        eye = torch.eye(s, dtype=pred.dtype, device=pred.device)
        block = block * (obs * (1 - eye) + eye)
        r_block = r[:, streams, idx]  # (B, S)
        quad_block = torch.einsum("bij,bi->bj", block, r_block).pow(2).sum(1)
        rest = (diag * r).pow(2)
        rest[:, streams, idx] = 0.0
        quad = quad_block + rest.sum((1, 2))
        log_det = 2 * (log_diag * m[..., None]).sum((1, 2))
        return quad - self.kappa * log_det


def _put_tril(blocks: torch.Tensor, values: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """Writes ``values`` (B, K, n) into the strict lower triangles of ``blocks`` (B, K, S, S)."""
    out = blocks.clone()
    out[:, :, tril[0], tril[1]] = values
    return out
