"""Weight-free audio descriptor: log-mel and MFCC statistics (librosa).

This is the AF stream's default when no SoundNet weights are given: a
64-band log-mel spectrogram (25 ms windows, 10 ms hop) and MFCCs with first
and second deltas, summarised per video by mean, standard deviation and
skewness, plus a fixed-length temporal pyramid of the log-mel so that the
order of sounds is not lost. A video without an audio stream, or with a
silent one, is *flagged* ``no_audio`` rather than given a zero descriptor,
so the trainer masks the stream instead of learning that silence is zero.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extractors.base import AudioSpec, Extractor, Needs, OutputSpec, Result, VideoInput
from extractors.registry import register


def _import_librosa():
    """librosa, with numba's cache directory set in case a function we call compiles.

    The numba cache is keyed by librosa's install path, so a fresh virtual
    environment or cluster node starts cold; see ``mel_power`` for why the
    one function that compiled for 16 s is not librosa's here.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "hallucinate" / "numba"))
    import librosa

    return librosa


def mel_power(samples: np.ndarray, rate: int, n_fft: int, win: int, hop: int, n_mels: int) -> np.ndarray:
    """Mel power spectrogram (n_mels, frames), equal to ``librosa.feature.melspectrogram``
    with ``center=True`` and zero padding.

    The STFT is done with numpy here because ``librosa.stft`` is numba-compiled
    and costs about 16 s on its first call in every new environment (and
    ``librosa.feature.mfcc`` / ``power_to_db`` another 17 s, hence
    ``log_mel_mfcc``); the mel filterbank is librosa's.
    """
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.signal import get_window

    window = get_window("hann", win, fftbins=True)
    left = (n_fft - win) // 2
    window = np.pad(window, (left, n_fft - win - left))
    padded = np.pad(samples.astype(np.float32, copy=False), n_fft // 2)
    if len(padded) < n_fft:
        padded = np.pad(padded, (0, n_fft - len(padded)))
    frames = sliding_window_view(padded, n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = _import_librosa().filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels)
    return (mel @ power.T).astype(np.float32)


def log_mel_mfcc(power: np.ndarray, n_mfcc: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel in dB and MFCCs, equal to ``librosa.power_to_db(power, ref=1.0,
    amin=1e-10, top_db=None)`` and ``librosa.feature.mfcc`` (DCT-II, orthonormal)."""
    from scipy.fft import dct

    logmel = 10.0 * np.log10(np.maximum(power, 1e-10))
    return logmel, dct(logmel, axis=0, type=2, norm="ortho")[:n_mfcc]


@dataclass
class LogMelConfig:
    sample_rate: int = 16000
    n_mels: int = 64
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mfcc: int = 20
    pyramid_levels: list[int] = field(default_factory=lambda: [1, 2, 4])
    silence_dbfs: float = -60.0  # RMS below this counts as a silent track


@register("audio.logmel")
class LogMelStats(Extractor):
    """Log-mel and MFCC statistics plus a log-mel temporal pyramid (AF, weight-free, default set)."""

    version = "2"  # 2: numpy STFT and scipy DCT instead of librosa's (same values to 1e-4)
    Config = LogMelConfig
    in_default_set = True

    @property
    def _n_features(self) -> int:
        return self.config.n_mels + 3 * self.config.n_mfcc

    def needs(self) -> Needs:
        return Needs(audio=AudioSpec(rate=self.config.sample_rate))

    def produces(self) -> dict[str, OutputSpec]:
        levels = sum(self.config.pyramid_levels)
        return {
            "stats": OutputSpec(
                (3 * self._n_features,),
                "float32",
                "mean, std and skewness over time of [log-mel, MFCC, delta, delta-delta]",
            ),
            "pyramid": OutputSpec(
                (levels * self.config.n_mels,), "float32", "log-mel means over a temporal pyramid"
            ),
        }

    def setup(self) -> None:
        # Imports and first-call costs are paid once per worker, not on the first video.
        self._features(np.zeros(self.config.sample_rate, np.float32) + 1e-3)

    def _features(self, samples: np.ndarray) -> np.ndarray:
        librosa = _import_librosa()

        c = self.config
        win = round(c.sample_rate * c.window_ms / 1000)
        hop = round(c.sample_rate * c.hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()
        power = mel_power(samples, c.sample_rate, n_fft, win, hop, c.n_mels)
        logmel, mfcc = log_mel_mfcc(power, c.n_mfcc)
        width = min(9, mfcc.shape[1] - (1 - mfcc.shape[1] % 2))
        if width >= 3:
            d1 = librosa.feature.delta(mfcc, width=width, order=1, mode="nearest")
            d2 = librosa.feature.delta(mfcc, width=width, order=2, mode="nearest")
        else:
            d1 = d2 = np.zeros_like(mfcc)
        return np.concatenate([logmel, mfcc, d1, d2]).astype(np.float32)  # (features, time)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        from scipy.stats import skew

        c = self.config
        track = video.audio(AudioSpec(rate=c.sample_rate))
        if track is None:
            return Result(flags={"no_audio": "the file has no audio stream"})
        samples = track.samples
        rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
        dbfs = 20 * np.log10(rms + 1e-12)
        if samples.size < c.sample_rate * c.window_ms / 1000 or dbfs < c.silence_dbfs:
            return Result(
                flags={"no_audio": f"silent track ({dbfs:.0f} dBFS < {c.silence_dbfs:.0f})"},
                attrs={"rms_dbfs": dbfs},
            )
        feats = self._features(samples)
        stats = np.concatenate([feats.mean(1), feats.std(1), np.nan_to_num(skew(feats, axis=1))]).astype(
            np.float32
        )
        logmel = feats[: c.n_mels]
        pyramid = [
            part.mean(1)
            for level in c.pyramid_levels
            for part in np.array_split(logmel, level, axis=1)
            if part.shape[1]
        ]
        pyramid_vec = np.concatenate(pyramid).astype(np.float32)
        if pyramid_vec.size != sum(c.pyramid_levels) * c.n_mels:
            # Fewer frames than pyramid cells: repeat frames so the length stays fixed.
            reps = -(-max(c.pyramid_levels) // logmel.shape[1])
            logmel = np.repeat(logmel, reps, axis=1)
            pyramid_vec = np.concatenate(
                [p.mean(1) for lv in c.pyramid_levels for p in np.array_split(logmel, lv, axis=1)]
            ).astype(np.float32)
        return Result(
            {"stats": stats, "pyramid": pyramid_vec},
            attrs={"rms_dbfs": dbfs, "audio_seconds": samples.size / c.sample_rate},
        )
