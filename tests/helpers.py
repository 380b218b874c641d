"""Test-only extractors and files, importable by spawned dask workers.

``test.frame_stats`` decodes frames and writes one marker file per call, so
tests can prove that finished work is not recomputed. Marker files named
after a video plant faults on it: in ``$HALLUCINATE_TEST_CRASH`` the worker
process dies (``os._exit``), as if killed in the middle of a shard; in
``$HALLUCINATE_TEST_FAIL`` processing raises; in
``$HALLUCINATE_TEST_DISK_FULL`` it raises ENOSPC.
"""

from __future__ import annotations

import csv
import errno
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractors.base import Extractor, FrameSpec, Needs, OutputSpec, Resources, Result, VideoInput
from extractors.registry import register
from pipelines.encode import write_audio_only, write_video

# Eight real Apache-2.0 clips kept beside the project (../shared); tests that use them skip without.
CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"

CALLS_ENV = "HALLUCINATE_TEST_CALLS"
CRASH_ENV = "HALLUCINATE_TEST_CRASH"
FAIL_ENV = "HALLUCINATE_TEST_FAIL"
DISK_FULL_ENV = "HALLUCINATE_TEST_DISK_FULL"
SLOW_ENV = "HALLUCINATE_TEST_SLOW"  # seconds test.frame_stats sleeps per video, to kill workers mid-run


@dataclass
class FrameStatsConfig:
    fps: float = 6.0
    width: int = 64
    height: int = 48


@register("test.frame_stats")
class FrameStats(Extractor):
    """Mean colour per frame: cheap, deterministic, exercises the frame path."""

    version = "1"
    Config = FrameStatsConfig

    def needs(self) -> Needs:
        c = self.config
        return Needs(frames=FrameSpec(fps=c.fps, size=(c.width, c.height)))

    def produces(self) -> dict[str, OutputSpec]:
        return {"per_frame": OutputSpec((None, 3), "float32"), "mean": OutputSpec((3,), "float32")}

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        calls = os.environ.get(CALLS_ENV)
        if calls:
            Path(calls).mkdir(parents=True, exist_ok=True)
            (Path(calls) / f"{video.video_id}@{uuid.uuid4().hex}").touch()
        if _marked(CRASH_ENV, video.video_id):
            os._exit(17)
        if _marked(FAIL_ENV, video.video_id):
            raise RuntimeError(f"planted failure on {video.video_id}")
        if _marked(DISK_FULL_ENV, video.video_id):
            raise OSError(errno.ENOSPC, "No space left on device")
        if os.environ.get(SLOW_ENV):
            time.sleep(float(os.environ[SLOW_ENV]))
        means = [b.frames.reshape(len(b.frames), -1, 3).mean(1) for b in video.frames(self.needs().frames)]
        per_frame = np.concatenate(means).astype(np.float32)
        return Result({"per_frame": per_frame, "mean": per_frame.mean(0)})


@dataclass
class ScaleConfig:
    factor: float = 2.0


@register("test.scaled_mean")
class ScaledMean(Extractor):
    """Reads another extractor's output: exercises the dependency mechanism."""

    version = "1"
    Config = ScaleConfig

    def needs(self) -> Needs:
        return Needs(inputs=("test.frame_stats",))

    def produces(self) -> dict[str, OutputSpec]:
        return {"scaled": OutputSpec((3,), "float32")}

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        return Result({"scaled": inputs["test.frame_stats"].arrays["mean"] * self.config.factor})


def _marked(env: str, video_id: str) -> bool:
    """A marker file named after the video in the folder ``$env`` names."""
    folder = os.environ.get(env)
    return bool(folder) and (Path(folder) / video_id).exists()


def calls_per_video(calls_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in Path(calls_dir).glob("*@*"):
        vid = path.name.split("@")[0]
        counts[vid] = counts.get(vid, 0) + 1
    return counts


def moving_frames(n: int = 24, width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A square moving right over noise: small, real, and compressible."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 40, (n, height, width, 3)).astype(np.uint8)
    for i in range(n):
        x = 4 + i
        frames[i, 10:26, x : x + 16] = (220, 60, 30)
    return frames


def tone(seconds: float, hz: float, rate: int = 16000, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_broken_videos(folder: Path, fps: int = 12) -> dict[str, Path]:
    """One file per kind of bad input the pipeline must survive."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = moving_frames(48)
    good = folder / "good.mp4"
    write_video(good, frames, fps, tone(4, 440), faststart=True)
    files = {"good": good}
    files["corrupt"] = folder / "corrupt.mp4"
    files["corrupt"].write_bytes(np.random.default_rng(1).bytes(20_000))
    files["truncated"] = folder / "truncated.mp4"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    files["zero_byte"] = folder / "zero_byte.mp4"
    files["zero_byte"].write_bytes(b"")
    files["video_less"] = folder / "video_less.mp4"
    write_audio_only(files["video_less"], tone(2, 440))
    files["silent"] = folder / "silent.mp4"
    write_video(files["silent"], frames, fps, np.zeros(32000, np.float32))
    files["no_audio"] = folder / "no_audio.mp4"
    write_video(files["no_audio"], frames, fps, None)
    return files


@register("test.needs_gpu")
class NeedsGpu(FrameStats):
    """A stage that declares a GPU, to test routing; it computes like frame_stats."""

    resources = Resources(gpus=1)


@register("test.gpu_pid")
class GpuPid(FrameStats):
    """A stage that declares a GPU and stores the pid of the process that ran it: where it was placed."""

    resources = Resources(gpus=1)

    def produces(self) -> dict[str, OutputSpec]:
        return {"pid": OutputSpec((1,), "int64")}

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        super().process(video, inputs)  # reads the video, so bad input fails here as everywhere
        return Result({"pid": np.array([os.getpid()], np.int64)})


# ---------------------------------------------------------------- small deep models

# Each deep extractor's default architecture, randomly initialised, saved, and
# loaded back through the same option a user's checkpoint goes through.
TORCHVISION_ODF = {
    "odf.fasterrcnn": "fasterrcnn_resnet50_fpn_v2",
    "odf.retinanet": "retinanet_resnet50_fpn_v2",
    "odf.fcos": "fcos_resnet50_fpn",
    "odf.ssdlite": "ssdlite320_mobilenet_v3_large",
}


def save_torchvision_detector(model_name: str, path: Path) -> Path:
    import torch
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(model_name, weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), path)
    return path


def save_yolo(path: Path, yaml: str = "yolov8n.yaml") -> Path:
    from extractors.detectors import _ultralytics_environment

    _ultralytics_environment()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO

    # Seeded: what a random model detects depends on its weights, and unseeded
    # they followed whatever the tests before had drawn (the pose test failed
    # alone, now and then, with no keypoints).
    torch.manual_seed(0)
    YOLO(yaml).save(str(path))
    return path


def deep_extractor_options(folder: Path) -> dict[str, dict]:
    """Options that point every deep extractor at a small saved model (few frames, low thresholds).

    A score threshold of 0 keeps the random models' boxes, so the box-vector
    and pooling path runs; ``fps`` keeps the frame count small.
    """
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, dict] = {}
    for name, model in TORCHVISION_ODF.items():
        path = save_torchvision_detector(model, folder / f"{model}.pth")
        size = {} if "ssdlite" in model else {"min_size": 96, "max_size": 128}
        options[name] = {
            "fps": 0.5 if name == "odf.fasterrcnn" else 2.0,  # a random R-CNN keeps ~1000 proposals
            "score_threshold": 0.0,
            "max_boxes": 5,
            "detector": {"weights": str(path), "device": "cpu", **size},
        }
    options["sdf.deep"] = {
        "fps": 4.0,
        "saliency": {"model": str(save_saliency_net(folder / "saliency.pt")), "input_size": [80, 64]},
    }
    options["off.i3d"] = {"weights": str(save_i3d(folder / "flow_i3d.pt")), "clip_frames": 8, "size": 64}
    options["idt"] = {"codebook": str(save_codebook(folder))}
    options["audio.soundnet"] = {"weights": str(save_soundnet(folder / "sound8.pth")), "device": "cpu"}
    # min_confidence 0: the random pose net's keypoints still make skeleton rows.
    options["pose.skeleton"] = {
        "fps": 4.0,
        "min_confidence": 0.0,
        "backend": {
            "name": "ultralytics",
            "model": str(save_yolo_pose(folder / "yolov8n-pose.pt")),
            "imgsz": 128,
            "conf": 0.0,
            "device": "cpu",
        },
    }
    # odf.pose boxes pose.skeleton's people frame by frame, so it samples like it.
    options["odf.pose"] = {"fps": 4.0}
    options["pose.stgcn"] = {"weights": str(save_stgcn(folder / "st_gcn.kinetics.pt")), "device": "cpu"}
    options["odf.yolo"] = {
        "fps": 2.0,
        "score_threshold": 0.0,
        "detector": {"model": str(save_yolo(folder / "yolov8n.pt")), "imgsz": 128, "device": "cpu"},
    }
    return options


def save_saliency_net(path: Path) -> Path:
    """A small fully-convolutional saliency net, exported to TorchScript as a user would."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1), nn.AvgPool2d(2)
    ).eval()
    torch.jit.trace(net, torch.zeros(1, 3, 64, 80)).save(str(path))
    return path


def save_i3d(path: Path) -> Path:
    """A randomly initialised I3D flow net saved as a pytorch-i3d state dict (flow_imagenet.pt's layout)."""
    import torch

    from extractors.flow import build_i3d

    torch.manual_seed(0)
    torch.save(build_i3d(2, 400).state_dict(), path)
    return path


def save_codebook(folder: Path, components: int = 4, words: int = 8) -> Path:
    """A small IDT codebook fitted on random descriptors, saved as fit-codebooks saves one."""
    from extractors.codebooks import fit_codebook

    x = np.random.default_rng(0).random((400, 426))
    return fit_codebook(x, components, words, seed=0, gmm_iterations=20).save(folder, "test")


def save_yolo_pose(path: Path) -> Path:
    """A randomly initialised YOLOv8n-pose (COCO-17 keypoints), saved as a user's .pt checkpoint."""
    return save_yolo(path, "yolov8n-pose.yaml")


def save_stgcn(path: Path, num_class: int = 400) -> Path:
    """A randomly initialised ST-GCN saved as a state dict in the Kinetics-skeleton checkpoint layout."""
    import torch

    from extractors.pose import build_stgcn

    torch.manual_seed(0)
    torch.save(build_stgcn(num_class).state_dict(), path)
    return path


def save_soundnet(path: Path) -> Path:
    """A randomly initialised SoundNet-8 saved as the PyTorch port's sound8.pth state dict."""
    import torch

    from extractors.audio import build_soundnet8

    torch.manual_seed(0)
    torch.save(build_soundnet8().state_dict(), path)
    return path


def manifest_rows(root: Path) -> list[dict[str, str]]:
    """The rows of a manifest-CSV dataset (the demo's) under ``root``."""
    with open(root / "annotations" / "manifest.csv") as fh:
        return list(csv.DictReader(fh))
