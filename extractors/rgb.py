"""X_rgb of a frozen backbone, for the frozen-backbone training mode (METHOD.md §1.6, §7.17).

The paper freezes its largest backbones (VideoMAE V2, InternVideo2) and
trains only the streams, HAF and PredNet on pre-extracted tokens. Running
the backbone once per video here, and storing X_rgb (clips × C × T′) in the
shards, makes training read a few kilobytes per video instead of decoding
and running the backbone every epoch, which is what makes it fast on a CPU.
``hallucinate train rgb_features=rgb.features/x_rgb`` then trains on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from extractors.base import Extractor, FrameSpec, Needs, OutputSpec, Result, VideoInput
from extractors.registry import register
from pipelines.device import pick_device


@dataclass
class RGBFeaturesConfig:
    backbone: str = "tiny3d"  # any registered backbone, e.g. videomae, tsn, r3d_18
    backbone_options: dict[str, Any] = field(default_factory=dict)  # e.g. weights=/path
    frames: int = 16  # clip length T
    size: int = 112  # centre crop S
    short_side: int = 128
    fps: float | None = None
    clips: int = 3  # clips per video, evenly spaced; training samples one of them
    device: str = "auto"


@register("rgb.features")
class RGBFeatures(Extractor):
    """X_rgb of a frozen backbone: `x_rgb` (clips, C, T′) per video."""

    weights = "checkpoint"
    version = "1"
    Config = RGBFeaturesConfig

    def needs(self) -> Needs:
        c = self.config
        return Needs(frames=FrameSpec(fps=c.fps, short_side=c.short_side))

    def produces(self) -> dict[str, OutputSpec]:
        return {"x_rgb": OutputSpec((self.config.clips, None, None), "float32", "X_rgb of each clip")}

    def setup(self) -> None:
        import torch

        from hallucinate.backbones import create_backbone
        from pipelines.weights import build_seeded

        c = self.config
        self._torch = torch
        self._device = pick_device(c.device)
        # Seeded: a backbone without weights is random but reproducible (tests, smoke runs).
        net = build_seeded(lambda: create_backbone(c.backbone, **c.backbone_options))
        self._net = net.eval().to(self._device)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        torch = self._torch
        c = self.config
        frames = np.concatenate([b.frames for b in video.frames(self.needs().frames)])
        n, h, w = frames.shape[:3]
        starts = np.linspace(0, max(n - c.frames, 0), c.clips).round().astype(int)
        y0, x0 = max((h - c.size) // 2, 0), max((w - c.size) // 2, 0)
        clips = np.stack(
            [frames[(s + np.arange(c.frames)) % n, y0 : y0 + c.size, x0 : x0 + c.size] for s in starts]
        )
        x = torch.from_numpy(clips).to(self._device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        with torch.inference_mode():
            x_rgb = self._net(x).float().cpu().numpy()
        return Result({"x_rgb": x_rgb.astype(np.float32)}, attrs={"frames_decoded": n})
