"""Speed of the skeleton (GSF) and audio (AF) extractors.

    python -m benchmarks.bench_pose_audio [--frames 64] [--seconds 60] [--device cpu|cuda]

Pose rows, frames/s on a real photo of a person (ultralytics' bundled
``zidane.jpg``, panned slowly so every frame differs) at 320x240 and
640x480, one torch/OpenCV thread as the extraction workers run:

- MediaPipe Pose (complexity 1, the bundled model), video mode;
- YOLOv8n-pose and YOLOv8s-pose at imgsz 640, random weights built from the
  yaml (the cost of a trained model is the same);
- the rest of ``pose.skeleton`` (tracking + descriptor) on those keypoints;
- ST-GCN (random weights) on a 300-frame, 2-person sequence.

Audio rows: real-time factor (seconds of audio processed per second) of
``audio.logmel`` and ``audio.soundnet`` (random weights) on ``--seconds`` of
a synthetic tone mixture, decoding excluded.

With ``--device cuda`` the YOLO, ST-GCN and SoundNet rows run on the GPU;
MediaPipe's Python solution runs on the CPU only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks._common import print_table, timed
from extractors import create_extractor
from extractors.base import AudioTrack, Result
from extractors.pose import (
    POSE_BACKENDS,
    build_stgcn,
    main_people,
    single_track,
    skeleton_descriptor,
    skeleton_rows,
)
from tests.helpers import save_yolo


def person_frames(n: int, width: int, height: int) -> np.ndarray:
    import ultralytics

    image = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "zidane.jpg"))[:, :, ::-1]
    out = []
    for i in range(n):
        crop = image[:, 600 - 2 * i : 1200 - 2 * i]  # 600x720: the right-hand person only
        canvas = np.full((720, 960, 3), 114, np.uint8)  # letterboxed to 4:3, not stretched
        canvas[:, 180:780] = crop
        out.append(cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(out)


class ToneVideo:
    """A VideoInput with only an audio track, so the audio rows time the extractor, not the decoder."""

    video_id = "bench"
    path = "in-memory audio"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def audio(self, spec):
        t = np.arange(int(self.seconds * spec.rate)) / spec.rate
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1900 * t * (1 + 0.1 * np.sin(t)))
        return AudioTrack(x.astype(np.float32), spec.rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rows = []
    keypoints = None
    for width, height in ((320, 240), (640, 480)):
        frames = person_frames(args.frames, width, height)
        mp_backend = POSE_BACKENDS.get("mediapipe")(POSE_BACKENDS.get("mediapipe").Config())
        mp_backend.setup()
        mp_backend.estimate(frames[:8])  # warm-up, then a fresh video
        mp_backend.reset()
        t0 = time.perf_counter()
        poses = mp_backend.estimate(frames)
        seconds = time.perf_counter() - t0
        found = sum(len(p.boxes) for p in poses)
        rows.append([f"mediapipe pose {width}x{height}", "cpu", len(frames), seconds, len(frames) / seconds])
        rows[-1].append(f"person in {found}/{len(frames)} frames")
        if keypoints is None:
            keypoints = main_people(single_track(poses), len(poses), 2)
        for size in ("n", "s"):
            # built from its yaml offline and saved, so it loads as a user's .pt would
            path = save_yolo(
                Path(tempfile.gettempdir()) / f"bench-yolov8{size}-pose.pt", f"yolov8{size}-pose.yaml"
            )
            cls = POSE_BACKENDS.get("ultralytics")
            yolo = cls(cls.Config(model=str(path), device=args.device))
            yolo.setup()
            seconds, _ = timed(yolo.estimate, frames)
            name = f"yolov8{size}-pose 640 ({width}x{height} in)"
            rows.append([name, args.device, len(frames), seconds, len(frames) / seconds, "random weights"])

    times = np.arange(len(keypoints)) / 30.0

    def descriptor():
        r, f = skeleton_rows(keypoints, 320, 240, times, 0.3, 0.04, 3)
        return skeleton_descriptor(r, f, 3, "sigme", {})

    seconds, _ = timed(descriptor, repeat=20)
    rows.append(["skeleton descriptor", "cpu", len(keypoints), seconds, len(keypoints) / seconds, ""])

    net = build_stgcn().eval().to(args.device)
    x = torch.randn(1, 3, 300, 18, 2, device=args.device)

    def stgcn():
        with torch.inference_mode():
            out = net(x)
        return out.cpu()

    seconds, _ = timed(stgcn, repeat=3)
    rows.append(["ST-GCN, 300 frames x 2 people", args.device, 300, seconds, 300 / seconds, "random weights"])
    print_table("Pose (GSF)", ["stage", "device", "frames", "seconds", "frames/s", "note"], rows)

    audio_rows = []
    video = ToneVideo(args.seconds)
    for name, options in (
        ("audio.logmel", {}),
        ("audio.soundnet", {"weights": "random", "device": args.device}),
    ):
        ex = create_extractor(name, **options)
        ex.setup()
        seconds, result = timed(ex.process, video, {})
        assert isinstance(result, Result) and not result.flags
        dev = options.get("device", "cpu")
        audio_rows.append([name, dev, args.seconds, seconds, args.seconds / seconds])
    print_table(
        "Audio (AF), real-time factor",
        ["extractor", "device", "audio seconds", "seconds", "x real time"],
        audio_rows,
    )


if __name__ == "__main__":
    main()
