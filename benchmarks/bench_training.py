"""Training-step and inference cost of hallucination (issue targets: ≤1.15x and ≤1.05x).

Step time: one iteration of the RGB-only baseline (classification step only)
against one iteration with S streams (hallucination step + classification
step). Inference: the exported TorchScript model (backbone + streams + fusion
+ PredNet) against the bare backbone. Synthetic clips and targets, so it
measures the model, not decoding. Run: `python benchmarks/bench_training.py`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import print_table
from hallucinate.backbones import create_backbone
from hallucinate.data import ClipSpec
from hallucinate.model import HallucinationNet, StreamSpec
from hallucinate.power_norm import create_power_norm
from hallucinate.run import export_torchscript
from hallucinate.trainer import Schedule, Trainer, build_hallucination_loss


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="tiny3d")
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    clip = ClipSpec(args.frames, args.size, args.size)
    streams = [StreamSpec(f"s{i}.x/y", 1024) for i in range(args.streams)]
    x = torch.rand(args.batch, 3, clip.frames, clip.size, clip.size) * 2 - 1
    batch = {
        "clip": x,
        "label": torch.randint(0, 6, (args.batch,)),
        "gt": {s.name: torch.randn(args.batch, s.dim) for s in streams},
        "mask": torch.ones(args.batch, len(streams), dtype=torch.bool),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for label, use, loss, mode in (
            ("rgb-only", [], None, "alternating"),
            ("mse", streams, "mse", "alternating"),
            ("uncertainty", streams, "uncertainty", "alternating"),
            ("mse, joint", streams, "mse", "joint"),
        ):
            torch.manual_seed(0)
            model = HallucinationNet(
                create_backbone(args.backbone),
                use,
                6,
                clip.frames,
                clip.size,
                create_power_norm("asinhe"),
                d=128,
                hidden=256,
            )
            hal = build_hallucination_loss(loss, len(use), 128, "grouped", 1.0, 0) if use else None
            t = Trainer(model, hal, Schedule(mode=mode), Path(tmp) / label, log=lambda m: None)
            model.train()

            def step(t=t):
                t.train_step(batch)

            times[label] = timed(step, args.repeats)
            rows.append(
                [
                    f"train step, {label} ({len(use)} streams)",
                    round(times[label] * 1000, 1),
                    f"{times[label] / times['rgb-only']:.2f}x",
                ]
            )
        model.eval()
        traced = torch.jit.load(str(export_torchscript(model, clip, Path(tmp) / "m.pt")))
        with torch.no_grad():
            bare = timed(lambda: model.backbone(x), args.repeats)
            full = timed(lambda: traced(x), args.repeats)
        rows.append(["inference, bare backbone", round(bare * 1000, 1), "1.00x"])
        rows.append(
            [f"inference, exported ({len(streams)} streams)", round(full * 1000, 1), f"{full / bare:.2f}x"]
        )
    print_table(
        f"Training and inference cost ({args.backbone}, batch {args.batch}, {clip.frames}x{clip.size}², "
        f"{torch.get_num_threads()} threads)",
        ["what", "ms", "vs baseline"],
        rows,
    )


if __name__ == "__main__":
    main()
