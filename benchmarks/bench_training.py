"""Training-step and inference cost of hallucination (issue targets: ≤1.15x and ≤1.05x).

Step time: one iteration of the RGB-only baseline (classification step only)
against one iteration with S streams (hallucination step + classification
step). Inference: the exported TorchScript model (backbone + streams + fusion
+ PredNet) against the bare backbone. Synthetic clips and targets, so it
measures the model, not decoding. Run: `python -m benchmarks.bench_training`
(tiny3d at 72², the demo's backbone, and r2plus1d_18 at 112², a real one with
random weights: the heads' share of the cost depends on the backbone's size).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import print_table, timed
from hallucinate.backbones import create_backbone
from hallucinate.data import ClipSpec
from hallucinate.model import HallucinationNet, StreamSpec
from hallucinate.power_norm import create_power_norm
from hallucinate.run import export_torchscript
from hallucinate.trainer import Schedule, Trainer, build_hallucination_loss

# Clip size per backbone: tiny3d at the demo's size, torchvision models at their own.
SIZES = {"tiny3d": 72}
DEFAULT_SIZE = 112


def measure(backbone: str, streams: int, batch_size: int, frames: int, size: int, repeats: int) -> list:
    clip = ClipSpec(frames, size, size)
    specs = [StreamSpec(f"s{i}.x/y", 1024) for i in range(streams)]
    x = torch.rand(batch_size, 3, clip.frames, clip.size, clip.size) * 2 - 1
    batch = {
        "clip": x,
        "label": torch.randint(0, 6, (batch_size,)),
        "gt": {s.name: torch.randn(batch_size, s.dim) for s in specs},
        "mask": torch.ones(batch_size, len(specs), dtype=torch.bool),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for label, use, loss, mode in (
            ("rgb-only", [], None, "alternating"),
            ("mse", specs, "mse", "alternating"),
            ("uncertainty", specs, "uncertainty", "alternating"),
            ("mse, joint", specs, "mse", "joint"),
        ):
            torch.manual_seed(0)
            model = HallucinationNet(
                create_backbone(backbone),
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

            times[label], _ = timed(step, repeat=repeats)
            rows.append(
                [
                    backbone,
                    f"train step, {label} ({len(use)} streams)",
                    round(times[label] * 1000, 1),
                    f"{times[label] / times['rgb-only']:.2f}x",
                ]
            )
        model.eval()
        traced = torch.jit.load(str(export_torchscript(model, clip, Path(tmp) / "m.pt")))
        with torch.no_grad():
            bare, _ = timed(model.backbone, x, repeat=repeats)
            full, _ = timed(traced, x, repeat=repeats)
        rows.append([backbone, "inference, bare backbone", round(bare * 1000, 1), "1.00x"])
        rows.append(
            [
                backbone,
                f"inference, exported ({len(specs)} streams)",
                round(full * 1000, 1),
                f"{full / bare:.2f}x",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", default="tiny3d,r2plus1d_18", help="comma-separated")
    parser.add_argument("--streams", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, help="crop size for every backbone (default: per backbone)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = {b: args.size or SIZES.get(b, DEFAULT_SIZE) for b in args.backbones.split(",")}
    rows = []
    for backbone, size in sizes.items():
        rows += measure(backbone, args.streams, args.batch, args.frames, size, args.repeats)
    print_table(
        f"Training and inference cost (batch {args.batch}, {args.frames} frames, "
        f"{', '.join(f'{b} {s}²' for b, s in sizes.items())}, {torch.get_num_threads()} threads)",
        ["backbone", "what", "ms", "vs baseline"],
        rows,
    )


if __name__ == "__main__":
    main()
