"""Encoders shared by the descriptor families (METHOD.md §3).

ODF pools per-box vectors, SDF per-frame saliency vectors and the skeleton
features per-frame joints, all with the same multi-moment construction
(Eq. 16), so it is written once here, next to the RBF "positional
embedding" (§3.4) and a numpy front to the power normalisations that the
trainer also uses (``hallucinate.power_norm``), so the ground truth and the
stream outputs go through literally the same g.
"""

from __future__ import annotations

import numpy as np


def rbf_embed(x: np.ndarray, pivots: int = 7, sigma: float = 0.5, circular: bool = False) -> np.ndarray:
    """φ(x) of METHOD.md §3.4 for scalars in [0, 1]: shape x.shape + (pivots,).

    φ_z(x) = exp(−(x − ζ_z)² / σ²) with ζ evenly spaced in [0, 1]. With
    ``circular`` the distance wraps (min(|x − ζ|, 1 − |x − ζ|)) and the pivots
    are spaced over [0, 1) so that 0 and 1 are the same angle, as orientation
    needs.
    """
    x = np.asarray(x, np.float64)
    if circular:
        zeta = np.arange(pivots) / pivots
        dist = np.abs(x[..., None] - zeta)
        dist = np.minimum(dist, 1.0 - dist)
    else:
        zeta = np.linspace(0.0, 1.0, pivots)
        dist = x[..., None] - zeta
    return np.exp(-(dist**2) / sigma**2)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flips each row so its largest-magnitude entry is positive (METHOD.md §7.7).

    Singular vectors are defined up to sign; without a rule two runs (or two
    BLAS builds) could store u and −u for the same video, and the regression
    target would flip with them.
    """
    if vectors.size == 0:
        return vectors
    lead = vectors[np.arange(len(vectors)), np.abs(vectors).argmax(1)]
    return vectors * np.where(lead < 0, -1.0, 1.0)[:, None]


def multi_moment_size(dim: int, n_vectors: int) -> int:
    """Length of the Eq. 16 descriptor for ``dim``-d items: d·(4 + n′)."""
    return dim * (4 + n_vectors)


def multi_moment_pool(
    items: np.ndarray, groups: np.ndarray | None = None, n_vectors: int = 3, eps: float = 1e-12
) -> np.ndarray:
    """ψ of Eq. 16 for the rows of ``items`` (N, d); ``groups`` (N,) says which frame each row is from.

    Returns [μ/‖μ‖₂ ; u₁ … u_n′ ; skewness ; kurtosis ; λ²/Σλ²] of length
    d·(4+n′), in float64:

    * μ is the mean over all rows;
    * u_k are the leading left singular vectors of the centred, frame-weighted
      matrix Υ = (1/J)·[(υ_i − μ)/K_j(i)] (d × N), so each frame counts
      equally however many boxes it has. The SVD is taken of Υ itself, since
      N ≪ d; fewer than n′ non-trivial directions leave zero vectors;
    * skewness κ³/(κ²)^{3/2} and kurtosis κ⁴/(κ²)² are per dimension over the
      rows; a constant dimension gets 0 for both rather than NaN;
    * the trace-normalised eigenvalues λ² of ΥΥᵀ, zero-padded to length d.
    """
    items = np.asarray(items, np.float64)
    n, d = items.shape
    if n == 0:
        raise ValueError("multi-moment pooling needs at least one row")
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    mean = items.mean(0)
    centred = items - mean
    _, group_index, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / (len(counts) * counts[group_index])
    upsilon_t = centred * weights[:, None]  # Υᵀ, (N, d)
    # Υᵀ = A S Bᵀ  ⇒  Υ = B S Aᵀ: Υ's left singular vectors are the rows of Bᵀ.
    _, singular, vt = np.linalg.svd(upsilon_t, full_matrices=False)
    vectors = np.zeros((n_vectors, d))
    keep = min(n_vectors, int((singular > eps * max(1.0, singular[:1].max(initial=0.0))).sum()))
    vectors[:keep] = fix_signs(vt[:keep])
    m2 = (centred**2).mean(0)
    m3 = (centred**3).mean(0)
    m4 = (centred**4).mean(0)
    varying = m2 > eps
    safe = np.where(varying, m2, 1.0)
    skew = np.where(varying, m3 / safe**1.5, 0.0)
    kurt = np.where(varying, m4 / safe**2, 0.0)
    eig = np.zeros(d)
    power = singular**2
    total = power.sum()
    if total > eps:
        eig[: min(d, len(power))] = (power / total)[:d]
    norm = np.linalg.norm(mean)
    return np.concatenate([mean / (norm + eps), vectors.reshape(-1), skew, kurt, eig])


def power_normalise(x: np.ndarray, name: str = "sigme", **params: float) -> np.ndarray:
    """Applies the registered power normalisation ``name`` (``hallucinate.power_norm``) to a vector.

    The extractors use the trainer's own modules rather than a numpy copy of
    the formulas, so a target and a stream output can never disagree on g.
    """
    import torch

    from hallucinate.power_norm import create_power_norm

    with torch.no_grad():
        out = create_power_norm(name, **params)(torch.from_numpy(np.asarray(x, np.float64)))
    return out.numpy()


def check_power_norm(name: str, params: dict[str, float], where: str) -> None:
    """Fails at configuration time, not on every video, for an unknown PN or parameter."""
    from hallucinate.power_norm import create_power_norm
    from pipelines.errors import ConfigError

    try:
        create_power_norm(name, **params)
    except TypeError as exc:
        raise ConfigError(f"{where}.power_norm_params: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}.power_norm: {exc}") from None
