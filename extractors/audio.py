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
    """librosa, with numba's JIT cache on disk so only the first process ever compiles.

    Without a writable cache directory every new worker spends about 20 s
    compiling; the default below is used only when the user has not set one.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "hallucinate" / "numba"))
    import librosa

    return librosa


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
    version = "1"
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
        # librosa's first call JIT-compiles (numba); pay it once per worker, not per video.
        self._features(np.zeros(self.config.sample_rate, np.float32) + 1e-3)

    def _features(self, samples: np.ndarray) -> np.ndarray:
        librosa = _import_librosa()

        c = self.config
        win = round(c.sample_rate * c.window_ms / 1000)
        hop = round(c.sample_rate * c.hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()
        power = librosa.feature.melspectrogram(
            y=samples,
            sr=c.sample_rate,
            n_fft=n_fft,
            win_length=win,
            hop_length=hop,
            n_mels=c.n_mels,
        )
        logmel = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)
        mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=c.n_mfcc)
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
