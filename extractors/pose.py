"""Skeleton features, GSF (METHOD.md §2.5): pose backends, tracking, a skeleton descriptor, ST-GCN.

``pose.skeleton`` runs a pose backend on the sampled frames, tracks the
people across frames, keeps the main ``people`` (2, as Kinetics-skeleton
does) and stores their COCO-17 keypoints, plus a descriptor that needs no
network weights:

* per frame and person: the keypoints centred on the hips and divided by
  the torso length (so the descriptor ignores where the person stands and
  how large they appear), their velocities in torso lengths per second,
  and the joint confidences;
* per video: multi-moment pooling (Eq. 16, shared with ODF and SDF) over
  those rows, weighted per frame, then a power normalisation.

A joint below ``min_confidence`` is *missing*: its position, velocity and
confidence enter as zeros rather than as a guessed coordinate, and the
confidence channel tells the pooled statistics that it was absent. A video
in which nobody is found gets the ``no_skeleton`` flag and no arrays, so
the trainer masks the stream instead of regressing it towards zeros.

``pose.stgcn`` is the paper's GSF: an ST-GCN (Yan et al. 2018) with the
module names of the public Kinetics-skeleton checkpoint, run on the stored
keypoints mapped to the OpenPose-18 layout it was trained on; its 400
Kinetics logits are the descriptor.

Backends (one registry): ``mediapipe`` (the default; MediaPipe Pose 0.10.14,
whose pose models ship inside the wheel, so real skeletons come out of real
video on a fresh machine; one person), ``ultralytics`` (any YOLO-pose
checkpoint, COCO-17, many people) and ``mmpose`` (a top-down model on the
person boxes of a detection extractor; an optional install).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
from extractors.detectors import (
    DETECTORS,
    LABEL_RANGES,
    Detections,
    Detector,
    box_area,
    box_iou,
    check_same_frames,
    load_ultralytics,
    person_boxes_by_frame,
)
from extractors.encoders import check_power_norm, multi_moment_pool, multi_moment_size, power_normalise
from extractors.mediapipe_nets import landmark_box
from extractors.registry import build_backend, register
from pipelines.config import to_plain
from pipelines.device import pick_device
from pipelines.errors import ConfigError, MissingWeightsError
from pipelines.registry import Registry
from pipelines.weights import file_sha256

# ---------------------------------------------------------------- keypoint layouts

BLAZEPOSE33 = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel", "right_heel",
    "left_foot_index", "right_foot_index",
)  # fmt: skip
COCO17 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# The OpenPose "COCO" body model, which Kinetics-skeleton and ST-GCN use; "neck" is not a COCO joint.
OPENPOSE18 = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# ST-GCN's openpose graph: bones between OpenPose-18 joints; the neck is the centre.
OPENPOSE18_BONES = (
    (4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2), (5, 1),
    (2, 1), (0, 1), (15, 0), (14, 0), (17, 15), (16, 14),
)  # fmt: skip
OPENPOSE18_CENTRE = OPENPOSE18.index("neck")

BLAZEPOSE33_TO_COCO17 = np.array([BLAZEPOSE33.index(n) for n in COCO17])
LEFT_HIP, RIGHT_HIP = COCO17.index("left_hip"), COCO17.index("right_hip")
LEFT_SHOULDER, RIGHT_SHOULDER = COCO17.index("left_shoulder"), COCO17.index("right_shoulder")


def blazepose_to_coco(keypoints: np.ndarray) -> np.ndarray:
    """(..., 33, C) BlazePose landmarks to (..., 17, C) COCO keypoints, joint by joint by name."""
    return keypoints[..., BLAZEPOSE33_TO_COCO17, :]


def coco_to_openpose(keypoints: np.ndarray) -> np.ndarray:
    """(..., 17, 3) COCO (x, y, confidence) to (..., 18, 3) OpenPose-18.

    The neck is the midpoint of the shoulders with the smaller of their two
    confidences, so a neck is only as present as both shoulders are (one
    missing shoulder makes it missing rather than misplaced).
    """
    out = np.zeros(keypoints.shape[:-2] + (len(OPENPOSE18), keypoints.shape[-1]), keypoints.dtype)
    for i, name in enumerate(OPENPOSE18):
        if name != "neck":
            out[..., i, :] = keypoints[..., COCO17.index(name), :]
    shoulders = keypoints[..., [LEFT_SHOULDER, RIGHT_SHOULDER], :]
    neck = out[..., OPENPOSE18_CENTRE, :]
    neck[..., :2] = shoulders[..., :2].mean(-2)
    neck[..., 2] = shoulders[..., 2].min(-1)
    neck[neck[..., 2] <= 0] = 0.0
    return out


# ---------------------------------------------------------------- backends


@dataclass(frozen=True)
class Poses:
    """People in one frame: COCO-17 (x, y) in [0, 1] of the frame with a confidence, boxes, scores."""

    keypoints: np.ndarray  # (n, 17, 3) float32
    boxes: np.ndarray  # (n, 4) float32, corners normalised to [0, 1]
    scores: np.ndarray  # (n,) float32

    @staticmethod
    def empty() -> Poses:
        return Poses(np.zeros((0, 17, 3), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))


def _poses(keypoints: Any, boxes: Any, scores: Any, width: int, height: int) -> Poses:
    """Poses from pixel keypoints (n, 17, 2|3) and pixel boxes (n, 4); a missing confidence is 1."""
    kp = np.asarray(keypoints, np.float32).reshape(len(np.atleast_1d(scores)), len(COCO17), -1)
    if kp.shape[-1] == 2:
        kp = np.concatenate([kp, np.ones(kp.shape[:-1] + (1,), np.float32)], -1)
    kp[..., :2] /= np.array([width, height], np.float32)
    box_scale = np.array([width, height, width, height], np.float32)
    return Poses(
        kp, np.asarray(boxes, np.float32).reshape(-1, 4) / box_scale, np.asarray(scores, np.float32).ravel()
    )


class PoseBackend(ABC):
    """One pose estimator. ``Config`` is a dataclass of plain fields.

    ``multi_person`` backends go through the IoU tracker; single-person ones
    (MediaPipe) give one track by construction. ``needs_boxes`` backends are
    top-down and get the person boxes of a detection extractor per frame.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    multi_person: ClassVar[bool] = True
    needs_boxes: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self) -> None:  # noqa: B027  (optional hook)
        """Loads the model, once per worker."""

    def reset(self) -> None:  # noqa: B027  (optional hook)
        """Forgets per-video state (MediaPipe tracks its person from frame to frame)."""

    @abstractmethod
    def estimate(self, frames: np.ndarray, boxes: list[np.ndarray] | None = None) -> list[Poses]:
        """Poses for each of ``frames`` (n, H, W, 3) uint8 RGB; ``boxes``: per-frame (k, 4) pixel boxes."""

    def provenance(self) -> dict[str, Any]:
        return {}


POSE_BACKENDS: Registry[PoseBackend] = Registry("pose backend", entry_point_group="hallucinate.pose")


@dataclass
class MediaPipeConfig:
    # 1 is the model bundled in the 0.10.14 wheel; 0 and 2 are downloaded on first use.
    model_complexity: int = 1
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    smooth_landmarks: bool = True
    # People looked for per frame. MediaPipe Pose follows one person; pass k runs a
    # graph of its own on the frame with the people of passes 1..k-1 blotted out.
    passes: int = 2
    pad: float = 0.1  # a found person's landmark box, grown by this, is what later passes cannot see


@POSE_BACKENDS.register("mediapipe")
class MediaPipePose(PoseBackend):
    """MediaPipe Pose (BlazePose, 33 landmarks) in video mode; visibility is the confidence.

    BlazePose tracks a single person. For a second one (two people talking,
    fighting, arm wrestling) each further pass gets its own graph and the
    frame with the people found so far painted over in the frame's mean
    colour, so its detector finds someone else and its tracker follows them.
    On the two-person real clip this found both people on 22 of 25 frames,
    and on the one-person NTU clip never a second; it costs a pass per
    person found, plus one that finds nobody.
    """

    Config = MediaPipeConfig

    @property
    def multi_person(self) -> bool:  # type: ignore[override]
        return self.config.passes > 1

    def setup(self) -> None:
        from extractors.mediapipe_nets import LazyGraph, solution, warm_up

        c = self.config
        self._solution = solution("pose", "pose backend mediapipe")
        if c.model_complexity not in (0, 1, 2):
            raise ConfigError("pose backend mediapipe: model_complexity must be 0, 1 or 2")
        if c.passes < 1:
            raise ConfigError("pose backend mediapipe: passes must be at least 1")
        warm_up(self._new_pose)
        self._graphs = [LazyGraph(self._new_pose) for _ in range(c.passes)]

    def _new_pose(self) -> Any:
        c = self.config
        try:
            return self._solution.Pose(
                static_image_mode=False,
                model_complexity=c.model_complexity,
                smooth_landmarks=c.smooth_landmarks,
                min_detection_confidence=c.min_detection_confidence,
                min_tracking_confidence=c.min_tracking_confidence,
            )
        except (OSError, RuntimeError, ConnectionError) as exc:
            raise MissingWeightsError(
                f"MediaPipe Pose, model_complexity={c.model_complexity}",
                "the mediapipe package's modules/pose_landmark folder",
                f"Only complexity 1 ships in the wheel; the others download on first use ({exc}). "
                "Use model_complexity=1 offline.",
            ) from None

    def reset(self) -> None:
        for graph in self._graphs:
            graph.close()  # each tracks its person from frame to frame

    def estimate(self, frames: np.ndarray, boxes: list[np.ndarray] | None = None) -> list[Poses]:
        from extractors.mediapipe_nets import quiet

        with quiet():
            return [self._people(frame) for frame in frames]

    def _people(self, frame: np.ndarray) -> Poses:
        """One frame's people, pass by pass, each later pass seeing the earlier ones painted over."""
        h, w = frame.shape[:2]
        seen = np.array(frame)
        fill = frame.reshape(-1, 3).mean(0).astype(np.uint8)
        people = []
        for graph in self._graphs:
            landmarks = graph(seen).pose_landmarks
            if landmarks is None:
                break  # nobody left to find: a later pass would only pay for its detector
            marks = np.array([(m.x, m.y, m.visibility) for m in landmarks.landmark], np.float32)
            kp = blazepose_to_coco(marks)
            visible = kp[kp[:, 2] >= 0.5] if (kp[:, 2] >= 0.5).any() else kp
            people.append((kp, landmark_box(visible[:, :2], 0.0), kp[:, 2].mean()))
            x1, y1, x2, y2 = landmark_box(visible[:, :2], self.config.pad) * np.array([w, h, w, h])
            seen[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = fill
        if not people:
            return Poses.empty()
        return Poses(
            np.stack([p[0] for p in people]),
            np.stack([p[1] for p in people]),
            np.array([p[2] for p in people], np.float32),
        )

    def provenance(self) -> dict[str, Any]:
        from extractors.mediapipe_nets import weights_id

        return {"weights": weights_id(f"complexity{self.config.model_complexity}")}


@dataclass
class UltralyticsPoseConfig:
    model: str = "yolov8n-pose.pt"  # a pose .pt checkpoint, or a pose yaml (random weights: tests only)
    imgsz: int = 640
    conf: float = 0.25  # person score threshold
    device: str = "auto"
    batch_size: int = 16


@POSE_BACKENDS.register("ultralytics")
class UltralyticsPose(PoseBackend):
    """Any ultralytics YOLO-pose model with COCO-17 keypoints; many people a frame."""

    Config = UltralyticsPoseConfig

    def setup(self) -> None:
        c = self.config
        what = f"ultralytics pose model {c.model}"
        self._model, self._hash = load_ultralytics(c.model, what)
        kpt_shape = list(getattr(self._model.model, "kpt_shape", None) or [])
        if self._model.task != "pose" or kpt_shape[:1] != [len(COCO17)]:
            raise ConfigError(
                f"{what} is a {self._model.task} model with keypoints {kpt_shape or 'none'}; "
                "the pose backend needs a COCO-17 pose model (e.g. yolov8n-pose.pt, yolo11n-pose.pt)"
            )
        self._device = pick_device(c.device)

    def estimate(self, frames: np.ndarray, boxes: list[np.ndarray] | None = None) -> list[Poses]:
        c = self.config
        h, w = frames.shape[1:3]
        out = []
        for start in range(0, len(frames), c.batch_size):
            bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames[start : start + c.batch_size]]
            for r in self._model.predict(bgr, imgsz=c.imgsz, conf=c.conf, device=self._device, verbose=False):
                if r.keypoints is None or not len(r.boxes):
                    out.append(Poses.empty())
                    continue
                out.append(
                    _poses(
                        r.keypoints.data.cpu().numpy(),
                        r.boxes.xyxy.cpu().numpy(),
                        r.boxes.conf.cpu().numpy(),
                        w,
                        h,
                    )
                )
        return out

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._hash}


@dataclass
class MMPoseConfig:
    config: str = "td-hm_hrnet-w32_8xb64-210e_coco-256x192.py"  # an mmpose top-down config file
    weights: str = "td-hm_hrnet-w32_8xb64-210e_coco-256x192.pth"  # its checkpoint
    device: str = "auto"


@POSE_BACKENDS.register("mmpose")
class MMPoseTopDown(PoseBackend):
    """An mmpose top-down COCO-17 model, run on the person boxes of a detection extractor.

    Used when mmpose can be imported; it is an optional extra (``make
    install-mmpose``), since mmcv has to be compiled from source.
    """

    Config = MMPoseConfig
    needs_boxes = True

    def setup(self) -> None:
        c = self.config
        what = f"mmpose model {c.config}"
        try:
            from mmpose.apis import inference_topdown, init_model
        except ImportError:
            raise ConfigError(
                f"{what}: mmpose is not installed. It needs mmcv compiled from source (about 10 minutes): "
                "run `make install-mmpose` (the recipe is in README.md, 'Pose'), or use "
                "backend.name=mediapipe or ultralytics"
            ) from None
        for path, option in ((c.config, "config"), (c.weights, "weights")):
            if not Path(path).is_file():
                raise MissingWeightsError(
                    what, path, f"Put the model's {option} file there, or set backend.{option}=..."
                )
        self._model = init_model(c.config, c.weights, device=pick_device(c.device))
        joints = int((getattr(self._model, "dataset_meta", None) or {}).get("num_keypoints", 0))
        if joints != len(COCO17):
            raise ConfigError(f"{what} predicts {joints} keypoints; the pose backend needs a COCO-17 model")
        self._infer = inference_topdown
        self._hash = file_sha256(c.weights)

    def estimate(self, frames: np.ndarray, boxes: list[np.ndarray] | None = None) -> list[Poses]:
        h, w = frames.shape[1:3]
        out = []
        for frame, frame_boxes in zip(frames, boxes or [None] * len(frames), strict=True):
            if frame_boxes is None or not len(frame_boxes):
                out.append(Poses.empty())
                continue
            samples = self._infer(self._model, np.ascontiguousarray(frame[..., ::-1]), frame_boxes, "xyxy")
            kp = np.concatenate([s.pred_instances.keypoints for s in samples])  # (k, 17, 2) pixels
            conf = np.concatenate([s.pred_instances.keypoint_scores for s in samples])  # (k, 17)
            keypoints = np.concatenate([kp, conf[..., None]], -1)
            out.append(_poses(keypoints, frame_boxes, conf.mean(1), w, h))
        return out

    def provenance(self) -> dict[str, Any]:
        return {"weights": self._hash}


# ---------------------------------------------------------------- tracking


@dataclass
class Track:
    """One person across frames: the frames they were seen in, with their keypoints and boxes."""

    frames: list[int] = field(default_factory=list)
    keypoints: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)

    def add(self, frame: int, keypoints: np.ndarray, box: np.ndarray) -> None:
        self.frames.append(frame)
        self.keypoints.append(keypoints)
        self.boxes.append(box)

    @property
    def weight(self) -> float:
        """Size × duration: the summed box area over the frames the person was seen in."""
        return float(box_area(np.asarray(self.boxes)).sum())


def track_people(per_frame: list[Poses], iou_threshold: float = 0.3, max_gap: int = 10) -> list[Track]:
    """Links people across frames by box IoU (Hungarian matching against each track's last box).

    A track missed for up to ``max_gap`` frames keeps its identity when the
    person comes back near where they were last seen; a detection matched
    to no track (IoU below ``iou_threshold``) starts a new one.
    """
    from scipy.optimize import linear_sum_assignment

    tracks: list[Track] = []
    for t, poses in enumerate(per_frame):
        live = [tr for tr in tracks if t - tr.frames[-1] <= max_gap + 1]
        matched: dict[int, Track] = {}
        if live and len(poses.boxes):
            iou = box_iou(np.stack([tr.boxes[-1] for tr in live]), poses.boxes)
            rows, cols = linear_sum_assignment(-iou)
            matched = {c: live[r] for r, c in zip(rows, cols, strict=True) if iou[r, c] >= iou_threshold}
        for j in range(len(poses.boxes)):
            track = matched.get(j)
            if track is None:
                track = Track()
                tracks.append(track)
            track.add(t, poses.keypoints[j], poses.boxes[j])
    return tracks


def single_track(per_frame: list[Poses]) -> list[Track]:
    """The track of a one-person backend: its (at most one) person in every frame."""
    track = Track()
    for t, poses in enumerate(per_frame):
        if len(poses.boxes):
            track.add(t, poses.keypoints[0], poses.boxes[0])
    return [track] if track.frames else []


def main_people(tracks: list[Track], n_frames: int, people: int) -> np.ndarray:
    """(n_frames, people, 17, 3) keypoints of the ``people`` largest-longest tracks, in that order.

    Frames where a kept person was not seen are zeros (confidence 0: missing).
    """
    out = np.zeros((n_frames, people, len(COCO17), 3), np.float32)
    for slot, track in enumerate(sorted(tracks, key=lambda tr: tr.weight, reverse=True)[:people]):
        out[track.frames, slot] = np.asarray(track.keypoints)
    return out


# ---------------------------------------------------------------- the skeleton descriptor

JOINT_FEATURES = 5  # x, y, vx, vy, confidence
ROW_DIM = len(COCO17) * JOINT_FEATURES  # 85


def _masked_mid(xy: np.ndarray, present: np.ndarray, pair: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint of the present joints of ``pair`` (the one present if the other is not), and
    whether either is present."""
    mask = present[..., pair].astype(np.float64)
    count = mask.sum(-1)
    mid = (xy[..., pair, :] * mask[..., None]).sum(-2) / np.maximum(count, 1)[..., None]
    return mid, count > 0


@dataclass(frozen=True)
class UsableJoints:
    """Which joints and person-frames of (T, P, 17, 3) keypoints count; their centres and scales."""

    xy: np.ndarray  # (T, P, 17, 2) pixels
    conf: np.ndarray  # (T, P, 17)
    present: np.ndarray  # (T, P, 17) bool
    valid: np.ndarray  # (T, P) bool: a person-frame that gives a row (and a box)
    centre: np.ndarray  # (T, P, 2) pixels
    scale: np.ndarray  # (T, P) torso length in pixels


def usable_joints(
    keypoints: np.ndarray,
    width: int,
    height: int,
    min_confidence: float,
    min_torso: float = 0.0,
    min_frames: int = 1,
    margin: float = 0.02,
) -> UsableJoints:
    """The rules that decide which joints and people are real (see ``skeleton_rows``).

    Shared by the skeleton descriptor and ``odf.pose``'s person boxes, so a
    box is drawn exactly where a skeleton row is made.
    """
    kp = np.asarray(keypoints, np.float64)
    xy = kp[..., :2] * np.array([width, height], np.float64)
    conf = kp[..., 2]
    inside = ((kp[..., :2] >= -margin) & (kp[..., :2] <= 1 + margin)).all(-1)
    present = (conf >= min_confidence) & inside
    hip, has_hip = _masked_mid(xy, present, (LEFT_HIP, RIGHT_HIP))
    shoulder, has_shoulder = _masked_mid(xy, present, (LEFT_SHOULDER, RIGHT_SHOULDER))
    torso = np.where(has_hip & has_shoulder, np.linalg.norm(shoulder - hip, axis=-1), np.nan)
    torso[~(torso >= max(min_torso * height, 1e-9))] = np.nan
    seen = np.isfinite(torso)
    median = np.array(  # (P,): each person's median visible torso; NaN for one never seen whole
        [np.median(torso[seen[:, p], p]) if seen[:, p].any() else np.nan for p in range(torso.shape[1])]
    )
    scale = np.where(np.isfinite(torso), torso, median[None])
    centre = np.where(has_hip[..., None], hip, shoulder)
    valid = (has_hip | has_shoulder) & np.isfinite(scale)  # (T, P)
    valid &= valid.sum(0, keepdims=True) >= min_frames
    return UsableJoints(xy, conf, present, valid, centre, scale)


def skeleton_rows(
    keypoints: np.ndarray,
    width: int,
    height: int,
    timestamps: np.ndarray,
    min_confidence: float,
    min_torso: float = 0.0,
    min_frames: int = 1,
    margin: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame, per-person rows (N, 85) and the frame of each row, from (T, P, 17, 3) keypoints.

    Coordinates are taken in pixels (so a non-square frame is not
    stretched), centred on the mid-hip (the mid-shoulder when both hips are
    missing) and divided by the torso length (mid-shoulder to mid-hip). A
    frame whose torso is not visible uses that person's median torso over
    the video; a person with no visible torso at all, or a frame with
    neither hips nor shoulders, gives no row. Velocities are differences of
    consecutive frames in torso lengths per second, zero when the joint is
    missing in either frame. Missing joints are zeros in all five features.

    A joint is missing below ``min_confidence`` or outside the frame (by
    more than ``margin`` of its size): pose nets extrapolate unseen joints,
    and a "person" whose hips lie below the image is usually a false
    detection. A torso shorter than ``min_torso`` of the frame height counts
    as not visible, since joints of such small figures are mostly noise
    (MediaPipe draws a whole skeleton on a pair of feet at a frame's edge),
    and a person with fewer than ``min_frames`` usable frames gives no rows
    (a one-frame "person" is far more often a false detection than an action).
    """
    u = usable_joints(keypoints, width, height, min_confidence, min_torso, min_frames, margin)
    xy, present, valid = u.xy, u.present, u.valid
    safe = np.where(valid, u.scale, 1.0)[..., None, None]
    pos = np.where(present[..., None], (xy - u.centre[..., None, :]) / safe, 0.0)
    vel = np.zeros_like(pos)
    if len(xy) > 1:
        dt = np.maximum(np.diff(np.asarray(timestamps, np.float64)), 1e-6)[:, None, None, None]
        both = present[1:] & present[:-1] & valid[1:, :, None] & valid[:-1, :, None]
        vel[1:] = np.where(both[..., None], (xy[1:] - xy[:-1]) / safe[1:] / dt, 0.0)
    rows = np.concatenate([pos, vel, np.where(present, u.conf, 0.0)[..., None]], -1)  # (T, P, 17, 5)
    t_idx, p_idx = np.nonzero(valid)
    return rows[t_idx, p_idx].reshape(len(t_idx), ROW_DIM), t_idx


def skeleton_descriptor(
    rows: np.ndarray, frames: np.ndarray, n_vectors: int, power_norm: str, power_params: Mapping[str, float]
) -> np.ndarray:
    """ψ_skel: Eq. 16 multi-moment pooling of the rows, each frame weighted equally, then PN."""
    pooled = multi_moment_pool(rows, frames, n_vectors)
    return power_normalise(pooled, power_norm, **power_params).astype(np.float32)


@dataclass
class SkeletonConfig:
    fps: float | None = DETECTION_FPS  # an upper bound; 30 for ST-GCN, trained on 30 frames/s
    short_side: int | None = SHORT_SIDE  # the pose nets resize to 256 internally; this bounds decoding
    backend: dict[str, Any] = field(default_factory=dict)  # name=mediapipe|ultralytics|mmpose and options
    people: int = 2  # the main people kept, by box size × duration
    min_confidence: float = 0.3  # joints below it (or outside the frame) are missing
    min_torso: float = 0.04  # fraction of the frame height; smaller figures are ignored
    min_frames: int = 3  # a person seen in fewer usable frames is ignored
    iou_threshold: float = 0.3  # tracker: a person must overlap their last box this much
    max_gap: int = 10  # tracker: frames a person may be missed and keep their identity
    n_vectors: int = 3
    power_norm: str = "sigme"
    power_norm_params: dict[str, float] = field(default_factory=dict)
    person_boxes: str | None = None  # a detection extractor (odf.*) for top-down backends (mmpose)
    chunk: int = 32


@register("pose.skeleton")
class Skeleton(Extractor):
    """Tracked COCO-17 keypoints of the main people, and a weight-free multi-moment skeleton descriptor."""

    weights = "pretrained"
    in_default_set = True
    version = "2"  # 2: MediaPipe finds a second person (passes)
    Config = SkeletonConfig

    def __init__(self, config: SkeletonConfig | None = None) -> None:
        config = config if config is not None else SkeletonConfig()
        where = f"options.{self.name}"
        cls, cfg = build_backend(POSE_BACKENDS, config.backend, "mediapipe", f"{where}.backend")
        if config.people < 1 or not 0 <= config.min_confidence <= 1 or config.max_gap < 0:
            raise ConfigError(f"{where}: need people >= 1, 0 <= min_confidence <= 1 and max_gap >= 0")
        if cls.needs_boxes and not config.person_boxes:
            raise ConfigError(
                f"{where}.person_boxes: the {cls.name} backend is top-down; name the detection extractor "
                "whose person boxes it crops (e.g. person_boxes=odf.fasterrcnn, with the same fps)"
            )
        check_power_norm(config.power_norm, config.power_norm_params, where)
        config = dataclasses.replace(config, backend={"name": cls.name, **to_plain(cfg)})
        super().__init__(config)
        self.backend: PoseBackend = cls(cfg)

    def needs(self) -> Needs:
        c = self.config
        inputs = (c.person_boxes,) if self.backend.needs_boxes else ()
        return Needs(frames=FrameSpec(fps=c.fps, max_short_side=c.short_side), inputs=inputs)

    def produces(self) -> dict[str, OutputSpec]:
        c = self.config
        return {
            "descriptor": OutputSpec(
                (multi_moment_size(ROW_DIM, c.n_vectors),),
                "float32",
                "multi-moment pooled skeleton rows (Eq. 16) after power normalisation",
            ),
            "keypoints": OutputSpec(
                (None, c.people, len(COCO17), 3),
                "float32",
                "main people's COCO-17 keypoints per frame: x, y in [0, 1], confidence (0: missing)",
            ),
        }

    def setup(self) -> None:
        self.backend.setup()

    def teardown(self) -> None:
        self.backend = type(self.backend)(self.backend.config)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        c = self.config
        self.backend.reset()
        per_frame: list[Poses] = []
        times: list[np.ndarray] = []
        boxes_of: dict[int, np.ndarray] | None = None
        width = height = 0
        for batch in video.frames(self.needs().frames, chunk=c.chunk):
            height, width = batch.frames.shape[1:3]
            boxes = None
            if self.backend.needs_boxes:
                if boxes_of is None:
                    boxes_of = person_boxes_by_frame(inputs[c.person_boxes], width, height)
                boxes = [boxes_of.get(len(per_frame) + i) for i in range(len(batch.frames))]
            per_frame.extend(self.backend.estimate(batch.frames, boxes))
            times.append(batch.timestamps)
        if self.backend.needs_boxes:
            check_same_frames(inputs[c.person_boxes], len(per_frame), c.person_boxes, video.path, self.name)
        tracks = (
            track_people(per_frame, c.iou_threshold, c.max_gap)
            if self.backend.multi_person
            else single_track(per_frame)
        )
        keypoints = main_people(tracks, len(per_frame), c.people)
        timestamps = np.concatenate(times) if times else np.zeros(0)
        rows, frames = skeleton_rows(
            keypoints, width, height, timestamps, c.min_confidence, c.min_torso, c.min_frames
        )
        attrs = {
            "frames": len(per_frame),
            "width": width,
            "height": height,
            # The rules that made the rows, so odf.pose boxes the same person-frames.
            "min_confidence": c.min_confidence,
            "min_torso": c.min_torso,
            "min_frames": c.min_frames,
            "tracks": len(tracks),
            "frames_with_person": int(len(np.unique(frames))),
            "layout": "coco17",
            "backend": self.backend.name,
            **self.backend.provenance(),
        }
        if not len(rows):
            reason = f"no person with a visible torso in {len(per_frame)} frames"
            return Result(flags={"no_skeleton": reason}, attrs=attrs)
        descriptor = skeleton_descriptor(rows, frames, c.n_vectors, c.power_norm, c.power_norm_params)
        return Result({"descriptor": descriptor, "keypoints": keypoints}, attrs=attrs)


# ---------------------------------------------------------------- person boxes for odf.pose


@dataclass
class PoseKeypointsConfig:
    source: str = "pose.skeleton"  # the extractor whose stored keypoints are boxed
    pad: float = 0.1  # the joints' extent grown by this fraction a side (joints lie inside the body)


@DETECTORS.register("pose_keypoints")
class PoseKeypointBoxes(Detector):
    """Person boxes from a pose extractor's stored skeletons: pose runs once, for both streams.

    A box is drawn on exactly the person-frames that make skeleton rows
    (``usable_joints`` with the pose extractor's own thresholds, read from
    its result), around the present joints; its score is their mean
    confidence. Frames are matched by index, so ``odf.pose`` must sample
    like ``pose.skeleton`` (``ODFExtractor`` checks the counts).
    """

    Config = PoseKeypointsConfig
    label_range = "pose_person"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.config.source,)

    def reset(self, inputs: Mapping[str, Any] | None = None) -> None:
        self._frame = 0
        result = (inputs or {}).get(self.config.source)
        if result is None or "keypoints" not in result.arrays:
            self._boxes: dict[int, list[tuple[np.ndarray, float]]] = {}
            return
        keypoints, a = result.arrays["keypoints"], result.attrs
        u = usable_joints(
            keypoints, int(a["width"]), int(a["height"]),
            float(a["min_confidence"]), float(a["min_torso"]), int(a["min_frames"]),
        )  # fmt: skip
        self._boxes = {}
        for t, p in zip(*np.nonzero(u.valid), strict=True):
            joints = np.asarray(keypoints[t, p, u.present[t, p], :2], np.float32)
            if len(joints) >= 2:
                box = landmark_box(joints, self.config.pad)
                self._boxes.setdefault(int(t), []).append((box, float(u.conf[t, p, u.present[t, p]].mean())))

    def detect(self, frames: np.ndarray) -> list[Detections]:
        slot = LABEL_RANGES["pose_person"][0]
        out = []
        for t in range(self._frame, self._frame + len(frames)):
            found = self._boxes.get(t, [])
            if not found:
                out.append(Detections.empty())
                continue
            boxes = np.stack([b for b, _ in found])
            out.append(
                Detections(boxes, np.array([sc for _, sc in found], np.float32), np.full(len(found), slot))
            )
        self._frame += len(frames)
        return out


# ---------------------------------------------------------------- ST-GCN (the paper's GSF)


def openpose_spatial_graph(max_hop: int = 1) -> np.ndarray:
    """ST-GCN's (3, 18, 18) adjacency for the OpenPose-18 skeleton, "spatial" partitioning.

    Entry [k, j, i] weights joint j's features into joint i. Neighbours
    within ``max_hop`` are normalised by the in-degree of the receiving
    column, then split by their distance to the neck (the centre): the same
    distance (root) for k=0 (self links) and k=1, farther from the neck
    (centripetal side) for k=1, nearer for k=2 (centrifugal), as Yan et al.
    (2018) define it.
    """
    from scipy.sparse.csgraph import shortest_path

    n = len(OPENPOSE18)
    adj = np.zeros((n, n))
    for i, j in OPENPOSE18_BONES:
        adj[i, j] = adj[j, i] = 1.0
    hops = shortest_path(adj, unweighted=True)
    hops[hops > max_hop] = np.inf
    reach = np.isfinite(hops).astype(np.float64)
    norm = reach / reach.sum(0, keepdims=True)  # A·D⁻¹: columns sum to 1
    d = shortest_path(adj, unweighted=True)[:, OPENPOSE18_CENTRE]
    dj, di = d[:, None], d[None, :]
    parts = []
    for hop in range(max_hop + 1):
        at = hops == hop
        root = np.where(at & (dj == di), norm, 0.0)
        if hop == 0:
            parts.append(root)
        else:
            parts.append(root + np.where(at & (dj > di), norm, 0.0))
            parts.append(np.where(at & (dj < di), norm, 0.0))
    return np.stack(parts).astype(np.float32)


def build_stgcn(
    num_class: int = 400, in_channels: int = 3, edge_importance: bool = True, dropout: float = 0.0
):
    """ST-GCN (Yan, Xiong & Lin 2018) with the module names of the public Kinetics-skeleton checkpoint.

    Written from the paper; parameter names follow the reference release
    (``data_bn``, ``st_gcn_networks.{i}.gcn.conv``, ``.tcn.{0,2,3}``,
    ``.residual.{0,1}``, ``edge_importance.{i}``, ``fcn``, and the graph as
    buffer ``A``), so its ``st_gcn.kinetics.pt`` loads unchanged. Input
    (N, 3, T, 18, M): x, y and confidence of M people; output (N, num_class).
    """
    import torch
    from torch import nn

    graph = torch.from_numpy(openpose_spatial_graph())
    k, v = graph.shape[0], graph.shape[1]

    class GraphConv(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout * k, kernel_size=(1, 1))

        def forward(self, x, a):
            x = self.conv(x)
            n, kc, t, vv = x.shape
            return torch.einsum("nkctv,kvw->nctw", x.view(n, k, kc // k, t, vv), a).contiguous()

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, residual: bool = True) -> None:
            super().__init__()
            self.gcn = GraphConv(cin, cout)
            self.tcn = nn.Sequential(
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, (9, 1), (stride, 1), (4, 0)),
                nn.BatchNorm2d(cout),
                nn.Dropout(dropout, inplace=True),
            )
            self.mode = "none" if not residual else "identity" if cin == cout and stride == 1 else "conv"
            if self.mode == "conv":
                self.residual = nn.Sequential(
                    nn.Conv2d(cin, cout, kernel_size=1, stride=(stride, 1)), nn.BatchNorm2d(cout)
                )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x, a):
            res = 0 if self.mode == "none" else x if self.mode == "identity" else self.residual(x)
            return self.relu(self.tcn(self.gcn(x, a)) + res)

    widths = [(in_channels, 64, 1), (64, 64, 1), (64, 64, 1), (64, 64, 1), (64, 128, 2)]
    widths += [(128, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 256, 1)]

    class STGCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("A", graph.clone())
            self.data_bn = nn.BatchNorm1d(in_channels * v)
            self.st_gcn_networks = nn.ModuleList(
                Block(cin, cout, stride, residual=i > 0) for i, (cin, cout, stride) in enumerate(widths)
            )
            if edge_importance:
                self.edge_importance = nn.ParameterList(
                    nn.Parameter(torch.ones(graph.shape)) for _ in self.st_gcn_networks
                )
            else:
                self.edge_importance = None
            self.fcn = nn.Conv2d(256, num_class, kernel_size=1)

        def forward(self, x):
            n, c, t, vv, m = x.shape
            x = x.permute(0, 4, 3, 1, 2).reshape(n * m, vv * c, t)  # BN over (joint, channel) pairs
            x = self.data_bn(x).view(n, m, vv, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, vv)
            for i, block in enumerate(self.st_gcn_networks):
                x = block(x, self.A if self.edge_importance is None else self.A * self.edge_importance[i])
            x = x.mean((2, 3)).view(n, m, -1).mean(1)  # global pooling, then over people
            return self.fcn(x[:, :, None, None]).flatten(1)

    return STGCN()


def stgcn_input(keypoints: np.ndarray) -> np.ndarray:
    """(3, T, 18, P) ST-GCN input from (T, P, 17, 3) COCO keypoints in [0, 1].

    The Kinetics-skeleton feeder's convention: coordinates normalised by the
    frame size and shifted by −0.5, and zero wherever the confidence is zero.
    """
    op = coco_to_openpose(np.asarray(keypoints, np.float32))  # (T, P, 18, 3)
    xy = np.where(op[..., 2:] > 0, op[..., :2] - 0.5, 0.0)
    return np.concatenate([xy, op[..., 2:]], -1).transpose(3, 0, 2, 1).astype(np.float32)


@dataclass
class STGCNConfig:
    source: str = "pose.skeleton"  # the extractor whose stored keypoints this reads
    weights: str | None = None  # st_gcn.kinetics.pt (required; "random" for tests)
    num_class: int = 400
    window: int = 300  # frames per forward pass (Kinetics-skeleton clips are 300 frames)
    output: str = "logits"  # logits or softmax
    device: str = "auto"


@register("pose.stgcn")
class STGCNFeatures(Extractor):
    """The paper's GSF: ST-GCN (Kinetics-skeleton) scores on the tracked skeletons, 400-d."""

    weights = "checkpoint"
    version = "1"
    Config = STGCNConfig

    def __init__(self, config: STGCNConfig | None = None) -> None:
        super().__init__(config)
        c, where = self.config, f"options.{self.name}"
        if c.output not in ("logits", "softmax"):
            raise ConfigError(f"{where}.output must be logits or softmax, not {c.output!r}")
        if c.window < 1 or c.num_class < 1:
            raise ConfigError(f"{where}: window and num_class must be positive")

    def needs(self) -> Needs:
        return Needs(inputs=(self.config.source,))

    def produces(self) -> dict[str, OutputSpec]:
        return {"descriptor": OutputSpec((self.config.num_class,), "float32", f"ST-GCN {self.config.output}")}

    def setup(self) -> None:
        import torch

        from pipelines.weights import build_seeded, load_required_checkpoint

        c = self.config
        net = build_seeded(lambda: build_stgcn(c.num_class))
        self._identity = load_required_checkpoint(
            net,
            c.weights,
            f"{self.name} (ST-GCN, Kinetics-skeleton)",
            "options.pose.stgcn.weights",
            "Set it to the ST-GCN Kinetics-skeleton checkpoint (st_gcn.kinetics.pt); "
            "pose.skeleton needs no weights.",
            "an ST-GCN checkpoint (openpose layout, spatial graph)",
        )
        self._torch = torch
        self._device = pick_device(c.device)
        self._net = net.eval().to(self._device)

    def process(self, video: VideoInput, inputs: Mapping[str, Result]) -> Result:
        torch, c = self._torch, self.config
        source = inputs[c.source]
        if source.flags or "keypoints" not in source.arrays:
            return Result(flags=dict(source.flags) or {"no_skeleton": f"{c.source} stored no keypoints"})
        data = stgcn_input(source.arrays["keypoints"])
        total = np.zeros(c.num_class, np.float64)
        steps = data.shape[1]
        with torch.inference_mode():
            for start in range(0, steps, c.window):
                part = torch.from_numpy(np.ascontiguousarray(data[:, start : start + c.window]))[None]
                logits = self._net(part.to(self._device))[0].double().cpu().numpy()
                total += logits * part.shape[2]
        out = total / steps
        if c.output == "softmax":
            out = np.exp(out - out.max())
            out /= out.sum()
        return Result({"descriptor": out.astype(np.float32)}, attrs={"weights": self._identity})
