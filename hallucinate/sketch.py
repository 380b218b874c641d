"""Count sketch (METHOD.md §3.3): a fixed, seeded, sparse ±1 projection.

P[j, i] = s_i if h_i = j: each input coordinate is added, with a random sign,
to one random output coordinate, which preserves inner products in
expectation. The hash and signs are buffers drawn from a seed, so they are
saved with every checkpoint and identical for ground truth and PredNet input
across epochs, runs and the exported model.
"""

from __future__ import annotations

import torch
from torch import nn


class CountSketch(nn.Module):
    def __init__(self, d_in: int, d_out: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.d_in, self.d_out, self.seed = d_in, d_out, seed
        self.register_buffer("hash", torch.randint(0, d_out, (d_in,), generator=gen))
        self.register_buffer("sign", torch.randint(0, 2, (d_in,), generator=gen).float() * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_out)."""
        # zeros_like(...) + a d_out row and expand_as keep the batch axis symbolic
        # when traced (new_zeros(*x.shape) and index_add froze the example's batch
        # size into the exported ONNX model).
        out = torch.zeros_like(x[..., :1]) + x.new_zeros(self.d_out)
        return out.scatter_add(-1, self.hash.expand_as(x), x * self.sign.to(x.dtype))

    def matrix(self) -> torch.Tensor:
        """The dense d_out x d_in matrix P, for tests and inspection."""
        p = torch.zeros(self.d_out, self.d_in)
        p[self.hash, torch.arange(self.d_in)] = self.sign
        return p

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}, seed={self.seed}"


class MultiSketch(nn.Module):
    """M independent sketches of one target, concatenated (MSK, METHOD.md §7.15)."""

    def __init__(self, d_in: int, d_out: int, copies: int, seed: int) -> None:
        super().__init__()
        self.sketches = nn.ModuleList(CountSketch(d_in, d_out, seed * 1000 + m) for m in range(copies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([s(x) for s in self.sketches], dim=-1)
