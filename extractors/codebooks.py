"""IDT codebooks and the BoW / Fisher-vector encodings (METHOD.md §2.1).

A codebook is fitted once per dataset on a sample of training trajectories
(``hallucinate fit-codebooks``): PCA of each descriptor part to half its
size (213 dimensions in all), a diagonal GMM (256 components) for Fisher
vectors and a k-means dictionary (1000 words) for BoW, all scikit-learn.
It is saved as ``<name>-<sha>.npz``; every descriptor encoded with it
records that hash, so results from two codebooks are never mixed.

Encodings are kept as *running sums* over frames (Prop. 1): Φ_t = Φ_{t−1} +
Σ_{x ending at t} φ(x). The descriptor of frames s..t is then
finish(Φ_t − Φ_{s−1}) — the average over those trajectories, then power and
ℓ2 normalisation for FV — which is what lets the trainer match the target to
the temporal crop it samples without re-encoding anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import ConfigError, HallucinateError

PARTS = (("trajectory", 30), ("hog", 96), ("hof", 108), ("mbhx", 96), ("mbhy", 96))
CODEBOOK_FORMAT = 1


@dataclass
class Codebook:
    """PCA per part, GMM (weights, means, σ) and k-means words, in the PCA'd 213-d space."""

    pca_means: list[np.ndarray]
    pca_components: list[np.ndarray]  # (d_part / 2, d_part) each
    gmm_weights: np.ndarray  # (K,)
    gmm_means: np.ndarray  # (K, D)
    gmm_sigmas: np.ndarray  # (K, D) standard deviations
    words: np.ndarray  # (W, D)
    meta: dict[str, Any] = field(default_factory=dict)
    sha: str = ""

    @property
    def dim(self) -> int:
        return sum(len(c) for c in self.pca_components)

    @property
    def components(self) -> int:
        return len(self.gmm_weights)

    def project(self, x: np.ndarray) -> np.ndarray:
        """Raw 426-d descriptors (n, 426) to the PCA'd (n, 213)."""
        out, start = [], 0
        for (_, d), mean, comp in zip(PARTS, self.pca_means, self.pca_components, strict=True):
            out.append((x[:, start : start + d].astype(np.float64) - mean) @ comp.T)
            start += d
        return np.concatenate(out, 1)

    def posteriors(self, x: np.ndarray) -> np.ndarray:
        """p(k | x) (n, K) of PCA'd descriptors under the diagonal GMM (log-sum-exp, float64)."""
        inv_var = 1.0 / self.gmm_sigmas**2
        log_det = np.log(self.gmm_sigmas).sum(1)
        quad = (
            (x**2) @ inv_var.T - 2 * x @ (self.gmm_means * inv_var).T + (self.gmm_means**2 * inv_var).sum(1)
        )
        log_p = np.log(self.gmm_weights) - log_det - 0.5 * (quad + x.shape[1] * math.log(2 * math.pi))
        log_p -= log_p.max(1, keepdims=True)
        p = np.exp(log_p)
        return p / p.sum(1, keepdims=True)

    def fisher_sums(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Σ_x of the first- and second-order FV blocks (K·D each), not yet averaged or normalised.

        First order: p(k|x)/√w_k · (x − m_k)/σ_k; second order:
        p(k|x)/√w_k · ((x − m_k)²/σ_k² − 1)/√2 (METHOD.md §2.1). Summed by
        matrix products over all descriptors at once.
        """
        p = self.posteriors(x)
        ps = p.sum(0)[:, None]  # (K, 1)
        px, px2 = p.T @ x, p.T @ (x**2)  # (K, D)
        m, s = self.gmm_means, self.gmm_sigmas
        sqrt_w = np.sqrt(self.gmm_weights)[:, None]
        first = (px - ps * m) / s / sqrt_w
        second = ((px2 - 2 * m * px + ps * m**2) / s**2 - ps) / (math.sqrt(2) * sqrt_w)
        return first.reshape(-1), second.reshape(-1)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest word of each PCA'd descriptor (hard assignment)."""
        from sklearn.metrics import pairwise_distances_argmin

        return pairwise_distances_argmin(x, self.words)

    # ------------------------------------------------------------ files

    def save(self, directory: str | Path, name: str) -> Path:
        """Writes ``<directory>/<name>-<sha16>.npz`` atomically; returns the path."""
        buf = io.BytesIO()
        arrays = {f"pca_mean_{k}": m for k, m in enumerate(self.pca_means)}
        arrays.update({f"pca_components_{k}": c for k, c in enumerate(self.pca_components)})
        meta = {**self.meta, "format": CODEBOOK_FORMAT, "parts": [p for p, _ in PARTS]}
        np.savez(
            buf,
            gmm_weights=self.gmm_weights,
            gmm_means=self.gmm_means,
            gmm_sigmas=self.gmm_sigmas,
            words=self.words,
            meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
            **arrays,
        )
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()[:16]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}-{sha}.npz"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.sha = sha
        return path

    @staticmethod
    def file_sha(path: str | Path, where: str) -> str:
        from pipelines.weights import file_sha256

        if not Path(path).is_file():
            raise ConfigError(
                f"{where}.codebook: {path} does not exist. Fit one with `hallucinate fit-codebooks "
                "dataset=...`, which prints the path of the file it writes."
            )
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        from pipelines.weights import file_sha256

        try:
            with np.load(path) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                n = len(meta["parts"])
                book = cls(
                    [z[f"pca_mean_{k}"] for k in range(n)],
                    [z[f"pca_components_{k}"] for k in range(n)],
                    z["gmm_weights"],
                    z["gmm_means"],
                    z["gmm_sigmas"],
                    z["words"],
                    meta,
                    file_sha256(path),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise HallucinateError(f"{path} is not a Hallucinate codebook ({exc}); fit it again") from None
        if meta.get("format") != CODEBOOK_FORMAT:
            raise HallucinateError(
                f"{path}: codebook format {meta.get('format')}, expected {CODEBOOK_FORMAT}"
            )
        return book


def fit_codebook(
    descriptors: np.ndarray,
    components: int = 256,
    words: int = 1000,
    seed: int = 0,
    gmm_iterations: int = 100,
    meta: dict[str, Any] | None = None,
    gmm_sample: int = 256_000,
) -> Codebook:
    """PCA per part to half its size, a diagonal GMM and a k-means dictionary (scikit-learn).

    The GMM is fitted on ``gmm_sample`` descriptors drawn from the rest, as
    Wang & Schmid fit theirs on 256,000: EM over 256 components costs
    ~10 s an iteration per million 213-d descriptors on one CPU core, and
    the estimate does not improve beyond a few hundred thousand. It starts
    from k-means++ seeds rather than a full k-means run. k-means is
    MiniBatchKMeans over every descriptor: Lloyd iterations with 1000 words
    cost minutes each, and the mini-batch dictionary is what large-scale
    BoW pipelines use.
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or x.shape[1] != sum(d for _, d in PARTS):
        raise ConfigError(f"codebook descriptors must be (n, 426), not {x.shape}")
    if len(x) < max(components, words):
        raise ConfigError(
            f"{len(x)} descriptors cannot fit {components} GMM components and {words} words; sample "
            "more videos (videos=...) or lower components=/words="
        )
    means, comps, start = [], [], 0
    for _, d in PARTS:
        pca = PCA(n_components=d // 2, random_state=seed).fit(x[:, start : start + d])
        means.append(pca.mean_)
        comps.append(pca.components_)
        start += d
    book = Codebook(means, comps, np.ones(1), np.zeros((1, 1)), np.ones((1, 1)), np.zeros((1, 1)))
    z = book.project(x)
    rng = np.random.default_rng(seed)
    for_gmm = z if len(z) <= gmm_sample else z[rng.choice(len(z), gmm_sample, replace=False)]
    gmm = GaussianMixture(
        components,
        covariance_type="diag",
        max_iter=gmm_iterations,
        random_state=seed,
        reg_covar=1e-6,
        init_params="k-means++",
    ).fit(for_gmm)
    kmeans = MiniBatchKMeans(words, random_state=seed, batch_size=4096, n_init=1).fit(z)
    book.gmm_weights, book.gmm_means = gmm.weights_, gmm.means_
    book.gmm_sigmas = np.sqrt(gmm.covariances_)
    book.words = kmeans.cluster_centers_
    book.meta = {
        **(meta or {}),
        "descriptors": len(x),
        "components": components,
        "words": words,
        "seed": seed,
        "gmm_sample": len(for_gmm),
        "gmm_iterations": int(gmm.n_iter_),
        "gmm_converged": bool(gmm.converged_),
    }
    return book


# ---------------------------------------------------------------- encodings


def finish_bow(counts: np.ndarray, n: float) -> np.ndarray:
    """Word counts of n descriptors to the averaged one-hot codes (ℓ1 histogram)."""
    return (np.asarray(counts, np.float64) / max(float(n), 1e-12)).astype(np.float32)


def finish_fv(sums: np.ndarray, n: float) -> np.ndarray:
    """FV block sums of n descriptors: average, signed square root, ℓ2 normalisation."""
    v = np.asarray(sums, np.float64) / max(float(n), 1e-12)
    v = np.sign(v) * np.sqrt(np.abs(v))
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def knot_frames(n_frames: int, every: int) -> np.ndarray:
    """Frames at which running sums are kept: every ``every`` frames, and the last frame."""
    return np.unique(np.append(np.arange(every, n_frames, every), max(n_frames - 1, 0))).astype(np.int32)


def encode_cumulative(
    book: Codebook, descriptors: np.ndarray, end_frame: np.ndarray, n_frames: int, every: int
) -> dict[str, np.ndarray]:
    """Running sums (Prop. 1) of counts, word counts and FV blocks at ``knot_frames``.

    Row j sums the trajectories ending on or before frame ``knot_frames[j]``.
    The per-segment sums are matrix products over the segment's
    trajectories; the loop is over segments, never over trajectories.
    """
    knots = knot_frames(n_frames, every)
    z = book.project(descriptors)
    segment = np.searchsorted(knots, end_frame, side="left")
    words = book.assign(z) if len(z) else np.zeros(0, int)
    k, d = book.components, book.dim
    n_words = len(book.words)
    counts = np.zeros((len(knots), 1))
    bow = np.zeros((len(knots), n_words))
    fv1 = np.zeros((len(knots), k * d))
    fv2 = np.zeros((len(knots), k * d))
    for j in np.unique(segment):
        rows = segment == j
        counts[j] = rows.sum()
        bow[j] = np.bincount(words[rows], minlength=n_words)
        fv1[j], fv2[j] = book.fisher_sums(z[rows])
    return {
        "knot_frames": knots[:, None],  # 2-D, like every running sum, so it is never taken for a target
        "count_cum": np.cumsum(counts, 0),
        "bow_cum": np.cumsum(bow, 0).astype(np.float32),
        "fv1_cum": np.cumsum(fv1, 0).astype(np.float32),
        "fv2_cum": np.cumsum(fv2, 0).astype(np.float32),
    }


FINISHERS = {"bow": finish_bow, "fv1": finish_fv, "fv2": finish_fv}


def pool_frames(cum: dict[str, np.ndarray], output: str, first: int, last: int) -> np.ndarray | None:
    """Prop. 1: ``output`` (bow, fv1, fv2) over trajectories ending in frames first..last.

    Uses the knots that bracket the range (Φ_last − Φ_{first−1}); ``None``
    when no trajectory ends there, so the caller can fall back to the
    whole-video descriptor.
    """
    knots = cum["knot_frames"].reshape(-1)
    hi = int(np.searchsorted(knots, last, side="right")) - 1
    lo = int(np.searchsorted(knots, first, side="left")) - 1  # last knot before ``first``
    hi = max(hi, min(lo + 1, len(knots) - 1))
    if hi < 0:
        return None
    total = cum[f"{output}_cum"][hi] - (cum[f"{output}_cum"][lo] if lo >= 0 else 0)
    n = cum["count_cum"][hi, 0] - (cum["count_cum"][lo, 0] if lo >= 0 else 0)
    return FINISHERS[output](total, n) if n > 0 else None
