"""Object Detection Features, ODF (METHOD.md §2.3): one extractor, and one stream, per detector.

For every sampled frame a detector gives boxes; each kept box becomes a
vector υ = [one-hot slot over the shared label space ; crop features ;
confidence ; 4 corners ; normalised frame index] (the six scalars
optionally RBF-embedded, 7 pivots, σ = 0.5), and a video's boxes are
summarised by multi-moment pooling (Eq. 16) and SigmE.

The raw boxes (frame, slot, score, corners) and crop features are stored
too, compressed, so ``odf.repool`` (``hallucinate repool``) can pool them
again with another n′, embedding or power normalisation without running
any detector. A video with no box at all gets a zero descriptor and a
flag (``no_boxes``; ``no_face``, ``no_hands``, ``no_person`` for the
streams that look for those), which the trainer reads as "no ground truth".

The paper ran its detectors on every frame; the default ``fps`` (5) and
``short_side`` (256) trade that for speed on real video (``extractors.base``
says why); ``fps=null short_side=null`` is the paper's setting.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from extractors.base import (
    DETECTION_FPS,
    SHORT_SIDE,
    Extractor,
    FrameSpec,
    Needs,
    OutputSpec,
    Result,
    VideoInput,
)
from extractors.crops import CROP_FEATURES, CropFeatures, crop_boxes
from extractors.detectors import DETECTORS, LABEL_RANGES, LABEL_SLOTS, Detector, check_same_frames
from extractors.encoders import (
    check_power_norm,
    multi_moment_pool,
    multi_moment_size,
    power_normalise,
    rbf_embed,
)
from extractors.registry import build_backend, register
from pipelines.config import to_plain
from pipelines.errors import ConfigError

BOX_COLUMNS = ("frame", "slot", "score", "x1", "y1", "x2", "y2")
SCALARS = 6  # confidence, 4 corners, frame index
RBF_PIVOTS, RBF_SIGMA = 7, 0.5


def box_vector_dim(crop_dim: int, rbf: bool) -> int:
    return LABEL_SLOTS + crop_dim + SCALARS * (RBF_PIVOTS if rbf else 1)


def box_vectors(boxes: np.ndarray, crops: np.ndarray, n_frames: int, rbf: bool) -> np.ndarray:
    """Per-box vectors υ (N, D) from the stored box table (N, 7) and crop features (N, C)."""
    n = len(boxes)
    onehot = np.zeros((n, LABEL_SLOTS))
    onehot[np.arange(n), boxes[:, 1].astype(np.int64)] = 1.0
    t = boxes[:, 0] / max(n_frames - 1, 1)
    scalars = np.concatenate([boxes[:, 2:7], t[:, None]], 1)
    if rbf:
        scalars = rbf_embed(scalars, RBF_PIVOTS, RBF_SIGMA).reshape(n, -1)
    return np.concatenate([onehot, crops.astype(np.float64), scalars], 1)


def odf_descriptor(
    boxes: np.ndarray,
    crops: np.ndarray,
    n_frames: int,
    n_vectors: int,
    rbf: bool,
    power_norm: str,
    power_norm_params: Mapping[str, float],
) -> np.ndarray:
    """ψ_det: multi-moment pooling of the box vectors with per-frame weighting, then PN."""
    dim = box_vector_dim(crops.shape[1], rbf)
    if not len(boxes):
        return np.zeros(multi_moment_size(dim, n_vectors), np.float32)
    pooled = multi_moment_pool(box_vectors(boxes, crops, n_frames, rbf), boxes[:, 0], n_vectors)
    return power_normalise(pooled, power_norm, **power_norm_params).astype(np.float32)


@dataclass
class ODFConfig:
    fps: float | None = DETECTION_FPS  # an upper bound; None: every frame, as the paper did
    short_side: int | None = SHORT_SIDE  # an upper bound: larger frames are shrunk to it; None: native
    score_threshold: float = 0.3
    max_boxes: int = 20  # per frame, highest scores first
    n_vectors: int = 3  # n′ eigenvectors
    rbf: bool = False  # RBF-embed the six scalars (the 1214-d variant; METHOD.md §7.6)
    power_norm: str = "sigme"
    power_norm_params: dict[str, float] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)  # the backend's options
    crop: dict[str, Any] = field(default_factory=dict)  # name (appearance, torchvision, timm) + options
    chunk: int = 16  # frames decoded and detected at a time


class ODFExtractor(Extractor):
    """Base of the ODF extractors; a subclass names its detector backend and defaults."""

    # 2: the shared label space grew from 173 to 177 slots (faces, hands, pose people).
    version = "2"
    Config = ODFConfig
    backend: ClassVar[str]
    detector_defaults: ClassVar[dict[str, Any]] = {}
    empty_flag: ClassVar[str] = "no_boxes"  # the flag of a video in which nothing was found

    def __init__(self, config: ODFConfig | None = None) -> None:
        config = config if config is not None else self.Config()
        where = f"options.{self.name}"
        det_cls, det_cfg = build_backend(
            DETECTORS,
            {**self.detector_defaults, **config.detector},
            self.backend,
            f"{where}.detector",
        )
        crop_cls, crop_cfg = build_backend(CROP_FEATURES, config.crop, "appearance", f"{where}.crop")
        if config.max_boxes < 1 or not 0 <= config.score_threshold <= 1 or config.n_vectors < 0:
            raise ConfigError(f"{where}: need max_boxes >= 1, 0 <= score_threshold <= 1 and n_vectors >= 0")
        check_power_norm(config.power_norm, config.power_norm_params, where)
        # Defaults are written into the config, so the cache key changes with them.
        config = dataclasses.replace(
            config,
            detector={"name": det_cls.name, **to_plain(det_cfg)},
            crop={"name": crop_cls.name, **to_plain(crop_cfg)},
        )
        super().__init__(config)
        self.detector: Detector = det_cls(det_cfg)
        self.crop_features: CropFeatures = crop_cls(crop_cfg)
        self.label_range = getattr(det_cfg, "label_space", det_cls.label_range)

    @property
    def box_dim(self) -> int:
        return box_vector_dim(self.crop_features.dim, self.config.rbf)

    def needs(self) -> Needs:
        return Needs(
            frames=FrameSpec(fps=self.config.fps, max_short_side=self.config.short_side),
            inputs=self.detector.inputs,
        )

    def produces(self) -> dict[str, OutputSpec]:
        c = self.config
        return {
            "descriptor": OutputSpec(
                (multi_moment_size(self.box_dim, c.n_vectors),),
                "float32",
                "multi-moment pooled box vectors (Eq. 16) after power normalisation",
            ),
            "boxes": OutputSpec((None, len(BOX_COLUMNS)), "float32", "kept boxes: " + ", ".join(BOX_COLUMNS)),
            "crops": OutputSpec((None, self.crop_features.dim), "float16", "crop features of each kept box"),
        }

    def setup(self) -> None:
        self.detector.setup()
        self.crop_features.setup()

    def teardown(self) -> None:
        self.detector = type(self.detector)(self.detector.config)
        self.crop_features = type(self.crop_features)(self.crop_features.config)

    def _keep(self, det) -> np.ndarray:
        order = np.argsort(-det.scores, kind="stable")
        order = order[det.scores[order] >= self.config.score_threshold]
        return order[: self.config.max_boxes]

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        c = self.config
        self.detector.reset({name: inputs[name] for name in self.detector.inputs})
        rows, crops = [], []
        n_frames = 0
        for batch in video.frames(self.needs().frames, chunk=c.chunk):
            for i, det in enumerate(self.detector.detect(batch.frames)):
                keep = self._keep(det)
                if len(keep):
                    frame = n_frames + i
                    rows.append(
                        np.column_stack(
                            [np.full(len(keep), frame), det.slots[keep], det.scores[keep], det.boxes[keep]]
                        )
                    )
                    crops.append(self.crop_features(crop_boxes(batch.frames[i], det.boxes[keep])))
            n_frames += len(batch.frames)
        for name in self.detector.inputs:
            check_same_frames(inputs[name], n_frames, name, video.path, self.name)
        boxes = (
            np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, len(BOX_COLUMNS)), np.float32)
        )
        crop_array = np.concatenate(crops) if crops else np.zeros((0, self.crop_features.dim), np.float32)
        descriptor = odf_descriptor(
            boxes, crop_array, n_frames, c.n_vectors, c.rbf, c.power_norm, c.power_norm_params
        )
        attrs = {
            "frames": n_frames,
            "label_ranges": json.dumps(LABEL_RANGES),
            "label_range": self.label_range,
            "crop_features": self.crop_features.name,
            "box_columns": ",".join(BOX_COLUMNS),
            **self.detector.provenance(),
            **self.crop_features.provenance(),
        }
        flags = (
            {}
            if len(boxes)
            else {self.empty_flag: f"no box scored >= {c.score_threshold} in {n_frames} frames"}
        )
        arrays = {"descriptor": descriptor, "boxes": boxes, "crops": crop_array.astype(np.float16)}
        return Result(arrays, flags=flags, attrs=attrs)


@register("odf.motion")
class MotionODF(ODFExtractor):
    """ODF from moving objects (background subtraction); weight-free, in the default set."""

    backend = "motion"
    in_default_set = True


@register("odf.hog")
class HogODF(ODFExtractor):
    """ODF from OpenCV's HOG people detector; weight-free (by default odf.pose's people replace it)."""

    backend = "hog"


@register("odf.face")
class FaceODF(ODFExtractor):
    """ODF from MediaPipe's pretrained face detector (in the wheel); in the default set."""

    backend = "mediapipe_face"
    in_default_set = True
    weights = "pretrained"
    empty_flag = "no_face"


@register("odf.hands")
class HandsODF(ODFExtractor):
    """ODF from MediaPipe's pretrained palm detector and hand landmarks: left and right hands."""

    backend = "mediapipe_hands"
    in_default_set = True
    weights = "pretrained"
    empty_flag = "no_hands"


@register("odf.pose")
class PoseODF(ODFExtractor):
    """ODF from the people pose.skeleton found: a box around each tracked skeleton, no second pose run.

    Its boxes are matched to frames by index, so it must sample like
    pose.skeleton; both default to the ODF rate and size.
    """

    backend = "pose_keypoints"
    in_default_set = True
    weights = "pretrained"
    empty_flag = "no_person"


@register("odf.fasterrcnn")
class FasterRCNNODF(ODFExtractor):
    """ODF from torchvision's Faster R-CNN ResNet-50 FPN v2 (COCO)."""

    weights = "checkpoint"
    backend = "torchvision"
    detector_defaults = {"model": "fasterrcnn_resnet50_fpn_v2"}


@register("odf.retinanet")
class RetinaNetODF(ODFExtractor):
    """ODF from torchvision's RetinaNet ResNet-50 FPN v2 (COCO)."""

    weights = "checkpoint"
    backend = "torchvision"
    detector_defaults = {"model": "retinanet_resnet50_fpn_v2"}


@register("odf.fcos")
class FCOSODF(ODFExtractor):
    """ODF from torchvision's FCOS ResNet-50 FPN (COCO)."""

    weights = "checkpoint"
    backend = "torchvision"
    detector_defaults = {"model": "fcos_resnet50_fpn"}


@register("odf.ssdlite")
class SSDliteODF(ODFExtractor):
    """ODF from torchvision's SSDlite MobileNetV3 (COCO); the fastest deep detector here."""

    weights = "checkpoint"
    backend = "torchvision"
    detector_defaults = {"model": "ssdlite320_mobilenet_v3_large"}


@register("odf.yolo")
class YoloODF(ODFExtractor):
    """ODF from an ultralytics YOLO model (a .pt checkpoint or model yaml)."""

    weights = "checkpoint"
    backend = "ultralytics"


@register("odf.detectron2")
class Detectron2ODF(ODFExtractor):
    """ODF from a detectron2 model (needs detectron2 installed from source)."""

    weights = "checkpoint"
    backend = "detectron2"


@dataclass
class RepoolConfig:
    source: str = "odf.motion"  # the ODF extractor whose stored boxes are pooled again
    n_vectors: int = 3
    rbf: bool = False
    power_norm: str = "sigme"
    power_norm_params: dict[str, float] = field(default_factory=dict)


@register("odf.repool")
class RepoolODF(Extractor):
    """ODF pooled again from another ODF extractor's stored boxes; no detector runs."""

    version = "2"  # the label space of odf.* version 2
    weights = "derived"
    Config = RepoolConfig

    def __init__(self, config: RepoolConfig | None = None) -> None:
        super().__init__(config)
        check_power_norm(self.config.power_norm, self.config.power_norm_params, f"options.{self.name}")

    def needs(self) -> Needs:
        return Needs(inputs=(self.config.source,))

    def produces(self) -> dict[str, OutputSpec]:
        # The length depends on the source's crop features: d·(4+n′), D from the stored crops.
        return {"descriptor": OutputSpec((None,), "float32", "the source's boxes, pooled again")}

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        c = self.config
        source = inputs[c.source]
        boxes, crops = source.arrays["boxes"], source.arrays["crops"]
        descriptor = odf_descriptor(
            boxes, crops, int(source.attrs["frames"]), c.n_vectors, c.rbf, c.power_norm, c.power_norm_params
        )
        return Result(
            {"descriptor": descriptor}, flags=dict(source.flags), attrs={"frames": source.attrs["frames"]}
        )
