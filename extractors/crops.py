"""What a detection's box crop looks like: the y_inet part of the per-box vector (METHOD.md §2.3).

The paper runs an ImageNet classifier on every box crop and keeps its
class probabilities. That needs weights, so the default here is a
weight-free appearance descriptor of fixed size (HOG of the grey crop plus
a hue/saturation histogram), which still tells a ring from a bar. The name
of the backend used is stored with every ODF result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from pipelines.device import pick_device
from pipelines.errors import ConfigError
from pipelines.registry import Registry
from pipelines.weights import create_timm_model, file_sha256, read_state_dict, torchvision_model


def crop_boxes(frame: np.ndarray, boxes: np.ndarray, min_px: int = 2) -> list[np.ndarray]:
    """Pixel crops of ``boxes`` (normalised corners), at least ``min_px`` on a side."""
    h, w = frame.shape[:2]
    crops = []
    for x1, y1, x2, y2 in boxes:
        left, top = int(np.floor(x1 * w)), int(np.floor(y1 * h))
        right = max(left + min_px, int(np.ceil(x2 * w)))
        bottom = max(top + min_px, int(np.ceil(y2 * h)))
        left, top = min(left, w - min_px), min(top, h - min_px)
        crops.append(frame[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)])
    return crops


class CropFeatures(ABC):
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    @abstractmethod
    def dim(self) -> int: ...

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Loads the classifier, once per worker."""

    @abstractmethod
    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 for ``n`` RGB uint8 crops of any size."""

    def provenance(self) -> dict[str, Any]:
        return {}


CROP_FEATURES: Registry[CropFeatures] = Registry("crop feature backend")


@dataclass
class AppearanceConfig:
    size: int = 32  # crops are resized to size x size
    orientations: int = 9
    cell: int = 8
    hue_bins: int = 8
    saturation_bins: int = 4


@CROP_FEATURES.register("appearance")
class Appearance(CropFeatures):
    """HOG of the grey crop (2x2-cell blocks, L2-Hys) and an ℓ1-normalised hue x saturation histogram."""

    Config = AppearanceConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = config
        if c.size % c.cell or c.size < 2 * c.cell:
            raise ConfigError(f"appearance crop features: size {c.size} must be a multiple of cell {c.cell}")
        block = 2 * c.cell
        self._hog = cv2.HOGDescriptor(
            (c.size, c.size), (block, block), (c.cell, c.cell), (c.cell, c.cell), c.orientations
        )
        self._hog_dim = int(self._hog.getDescriptorSize())

    @property
    def dim(self) -> int:
        return self._hog_dim + self.config.hue_bins * self.config.saturation_bins

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        c = self.config
        out = np.zeros((len(crops), self.dim), np.float32)
        for i, crop in enumerate(crops):
            if crop.size == 0:
                continue
            small = cv2.resize(crop, (c.size, c.size), interpolation=cv2.INTER_AREA)
            out[i, : self._hog_dim] = self._hog.compute(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)).ravel()
            hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
            hist = cv2.calcHist(
                [hsv], [0, 1], None, [c.hue_bins, c.saturation_bins], [0, 180, 0, 256]
            ).ravel()
            out[i, self._hog_dim :] = hist / max(hist.sum(), 1.0)
        return out


class _Classifier(CropFeatures):
    """An ImageNet classifier over crops: softmax probabilities (ℓ1-normalised by construction)."""

    def setup(self) -> None:
        import torch

        self._torch = torch
        model, (mean, std, size) = self._build()
        self._device = pick_device(self.config.device)
        self._model = model.eval().to(self._device)
        self._mean = torch.tensor(mean).view(1, 3, 1, 1).to(self._device)
        self._std = torch.tensor(std).view(1, 3, 1, 1).to(self._device)
        self._size = size

    @property
    def dim(self) -> int:
        return self.config.num_classes

    def _build(self):
        raise NotImplementedError

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(crops), self.dim), np.float32)
        for start in range(0, len(crops), self.config.batch_size):
            part = crops[start : start + self.config.batch_size]
            batch = np.stack(
                [cv2.resize(c, (self._size, self._size), interpolation=cv2.INTER_LINEAR) for c in part]
            )
            x = torch.from_numpy(batch).to(self._device).permute(0, 3, 1, 2).float().div(255.0)
            with torch.inference_mode():
                probs = self._model((x - self._mean) / self._std).softmax(-1)
            out[start : start + len(part)] = probs.cpu().numpy()
        return out

    def provenance(self) -> dict[str, Any]:
        return {"crop_weights": self._hash}


@dataclass
class TorchvisionClassifierConfig:
    model: str = "resnet50"
    weights: str | None = "DEFAULT"  # a file, a torchvision weights name, or null (random: tests)
    num_classes: int = 1000
    size: int = 224
    device: str = "auto"
    batch_size: int = 64


@CROP_FEATURES.register("torchvision")
class TorchvisionClassifier(_Classifier):
    Config = TorchvisionClassifierConfig

    def _build(self):
        c = self.config
        model, self._hash = torchvision_model(
            c.model, c.weights, f"crop classifier {c.model}", num_classes=c.num_classes
        )
        return model, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), c.size)


@dataclass
class TimmClassifierConfig:
    model: str = "inception_resnet_v2"  # the paper's crop classifier
    # A checkpoint file; "pretrained" fetches timm's default weights through the
    # Hugging Face cache (internet once); null is random (tests).
    weights: str | None = "pretrained"
    num_classes: int = 1000
    device: str = "auto"
    batch_size: int = 64


@CROP_FEATURES.register("timm")
class TimmClassifier(_Classifier):
    """A timm ImageNet model; its own data config sets the input size and normalisation."""

    Config = TimmClassifierConfig

    def _build(self):
        from timm.data import resolve_data_config

        c = self.config
        what = f"crop classifier timm/{c.model}"
        pretrained = c.weights == "pretrained"
        model = create_timm_model(c.model, c.weights, what, num_classes=c.num_classes)
        self._hash = "random"
        if c.weights and not pretrained:
            model.load_state_dict(read_state_dict(c.weights, what))
            self._hash = file_sha256(c.weights)
        elif pretrained:
            self._hash = f"timm:{c.model}"
        data = resolve_data_config({}, model=model)
        return model, (data["mean"], data["std"], data["input_size"][-1])
