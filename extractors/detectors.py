"""Object detector backends behind one interface, for the ODF extractors (METHOD.md §2.3).

A backend turns a batch of RGB frames into boxes, scores and labels. Labels
are *slots* of one shared label space, in which every backend owns a fixed
range (COCO for YOLO / torchvision / detectron2, AVA for action detectors,
one slot for the HOG person detector, one for "moving object", one for
faces, two for left and right hands, one for people found by pose), so
per-box one-hot vectors of different detectors never collide. The ranges
are stored with every ODF result.

Backends: ``motion`` (background subtraction, weight-free), ``hog``
(OpenCV's people detector, weight-free), ``mediapipe_face`` and
``mediapipe_hands`` (the pretrained nets inside the mediapipe wheel),
``torchvision`` (Faster R-CNN, RetinaNet, FCOS, SSDlite), ``ultralytics``
(any YOLO checkpoint or yaml) and ``detectron2`` (when importable); the
``pose_keypoints`` backend (in ``extractors.pose``) boxes the people that
``pose.skeleton`` stored. Deep frameworks are imported in ``setup``, never
at module import.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from pipelines.device import pick_device
from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.registry import Registry
from pipelines.weights import file_sha256, torchvision_model

# The shared label space: name -> [first slot, end slot). COCO keeps its
# sparse 1..90 ids as slots (slot 0 stays empty, METHOD.md §7.9).
LABEL_RANGES: dict[str, tuple[int, int]] = {
    "coco": (0, 91),
    "ava": (91, 171),
    "hog_person": (171, 172),
    "moving_object": (172, 173),
    "face": (173, 174),
    "hand": (174, 176),  # left, right (the person's own)
    "pose_person": (176, 177),
}
LABEL_SLOTS = 177
# Slots that are people: COCO "person" (1), the HOG person detector's and pose's.
PERSON_SLOTS = (1, LABEL_RANGES["hog_person"][0], LABEL_RANGES["pose_person"][0])

# YOLO / detectron2 contiguous COCO-80 index -> COCO id (= slot).
COCO80_TO_91 = np.array(
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32]
    + [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]
    + [58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86]
    + [87, 88, 89, 90]
)


@dataclass(frozen=True)
class Detections:
    """Boxes of one frame: corners (x1, y1, x2, y2) normalised to [0, 1], scores in [0, 1], slots."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    slots: np.ndarray  # (n,) int64

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of corner boxes (..., 4); inverted boxes have area 0."""
    return np.clip(boxes[..., 2:] - boxes[..., :2], 0, None).prod(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (n, m) of corner boxes a (n, 4) and b (m, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    return inter / np.maximum(box_area(a)[:, None] + box_area(b)[None] - inter, 1e-12)


def person_boxes_by_frame(result: Any, width: int, height: int) -> dict[int, np.ndarray]:
    """Frame index → (k, 4) pixel boxes of people, from an ODF result's ``boxes`` table.

    IDT masks people out of its camera-motion estimate and top-down pose
    backends crop them, so both read the person rows of whichever detection
    extractor the user names.
    """
    boxes = result.arrays.get("boxes", np.zeros((0, 7), np.float32))
    people = boxes[np.isin(boxes[:, 1].astype(int), PERSON_SLOTS)]
    scale = np.array([width, height, width, height], np.float32)
    return {int(f): people[people[:, 0] == f, 3:7] * scale for f in np.unique(people[:, 0])}


def check_same_frames(result: Any, frames: int, name: str, path: str, reader: str) -> None:
    """Results read by frame index (boxes, keypoints) must come from the same sampled frames."""
    theirs = int(result.attrs.get("frames", frames))
    if theirs != frames:
        raise ConfigError(
            f"{path}: {name} has {theirs} frames but {reader} sampled {frames}; "
            f"give both the same fps and short_side (options.{name}.fps = options.{reader}.fps)"
        )


def _detections(boxes: Any, scores: Any, slots: Any, width: int, height: int) -> Detections:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array(
        [width, height, width, height], np.float32
    )
    return Detections(
        np.clip(boxes, 0.0, 1.0),
        np.clip(np.asarray(scores, np.float32).reshape(-1), 0.0, 1.0),
        np.asarray(slots, np.int64).reshape(-1),
    )


class Detector(ABC):
    """One detector backend. ``Config`` is a dataclass of plain fields.

    ``reset`` is called at the start of every video: stateful backends
    (background models, trackers) must not carry one video's state into the
    next. A backend that reads another extractor's stored output instead of
    pixels names it in ``inputs`` and gets its result in ``reset``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    label_range: ClassVar[str]

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def inputs(self) -> tuple[str, ...]:
        """Extractors whose results this backend reads, matched to frames by index."""
        return ()

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Loads the model, once per worker."""

    def reset(self, inputs: Mapping[str, Any] | None = None) -> None:  # noqa: B027  (optional hook)
        """Forgets per-video state; ``inputs`` holds the results named by ``inputs``."""

    @abstractmethod
    def detect(self, frames: np.ndarray) -> list[Detections]:
        """Detections for each of ``frames`` (n, H, W, 3) uint8 RGB, in order."""

    def provenance(self) -> dict[str, Any]:
        """What the boxes depend on beyond the config (e.g. the weights' hash)."""
        return {}


DETECTORS: Registry[Detector] = Registry("detector backend", entry_point_group="hallucinate.detectors")


# ---------------------------------------------------------------- weight-free


@dataclass
class MotionConfig:
    method: str = "mog2"  # mog2 or knn (OpenCV background subtractors)
    history: int = 120
    var_threshold: float = 16.0
    min_area: float = 0.002  # components smaller than this fraction of the frame are noise
    open_px: int = 3  # morphological opening (speckle) then closing (holes), in pixels
    close_px: int = 7
    prime_frames: int = 32  # background initialised from the median of the first frames


@DETECTORS.register("motion")
class MotionDetector(Detector):
    """Class-agnostic moving objects: background subtraction, cleaned connected components.

    The background model starts from the per-pixel median of the first
    ``prime_frames`` frames (so objects moving from frame 0 are not part of
    it) and then adapts slowly. The score of a box is its fill ratio (the
    fraction of its pixels that are foreground), a cheap "objectness".

    A panning camera makes the whole textured background "move"; this
    backend assumes a mostly static camera. (Phase-correlation compensation
    was tried on the demo and rejected: a large bright object, not the
    low-contrast background, dominated the correlation peak.)
    """

    Config = MotionConfig
    label_range = "moving_object"

    def reset(self, inputs: Mapping[str, Any] | None = None) -> None:
        c = self.config
        if c.method == "mog2":
            self._model = cv2.createBackgroundSubtractorMOG2(c.history, c.var_threshold, False)
        elif c.method == "knn":
            self._model = cv2.createBackgroundSubtractorKNN(c.history, 400.0, False)
        else:
            raise ConfigError(f"motion detector: unknown method {c.method!r}; use mog2 or knn")
        self._primed = False

    def setup(self) -> None:
        self.reset()
        c = self.config
        self._open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c.open_px, c.open_px))
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c.close_px, c.close_px))

    def detect(self, frames: np.ndarray) -> list[Detections]:
        if not len(frames):
            return []
        if not self._primed:
            median = np.median(frames[: self.config.prime_frames], axis=0).astype(np.uint8)
            self._model.apply(median, learningRate=1.0)
            self._primed = True
        return [self._frame(frame) for frame in frames]

    def _frame(self, frame: np.ndarray) -> Detections:
        h, w = frame.shape[:2]
        # A fixed rate: OpenCV's automatic one is 1/frames-seen, which after priming
        # absorbs a slow object into the background within a few frames.
        mask = self._model.apply(frame, learningRate=1.0 / self.config.history)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self._open)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self._close)
        _, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
        stats = stats[1:]  # 0 is the background
        stats = stats[stats[:, cv2.CC_STAT_AREA] >= self.config.min_area * h * w]
        if not len(stats):
            return Detections.empty()
        x, y, bw, bh, area = (stats[:, i].astype(np.float32) for i in range(5))
        boxes = np.stack([x, y, x + bw, y + bh], 1)
        slot = LABEL_RANGES["moving_object"][0]
        return _detections(boxes, area / (bw * bh), np.full(len(stats), slot), w, h)


@dataclass
class HogConfig:
    min_height: int = 256  # frames are upscaled to this height: the window is 64x128 pixels
    win_stride: int = 8
    scale: float = 1.05
    hit_threshold: float = 0.0


@DETECTORS.register("hog")
class HogPeopleDetector(Detector):
    """OpenCV's built-in HOG + linear SVM pedestrian detector (Dalal & Triggs).

    It is what IDT used as its human detector. The SVM margin m is mapped to
    a score with tanh(m), so the default 0.3 threshold keeps margins above 0.31.
    """

    Config = HogConfig
    label_range = "hog_person"

    def setup(self) -> None:
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def detect(self, frames: np.ndarray) -> list[Detections]:
        c = self.config
        out = []
        for frame in frames:
            h, w = frame.shape[:2]
            factor = max(1.0, c.min_height / h)
            image = cv2.resize(frame, (round(w * factor), round(h * factor))) if factor > 1 else frame
            rects, margins = self._hog.detectMultiScale(
                image,
                hitThreshold=c.hit_threshold,
                winStride=(c.win_stride, c.win_stride),
                scale=c.scale,
            )
            if len(rects) == 0:
                out.append(Detections.empty())
                continue
            rects = np.asarray(rects, np.float32) / factor
            boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)
            slot = LABEL_RANGES["hog_person"][0]
            out.append(_detections(boxes, np.tanh(np.ravel(margins)), np.full(len(rects), slot), w, h))
        return out


# ---------------------------------------------------------------- MediaPipe (pretrained, in the wheel)


@dataclass
class MediaPipeFaceConfig:
    # 0: the short-range model (faces within about 2 m of the camera), 1: full range (5 m).
    # On the real clips at a 256 short side, short range found faces on 39 of 50 frames of
    # arm wrestling where full range found 11 (README, "Pretrained models").
    model_selection: int = 0
    min_detection_confidence: float = 0.5


@DETECTORS.register("mediapipe_face")
class MediaPipeFace(Detector):
    """MediaPipe face detection (BlazeFace); frames are independent, so there is no state."""

    Config = MediaPipeFaceConfig
    label_range = "face"

    def setup(self) -> None:
        from extractors.mediapipe_nets import LazyGraph, solution, warm_up

        c = self.config
        if c.model_selection not in (0, 1):
            raise ConfigError("face detector mediapipe_face: model_selection must be 0 or 1")
        faces = solution("face_detection", "face detector mediapipe_face")

        def factory():
            return faces.FaceDetection(
                model_selection=c.model_selection, min_detection_confidence=c.min_detection_confidence
            )

        warm_up(factory)
        self._graph = LazyGraph(factory)

    def detect(self, frames: np.ndarray) -> list[Detections]:
        slot = LABEL_RANGES["face"][0]
        out = []
        for found in self._graph.process(frames):
            rows = []
            for d in found.detections or []:
                b = d.location_data.relative_bounding_box
                rows.append((b.xmin, b.ymin, b.xmin + b.width, b.ymin + b.height, d.score[0]))
            if not rows:
                out.append(Detections.empty())
                continue
            table = np.array(rows, np.float32)
            out.append(_detections(table[:, :4], table[:, 4], np.full(len(rows), slot), 1, 1))
        return out

    def provenance(self) -> dict[str, Any]:
        from extractors.mediapipe_nets import weights_id

        return {"weights": weights_id(f"face-{self.config.model_selection}")}


@dataclass
class MediaPipeHandsConfig:
    max_num_hands: int = 4  # two people at a table show four
    model_complexity: int = 0  # 0: the lite landmark model, 1: full; both ship in the wheel
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    # MediaPipe labels handedness as if the image were a mirrored selfie; ordinary
    # video is not mirrored, so its labels are swapped to give the person's own hand.
    mirrored: bool = False
    pad: float = 0.1  # the landmark box grown by this fraction a side


@DETECTORS.register("mediapipe_hands")
class MediaPipeHands(Detector):
    """MediaPipe Hands: palm detection, then 21 landmarks a hand, tracked from frame to frame.

    A box is the landmarks' extent grown by ``pad``; its slot is the left or
    right hand, and its score the handedness confidence. The graph tracks
    hands between frames, so it is rebuilt for every video.
    """

    Config = MediaPipeHandsConfig
    label_range = "hand"

    def setup(self) -> None:
        from extractors.mediapipe_nets import LazyGraph, solution, warm_up

        c = self.config
        if c.model_complexity not in (0, 1) or c.max_num_hands < 1:
            raise ConfigError(
                "hand detector mediapipe_hands: model_complexity must be 0 or 1, max_num_hands >= 1"
            )
        hands = solution("hands", "hand detector mediapipe_hands")

        def factory():
            return hands.Hands(
                static_image_mode=False,
                max_num_hands=c.max_num_hands,
                model_complexity=c.model_complexity,
                min_detection_confidence=c.min_detection_confidence,
                min_tracking_confidence=c.min_tracking_confidence,
            )

        warm_up(factory)
        self._graph = LazyGraph(factory)

    def reset(self, inputs: Mapping[str, Any] | None = None) -> None:
        self._graph.close()  # it tracks hands from frame to frame

    def detect(self, frames: np.ndarray) -> list[Detections]:
        from extractors.mediapipe_nets import landmark_box

        first = LABEL_RANGES["hand"][0]
        out = []
        for found in self._graph.process(frames):
            marks, sides = found.multi_hand_landmarks or [], found.multi_handedness or []
            if not marks:
                out.append(Detections.empty())
                continue
            boxes, scores, slots = [], [], []
            for hand, side in zip(marks, sides, strict=True):
                label = side.classification[0]
                points = np.array([(m.x, m.y) for m in hand.landmark], np.float32)
                boxes.append(landmark_box(points, self.config.pad))
                scores.append(label.score)
                is_left = (label.label == "Left") == self.config.mirrored
                slots.append(first + (0 if is_left else 1))
            out.append(_detections(np.array(boxes), scores, slots, 1, 1))
        return out

    def provenance(self) -> dict[str, Any]:
        from extractors.mediapipe_nets import weights_id

        return {"weights": weights_id(f"hands-{self.config.model_complexity}")}


# ---------------------------------------------------------------- torchvision


@dataclass
class TorchvisionDetectorConfig:
    model: str = "fasterrcnn_resnet50_fpn_v2"
    # A checkpoint file, a member of the model's torchvision weights enum
    # (DEFAULT, COCO_V1) resolved through torchvision's cache, or null for
    # random initialisation.
    weights: str | None = "DEFAULT"
    min_size: int | None = None  # the model's input resize (torchvision: 800); smaller is faster
    max_size: int | None = None
    device: str = "auto"
    batch_size: int = 4


@DETECTORS.register("torchvision")
class TorchvisionDetector(Detector):
    """torchvision's COCO detectors: labels are COCO ids 1..90, which are our slots."""

    Config = TorchvisionDetectorConfig
    label_range = "coco"

    def setup(self) -> None:
        import torch

        c = self.config
        kwargs = {k: v for k, v in (("min_size", c.min_size), ("max_size", c.max_size)) if v is not None}
        model, self._weights_hash = torchvision_model(
            c.model,
            c.weights,
            f"torchvision detector {c.model}",
            weights_backbone=None,
            num_classes=91,
            **kwargs,
        )
        self._device = pick_device(c.device)
        self._model = model.eval().to(self._device)
        self._torch = torch

    def detect(self, frames: np.ndarray) -> list[Detections]:
        torch = self._torch
        out = []
        h, w = frames.shape[1:3]
        for start in range(0, len(frames), self.config.batch_size):
            batch = torch.from_numpy(frames[start : start + self.config.batch_size]).to(self._device)
            images = list(batch.permute(0, 3, 1, 2).float().div(255.0))
            with torch.inference_mode():
                predictions = self._model(images)
            for p in predictions:
                out.append(_detections(p["boxes"].cpu(), p["scores"].cpu(), p["labels"].cpu(), w, h))
        return out

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._weights_hash}


# ---------------------------------------------------------------- ultralytics


@dataclass
class UltralyticsConfig:
    model: str = "yolov8n.pt"  # a .pt checkpoint, or a model yaml (random weights: tests only)
    imgsz: int = 640
    device: str = "auto"
    batch_size: int = 16


def _ultralytics_environment() -> None:
    """No run-time pip installs and a writable settings folder; see shared/ENVIRONMENT.md."""
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "hallucinate" / "ultralytics"))


def load_ultralytics(model: str, what: str) -> tuple[Any, str]:
    """An ultralytics ``YOLO`` from a checkpoint path, a model name (downloaded once) or a yaml.

    Shared by the detection and pose backends. Returns the model and its
    identity (the file's hash, or the name); a missing file or a failed
    download says where to put the checkpoint.
    """
    local = Path(model).is_file()
    if not local and (Path(model).suffix == ".pt" and "/" in model):
        raise MissingWeightsError(what, model, "Put the checkpoint there, or set model=... to its path.")
    _ultralytics_environment()
    if local:
        os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except ImportError:
        raise ConfigError(
            f"{what}: ultralytics is not installed; `pip install ultralytics-opencv-headless`"
        ) from None
    try:
        net = YOLO(model)
    except (OSError, ConnectionError, FileNotFoundError) as exc:
        raise MissingWeightsError(
            what,
            model,
            f"It could not be loaded or downloaded ({exc}). Download it once, set model=/path/to/it.pt.",
        ) from None
    return net, file_sha256(model) if local else model


@DETECTORS.register("ultralytics")
class UltralyticsDetector(Detector):
    """Any ultralytics YOLO detection model; COCO-80 models map into the COCO slots."""

    Config = UltralyticsConfig
    label_range = "coco"

    def setup(self) -> None:
        c = self.config
        what = f"ultralytics model {c.model}"
        self._model, self._hash = load_ultralytics(c.model, what)
        names = getattr(self._model, "names", {}) or {}
        if len(names) != 80:
            raise ConfigError(
                f"{what} has {len(names)} classes; the shared label space has slots for COCO-80 "
                "models only. Register a detector backend with its own label range for other models."
            )
        self._device = pick_device(c.device)

    def detect(self, frames: np.ndarray) -> list[Detections]:
        c = self.config
        h, w = frames.shape[1:3]
        out = []
        for start in range(0, len(frames), c.batch_size):
            bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames[start : start + c.batch_size]]
            for r in self._model.predict(bgr, imgsz=c.imgsz, conf=0.01, device=self._device, verbose=False):
                b = r.boxes
                slots = COCO80_TO_91[b.cls.cpu().numpy().astype(np.int64)]
                out.append(_detections(b.xyxy.cpu().numpy(), b.conf.cpu().numpy(), slots, w, h))
        return out

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._hash}


# ---------------------------------------------------------------- detectron2


@dataclass
class Detectron2Config:
    config: str = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"  # model-zoo name or a yaml file
    weights: str = "model_final.pkl"  # the checkpoint for that config
    label_space: str = "coco"  # coco (80 classes) or ava (80 actions)
    device: str = "auto"


@DETECTORS.register("detectron2")
class Detectron2Detector(Detector):
    """A detectron2 model-zoo (or own) config plus a checkpoint; used when detectron2 imports."""

    Config = Detectron2Config
    label_range = "coco"

    def setup(self) -> None:
        c = self.config
        what = f"detectron2 model {c.config}"
        try:
            from detectron2 import model_zoo
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
        except ImportError:
            raise ConfigError(
                f"{what}: detectron2 is not installed (it is not on PyPI). Install it from source: "
                "`pip install 'git+https://github.com/facebookresearch/detectron2.git'`, "
                "or use a torchvision detector (odf.fasterrcnn)."
            ) from None
        if c.label_space not in ("coco", "ava"):
            raise ConfigError(f"{what}: label_space must be coco or ava, not {c.label_space!r}")
        if not Path(c.weights).is_file():
            raise MissingWeightsError(what, c.weights, "Download the config's checkpoint and set weights=...")
        cfg = get_cfg()
        yaml = c.config if Path(c.config).is_file() else model_zoo.get_config_file(c.config)
        cfg.merge_from_file(yaml)
        cfg.MODEL.DEVICE = pick_device(c.device)
        self._model = build_model(cfg).eval()
        DetectionCheckpointer(self._model).load(c.weights)
        self._format = cfg.INPUT.FORMAT
        self._hash = file_sha256(c.weights)

    def detect(self, frames: np.ndarray) -> list[Detections]:
        import torch

        h, w = frames.shape[1:3]
        images = frames[..., ::-1] if self._format == "BGR" else frames
        inputs = [
            {"image": torch.from_numpy(np.ascontiguousarray(f).transpose(2, 0, 1)), "height": h, "width": w}
            for f in images
        ]
        with torch.inference_mode():
            outputs = self._model(inputs)
        out = []
        for o in outputs:
            inst = o["instances"].to("cpu")
            cls = inst.pred_classes.numpy()
            slots = COCO80_TO_91[cls] if self.config.label_space == "coco" else LABEL_RANGES["ava"][0] + cls
            out.append(_detections(inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), slots, w, h))
        return out

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._hash}
