"""RGB backbones: a clip (B, 3, T, H, W) in [-1, 1] to X_rgb (B, C, T′).

Each backbone owns its input normalisation, so the preprocessing cannot
drift from the weights (torchvision's habit). Pretrained weights come from a
local file (``weights=/path/to/file.pth``) or, for torchvision models, from
a weights name (``weights=KINETICS400_V1``) resolved through torchvision's
own cache; tests build small models, save them and load them back through
the same path a user's checkpoint takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.registry import Registry
from pipelines.weights import create_timm_model, looks_like_file, read_state_dict, torchvision_state

BACKBONES: Registry[nn.Module] = Registry("backbone")
# Keys of classifier layers, dropped when loading a full-model checkpoint.
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "heads.")


def load_trunk_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Loads everything but the classifier; any other missing key is an error."""
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise ConfigError(
            f"{what}: the weights do not match the architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); check that they are for this backbone"
        )


@dataclass(frozen=True)
class TrainingDefaults:
    """What ``hallucinate train`` uses for a backbone where the command line is silent.

    Why per backbone: clip length, crop and learning rate belong to the
    weights (torchvision's Kinetics R3D/MC3/R(2+1)D were trained on 112²
    crops, MViT needs 16 frames), and a from-scratch toy needs another
    learning rate than fine-tuning does. The base values are the paper's
    fine-tuning settings: 64-frame clips and Adam at 1e-4 (METHOD.md §4.3,
    §5.2), batch 32 (§7.17), 224² crops of a 256 short side.
    """

    frames: int = 64
    size: int = 224
    short_side: int = 256
    lr: float = 1e-4
    batch_size: int = 32


class Backbone(nn.Module):
    """Base class: subclasses set ``out_channels`` and implement ``features``."""

    name: ClassVar[str]
    defaults: ClassVar[TrainingDefaults] = TrainingDefaults()
    out_channels: int
    mean: torch.Tensor
    std: torch.Tensor

    def _set_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T′)."""
        return self.features(((clip + 1) / 2 - self.mean) / self.std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def example_input(self, batch: int, frames: int, size: int) -> torch.Tensor:
        """A random input of the shape ``forward`` takes, for tracing and export."""
        return torch.rand(batch, 3, frames, size, size) * 2 - 1

    def output_shape(self, frames: int, size: int) -> tuple[int, int]:
        """(C, T′) for clips of ``frames`` x ``size`` x ``size``, by a dry run."""
        with torch.no_grad():
            was = self.training
            self.eval()
            out = self(torch.zeros(1, 3, frames, size, size))
            self.train(was)
        return out.shape[1], out.shape[2]


@BACKBONES.register("tiny3d")
class Tiny3D(Backbone):
    """A four-block 3D CNN for the demo and CPU tests (about 0.1M parameters at width 16).

    X_rgb is max-pooled over space: with mean pooling a small moving object on
    a large textured background is diluted away, and the demo does not train.
    Its defaults are the demo's: short clips at 72² so that a CPU trains it in
    minutes, and lr 1e-3, because it starts from random weights: with make
    demo's other settings, the RGB-only model scored 0.38-0.41 test top-1 at
    the fine-tuning rate of 1e-4 (seeds 0-2) against 0.67-0.75 at 1e-3.
    """

    defaults = TrainingDefaults(frames=16, size=72, short_side=72, lr=1e-3, batch_size=16)

    def __init__(self, width: int = 16, weights: str | None = None) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(3, w, (1, 2, 2)),
            block(w, 2 * w, (2, 2, 2)),
            block(2 * w, 4 * w, (2, 2, 2)),
            block(4 * w, 8 * w, (1, 2, 2)),
        )
        self.out_channels = 8 * w
        self._set_normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # back to [-1, 1]
        if weights:
            load_trunk_weights(self, read_state_dict(weights, "tiny3d"), "tiny3d")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Max over space: small objects on large textured backgrounds vanish in a mean.
        return self.body(x).amax((3, 4))


@BACKBONES.register("precomputed")
class Precomputed(Backbone):
    """X_rgb read from the shards (``rgb.features``): the frozen-backbone mode.

    The input *is* X_rgb (B, C, T′), so the streams, HAF and PredNet train
    without decoding video or running the backbone; the exported model then
    takes X_rgb too, and deployment runs the frozen backbone in front of it.
    """

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.out_channels, self.frames = channels, frames

    def forward(self, x_rgb: torch.Tensor) -> torch.Tensor:
        return x_rgb

    def example_input(self, batch: int, frames: int, size: int) -> torch.Tensor:
        return torch.rand(batch, self.out_channels, self.frames)

    def output_shape(self, frames: int, size: int) -> tuple[int, int]:
        return self.out_channels, self.frames


@BACKBONES.register("tsn")
class TSN(Backbone):
    """A timm 2-D ImageNet model on every frame, pooled over space (TSN style): X_rgb (B, C, T).

    ``weights`` is a checkpoint file, ``"pretrained"`` (timm's default weights
    through the Hugging Face cache; internet once) or ``None`` (random). The
    normalisation is the model's own timm data config. ``segments`` averages
    the T frame features into that many temporal segments.
    """

    def __init__(
        self, model: str = "resnet50", weights: str | None = None, segments: int | None = None
    ) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        what = f"tsn backbone timm/{model}"
        self.model = create_timm_model(model, weights, what, num_classes=0)  # pooled features
        if weights and weights != "pretrained":
            load_trunk_weights(self.model, read_state_dict(weights, what), what)
        data = resolve_data_config({}, model=self.model)
        self._set_normalisation(tuple(data["mean"]), tuple(data["std"]))
        self.out_channels = self.model.num_features
        self.segments = segments

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        per_frame = self.model(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B·T, C)
        out = per_frame.view(b, t, -1).transpose(1, 2)  # (B, C, T)
        if self.segments:
            out = nn.functional.adaptive_avg_pool1d(out, self.segments)
        return out


@BACKBONES.register("videomae")
class VideoMAE(Backbone):
    """VideoMAE (V1/V2 architecture) through ``transformers``, from a checkpoint folder.

    ``weights`` is a folder written by ``save_pretrained`` (``config.json`` plus
    ``model.safetensors``), e.g. a fine-tuned Kinetics checkpoint downloaded
    once. Clips are resampled to the model's frame count and image size;
    X_rgb is the patch tokens averaged over space, one column per tubelet
    slot: (B, C, num_frames / tubelet_size).

    Clips default to 16 frames, the frame count of the released checkpoints:
    decoding the paper's 64 would only be resampled away.
    """

    defaults = TrainingDefaults(frames=16)

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        if not weights:
            raise ConfigError("videomae backbone: set backbone_options.weights=/path/to/checkpoint-folder")
        folder = Path(weights)
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(
                "videomae backbone",
                folder / "config.json",
                "Download the checkpoint folder (config.json + model.safetensors) there, "
                "e.g. with huggingface-cli download MCG-NJU/videomae-base-finetuned-kinetics.",
            )
        from transformers import VideoMAEModel

        self.model = VideoMAEModel.from_pretrained(str(folder), local_files_only=True)
        cfg = self.model.config
        self.frames, self.size, self.tubelet = cfg.num_frames, cfg.image_size, cfg.tubelet_size
        processor = folder / "preprocessor_config.json"
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VideoMAE's image processor
        if processor.is_file():
            meta = json.loads(processor.read_text())
            mean, std = tuple(meta.get("image_mean", mean)), tuple(meta.get("image_std", std))
        self._set_normalisation(mean, std)
        self.out_channels = cfg.hidden_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (self.frames, self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.frames, self.size, self.size), mode="trilinear")
        tokens = self.model(pixel_values=x.transpose(1, 2)).last_hidden_state  # (B, T'·S, C)
        b, n, c = tokens.shape
        slots = self.frames // self.tubelet
        return tokens.view(b, slots, n // slots, c).mean(2).transpose(1, 2)  # (B, C, T′)


KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


class TorchvisionVideo(Backbone):
    """A torchvision video classifier without its classifier.

    ``weights`` is a file path, or the name of a member of the model's
    torchvision weights enum (``KINETICS400_V1``), fetched into torchvision's
    cache if it is not there yet (this needs internet once).
    """

    arch: ClassVar[str]
    weights_enum: ClassVar[str]

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchvision.models import video

        self.model = getattr(video, self.arch)(weights=None)
        self._set_normalisation(KINETICS_MEAN, KINETICS_STD)
        self._strip_classifier()
        if weights:
            what = f"{self.name} backbone"
            state = (
                read_state_dict(weights, what)
                if looks_like_file(weights)
                else torchvision_state(f"{self.weights_enum}.{weights}", what)
            )
            load_trunk_weights(self.model, state, what)
        self.out_channels = self._channels()

    def _channels(self) -> int:
        return self.output_shape(8, 64)[0]

    def _strip_classifier(self) -> None:
        self.model.fc = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.stem(x)))))
        return x.mean((3, 4))


# The crop of torchvision's Kinetics weights for the ResNet-18 family
# (their transforms: resize to 128 x 171, centre crop 112).
RESNET3D_DEFAULTS = TrainingDefaults(size=112, short_side=128)


@BACKBONES.register("r3d_18")
class R3D18(TorchvisionVideo):
    arch, weights_enum = "r3d_18", "R3D_18_Weights"
    defaults = RESNET3D_DEFAULTS


@BACKBONES.register("mc3_18")
class MC318(TorchvisionVideo):
    arch, weights_enum = "mc3_18", "MC3_18_Weights"
    defaults = RESNET3D_DEFAULTS


@BACKBONES.register("r2plus1d_18")
class R2Plus1D18(TorchvisionVideo):
    arch, weights_enum = "r2plus1d_18", "R2Plus1D_18_Weights"
    defaults = RESNET3D_DEFAULTS


@BACKBONES.register("s3d")
class S3D(TorchvisionVideo):
    arch, weights_enum = "s3d", "S3D_Weights"

    def _strip_classifier(self) -> None:
        self.model.classifier = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x).mean((3, 4))


class _PooledTransformer(TorchvisionVideo):
    """Video transformers give one pooled token embedding: X_rgb with T′ = 1."""

    def _strip_classifier(self) -> None:
        self.model.head = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[..., None]


@BACKBONES.register("mvit_v2_s")
class MViTV2S(_PooledTransformer):
    """Needs 16 x 224 x 224 clips."""

    arch, weights_enum = "mvit_v2_s", "MViT_V2_S_Weights"
    defaults = TrainingDefaults(frames=16)

    def _channels(self) -> int:
        return 768  # a dry run would need a full 16 x 224 x 224 clip


@BACKBONES.register("swin3d_t")
class Swin3DT(_PooledTransformer):
    arch, weights_enum = "swin3d_t", "Swin3D_T_Weights"


def create_backbone(name: str, **options: Any) -> Backbone:
    try:
        return BACKBONES.get(name)(**options)
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: {exc}") from None
