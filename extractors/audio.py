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


def audible(video: VideoInput, rate: int, silence_dbfs: float, min_samples: float):
    """(samples, level in dBFS, None), or (None, level, a ``no_audio`` Result) for a missing or silent track.

    Shared by the audio extractors, so "silent" means the same for all of
    them and the trainer masks the same videos in every audio stream.
    """
    track = video.audio(AudioSpec(rate=rate))
    if track is None:
        return None, None, Result(flags={"no_audio": "the file has no audio stream"})
    samples = track.samples
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
    dbfs = 20 * np.log10(rms + 1e-12)
    if samples.size < min_samples or dbfs < silence_dbfs:
        flags = {"no_audio": f"silent track ({dbfs:.0f} dBFS < {silence_dbfs:.0f})"}
        return None, dbfs, Result(flags=flags, attrs={"rms_dbfs": dbfs})
    return samples, dbfs, None


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
        samples, dbfs, flagged = audible(
            video, c.sample_rate, c.silence_dbfs, c.sample_rate * c.window_ms / 1000
        )
        if flagged is not None:
            return flagged
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


# ---------------------------------------------------------------- SoundNet-8 (the paper's AF)


def build_soundnet8():
    """SoundNet-8 (Aytar, Vondrick & Torralba 2016) with the common PyTorch port's names.

    Written from the paper's architecture; parameter names (``conv1``,
    ``batchnorm1`` … ``conv8``, ``conv8_2``) follow the widely used port of
    ``soundnet8_final.t7`` (``sound8.pth``), with waveforms as (B, 1, N, 1),
    so those checkpoints load unchanged. ``pool5`` returns the 256-channel
    output of the fifth block, which the paper's AF averages over time.
    """
    from torch import nn

    def block(cin, cout, kernel, stride, padding, pool=None):
        layers = [
            nn.Conv2d(cin, cout, (kernel, 1), (stride, 1), (padding, 0)),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
            nn.ReLU(True),
        ]
        return layers + ([nn.MaxPool2d((pool, 1), (pool, 1))] if pool else [])

    spec = [  # (in, out, kernel, stride, padding, max-pool)
        (1, 16, 64, 2, 32, 8),
        (16, 32, 32, 2, 16, 8),
        (32, 64, 16, 2, 8, None),
        (64, 128, 8, 2, 4, None),
        (128, 256, 4, 2, 2, 4),
        (256, 512, 4, 2, 2, None),
        (512, 1024, 4, 2, 2, None),
    ]

    class SoundNet8(nn.Module):
        def __init__(self):
            super().__init__()
            for i, args in enumerate(spec, 1):
                conv, bn, relu, *pool = block(*args)
                setattr(self, f"conv{i}", conv)
                setattr(self, f"batchnorm{i}", bn)
                setattr(self, f"relu{i}", relu)
                if pool:
                    setattr(self, f"maxpool{i}", pool[0])
            self.conv8 = nn.Conv2d(1024, 1000, (8, 1), (2, 1))  # ImageNet-object head
            self.conv8_2 = nn.Conv2d(1024, 401, (8, 1), (2, 1))  # Places-scene head

        def _through(self, x, last):
            for i in range(1, last + 1):
                x = getattr(self, f"relu{i}")(getattr(self, f"batchnorm{i}")(getattr(self, f"conv{i}")(x)))
                if hasattr(self, f"maxpool{i}"):
                    x = getattr(self, f"maxpool{i}")(x)
            return x

        def pool5(self, x):
            """(B, 256, T′, 1) for waveforms (B, 1, N, 1)."""
            return self._through(x, 5)

        def forward(self, x):
            """Object and scene logits; the conv8 heads need about 10 s of audio or more."""
            x = self._through(x, 7)
            return self.conv8(x), self.conv8_2(x)

    return SoundNet8()


@dataclass
class SoundNetConfig:
    weights: str | None = None  # the PyTorch port's sound8.pth (required; "random" for tests)
    sample_rate: int = 22050  # SoundNet was trained on 22.05 kHz mono
    scale: float = 256.0  # waveforms in [-1, 1] are scaled to ±256, as in training
    silence_dbfs: float = -60.0
    min_seconds: float = 1.0  # shorter tracks are padded by repetition (pool5 needs ~0.75 s)
    device: str = "auto"


@register("audio.soundnet")
class SoundNetAF(Extractor):
    """The paper's AF: SoundNet-8 pool5 (256-d) averaged over time; silent or missing audio is flagged."""

    weights = "checkpoint"
    version = "1"
    Config = SoundNetConfig

    def needs(self) -> Needs:
        return Needs(audio=AudioSpec(rate=self.config.sample_rate))

    def produces(self) -> dict[str, OutputSpec]:
        return {"descriptor": OutputSpec((256,), "float32", "SoundNet-8 pool5, averaged over time")}

    def setup(self) -> None:
        import torch

        from pipelines.device import pick_device
        from pipelines.weights import build_seeded, load_required_checkpoint

        c = self.config
        net = build_seeded(build_soundnet8)
        self._identity = load_required_checkpoint(
            net,
            c.weights,
            f"{self.name} (SoundNet-8)",
            "options.audio.soundnet.weights",
            "Set it to the PyTorch port of soundnet8_final.t7 (sound8.pth); audio.logmel needs no weights.",
            "a SoundNet-8 checkpoint",
        )
        self._torch = torch
        self._device = pick_device(c.device)
        self._net = net.eval().to(self._device)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        torch, c = self._torch, self.config
        samples, dbfs, flagged = audible(video, c.sample_rate, c.silence_dbfs, 1)
        if flagged is not None:
            return flagged
        need = int(c.min_seconds * c.sample_rate)
        if samples.size < need:
            samples = np.tile(samples, -(-need // samples.size))
        x = torch.from_numpy(samples.astype(np.float32) * c.scale).view(1, 1, -1, 1).to(self._device)
        with torch.inference_mode():
            pool5 = self._net.pool5(x)[0, :, :, 0].float().cpu().numpy()  # (256, T′)
        attrs = {"weights": self._identity, "rms_dbfs": dbfs, "pool5_steps": pool5.shape[1]}
        return Result({"descriptor": pool5.mean(1).astype(np.float32)}, attrs=attrs)
