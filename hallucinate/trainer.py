"""The alternating trainer (METHOD.md §4.5).

Each iteration makes two updates, each with its own Adam optimiser:

(a) the hallucination step: the stacked stream outputs regress their
    power-normalised, sketched ground truth (MSE or the uncertainty loss);
    the streams, CENet and, by default, the backbone are updated;
(b) the classification step: cross-entropy (or BCE for multi-label data)
    through backbone, streams, HAF and PredNet.

Two optimisers, not one: the hallucination loss (a sum of squares over d
sketch coordinates per stream) can be two orders of magnitude larger than the
cross-entropy; sharing Adam's second-moment estimates would then shrink every
classification update of the shared backbone to nothing. With one optimiser
per step, each step's update size is independent of its loss scale, which is
also why ``alpha`` acts on a learning rate rather than multiplying the loss.
It sets the backbone's learning rate in step (a) (alpha·lr): alpha exists to
keep the regression of hard-to-predict targets from drowning the
classification signal in the shared backbone, which alpha = 1 (the paper's)
does on the demo. The stream heads and CENet step at lr whatever alpha is:
they are the hallucinators, and step (b) trains them too, at lr, for the
classifier; at alpha·lr in step (a) (as before 2026-11-23) the classification
steps won, and with alpha = 0.05 the streams' R² against their ground truth
was below −1 even on the training clips. With alpha = 1 nothing changes.

Mixed precision (``precision=bf16`` or ``fp16``) runs the forward passes
under ``torch.autocast`` and computes the losses in fp32 on the cast-up
outputs: the hallucination loss sums d squared residuals per stream and the
uncertainty loss exponentiates CENet's log-diagonal, both of which a 16-bit
sum would round badly. fp16, whose exponent range is narrow, gets a loss
scaler per optimiser (``torch.amp.GradScaler``): step (a)'s loss can be two
orders of magnitude larger than step (b)'s, so one shared scale would
underflow one step's gradients or overflow the other's.

Checkpoints hold the model (sketches included, they are buffers), the loss
(CENet), both optimisers, schedulers and loss scalers, the epoch and every
RNG state, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hallucinate.losses import UncertaintyLoss, masked_mse
from hallucinate.metrics import classification_metrics
from hallucinate.model import HallucinationNet, load_model_state
from pipelines.errors import DivergedError, HallucinateError

# Precision name -> the dtype autocast computes in (None: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Schedule:
    epochs: int = 50
    lr: float = 1e-4
    lr_step: int = 10  # epochs between halvings
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    alpha: float = 1.0  # weight of the hallucination loss on the backbone (its lr in step (a))
    hal_updates_backbone: bool = True  # METHOD.md §7.18: step (a) also trains the backbone
    # "alternating" (the paper: two updates per iteration) or "joint" (ours: one
    # update of CE + alpha * hallucination loss, one backbone pass, about half the cost)
    mode: str = "alternating"
    # Weighted-mean fusion: β stays 0 (equal weights) for this many epochs, then is
    # picked each epoch by golden-section search on the validation loss in [0, beta_high].
    beta_warmup: int = 10
    beta_high: float = 50.0
    # Epochs over which the learning rate ramps up linearly, lr/(w+1), 2·lr/(w+1), ..., lr.
    # At the full rate from a random start, Adam's first steps can throw a small
    # network into a region it takes half the budget to leave: on the demo one
    # seed in six of the RGB-only tiny3d stalled that way (test top-1 0.45
    # against 0.66-0.71 for the other five; 0.71 with a 5-epoch warm-up).
    warmup: int = 0
    # fp32, or bf16 / fp16 autocast for the forward passes (see the module docstring).
    # On a GPU with tensor cores they roughly halve activation memory and step time;
    # bf16 needs no loss scaling but an Ampere or newer GPU.
    precision: str = "fp32"
    # The streams' last layers learn at this multiple of lr (see Trainer.__init__).
    head_out_lr: float = 1.0

    def __post_init__(self) -> None:
        """Names a bad mode or precision when the schedule is built, before any video
        is decoded, rather than when training starts."""
        if self.mode not in ("alternating", "joint"):
            raise ValueError(f"unknown schedule mode {self.mode!r}; use alternating or joint")
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {self.precision!r}; use {', '.join(AUTOCAST_DTYPES)}")

    def lr_factor(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (from 0) as a multiple of ``lr``."""
        return min(1.0, (epoch + 1) / (self.warmup + 1)) * self.lr_gamma ** (epoch // self.lr_step)


class MSELoss(nn.Module):
    """The DEEP-HAL hallucination loss, with modality masks."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse(pred - target, mask)


def build_hallucination_loss(
    name: str, streams: int, d: int, pattern: str, kappa: float, seed: int
) -> nn.Module | None:
    """The step-(a) loss by name. ``none`` is the control that tells what regressing
    the descriptors is worth: the same streams, HAF and fusion, trained by
    classification only, so a gain over the RGB-only baseline that survives it
    comes from the extra heads, not from hallucination (on the demo it does with
    ``hidden=64``; see README, "Status")."""
    factories: dict[str, Callable[[], nn.Module | None]] = {
        "mse": MSELoss,
        "uncertainty": lambda: UncertaintyLoss(streams, d, pattern=pattern, kappa=kappa, seed=seed),
        "none": lambda: None,
    }
    if name not in factories:
        raise ValueError(f"unknown hallucination loss {name!r}; use {', '.join(factories)}")
    return factories[name]()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    out["clip"] = batch["clip"].to(device, non_blocking=True)
    out["label"] = batch["label"].to(device)
    out["mask"] = batch["mask"].to(device)
    out["gt"] = {k: v.to(device) for k, v in batch["gt"].items()}
    return out


class Trainer:
    def __init__(
        self,
        model: HallucinationNet,
        hal_loss: nn.Module | None,
        schedule: Schedule,
        run_dir: str | Path,
        multilabel: bool = False,
        device: str = "cpu",
        config: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.hal_loss, self.schedule = model, hal_loss, schedule
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.hal_loss is not None:
            self.hal_loss.to(self.device)

        # Fused Adam updates every tensor in one pass where torch has the kernel
        # (CPU and CUDA): the default loops over the tensors in several passes over
        # memory, and the streams' heads hold most of a small backbone's
        # parameters (1.2 of 1.6 million on tiny3d with seven streams), so that
        # loop was a good part of what the streams added to a training step.
        fused = self.device.type in ("cpu", "cuda")

        def adam(params, lr=schedule.lr):
            return torch.optim.Adam(params, lr=lr, weight_decay=schedule.weight_decay, fused=fused)

        loss_params = list(hal_loss.parameters()) if hal_loss is not None else []
        # The heads' last layers feed power normalisation, whose gain at 0 is about 19
        # (AsinhE, γ′ = 100). Adam moves every weight by about lr per step whatever the
        # gradient, so from their zero start a few steps at lr push the streams' outputs
        # into PN's flat tails, where the regression loss is about twice that of
        # predicting 0 (60 against 32 in epoch 1 on fight-detection) and its gradient
        # is small. head_out_lr < 1 slows those layers alone.
        split = model.streams and schedule.head_out_lr != 1.0  # one group, as before, at 1
        slow = model.heads.output_parameters() if split else []
        out = {id(p) for p in slow}

        def groups(params, extra=()):
            """``params`` (and ``extra``) at lr, the heads' last layers apart at head_out_lr·lr."""
            kept = [p for p in params if id(p) not in out]
            both = (
                {"params": kept + list(extra)},
                {"params": slow, "lr": schedule.head_out_lr * schedule.lr},
            )
            return [g for g in both if g["params"]]

        if schedule.mode == "joint":
            self.optimizers = {"cls": adam(groups(model.parameters(), loss_params))}
        else:
            self.optimizers = {"cls": adam(groups(model.parameters()))}
            if model.streams and hal_loss is not None:  # loss=none, the control, has no step (a)
                # Adam's steps do not depend on the loss scale, so alpha weights the
                # hallucination loss through the backbone's learning rate instead.
                self.optimizers["hal"] = adam(
                    [
                        *groups(model.heads.parameters(), loss_params),
                        {"params": list(model.backbone.parameters()), "lr": schedule.alpha * schedule.lr},
                    ]
                )
        self.schedulers = {
            k: torch.optim.lr_scheduler.LambdaLR(o, schedule.lr_factor) for k, o in self.optimizers.items()
        }
        self.amp_dtype = AUTOCAST_DTYPES[schedule.precision]
        if (
            self.amp_dtype is torch.bfloat16
            and self.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise ValueError("this GPU has no bfloat16 support (it predates Ampere); use precision=fp16")
        # A disabled scaler passes the loss and the step through unchanged.
        self.scalers = {
            k: torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
            for k in self.optimizers
        }
        self.classify_loss = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
        self.multilabel = multilabel
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or {}
        self.epoch, self.best = 0, -1.0
        self.log = log
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    # ------------------------------------------------------------ steps

    def autocast(self) -> AbstractContextManager:
        """The precision the forward passes run in; losses are computed outside it, in fp32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _update(self, key: str, loss: torch.Tensor) -> None:
        optimizer, scaler = self.optimizers[key], self.scalers[key]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped, and the scale lowered, when fp16 gradients overflowed
        scaler.update()

    def hallucination_step(self, batch: dict, x_rgb: torch.Tensor | None = None) -> float:
        """(a): regress the ground truth; PredNet and HAF get no gradient here.

        ``x_rgb``: the backbone's output for this batch, when the caller has it.
        """
        model = self.model
        with self.autocast():
            if x_rgb is None:
                x_rgb = model.backbone(batch["clip"])
            if not self.schedule.hal_updates_backbone:
                x_rgb = x_rgb.detach()
            pred = model.hallucinate(x_rgb)
        with torch.no_grad():
            target = model.target(batch["gt"])
        loss = self.hal_loss(pred.float(), target, batch["mask"])  # alpha is in this step's learning rate
        self._update("hal", loss)
        return float(loss.detach())

    def classification_step(self, batch: dict, x_rgb: torch.Tensor | None = None) -> float:
        """(b): classify from RGB through every stream, HAF and PredNet."""
        model = self.model
        with self.autocast():
            if x_rgb is None:
                x_rgb = model.backbone(batch["clip"])
            logits = model.classify(x_rgb, model.hallucinate(x_rgb))
        label = batch["label"].float() if self.multilabel else batch["label"]
        loss = self.classify_loss(logits.float(), label)
        self._update("cls", loss)
        return float(loss.detach())

    def joint_step(self, batch: dict) -> tuple[float, float]:
        """One update of CE + alpha * hallucination loss, sharing one backbone pass."""
        model = self.model
        with self.autocast():
            x_rgb = model.backbone(batch["clip"])
            pred = model.hallucinate(x_rgb)
            logits = model.classify(x_rgb, pred)
        label = batch["label"].float() if self.multilabel else batch["label"]
        cls = self.classify_loss(logits.float(), label)
        with torch.no_grad():
            target = model.target(batch["gt"])
        hal = self.schedule.alpha * self.hal_loss(pred.float(), target, batch["mask"])
        self._update("cls", cls + hal)
        return float(hal.detach()), float(cls.detach())

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One iteration: (hallucination loss, classification loss)."""
        if not (self.model.streams and self.hal_loss is not None):
            return 0.0, self.classification_step(batch)
        if self.schedule.mode == "joint":
            return self.joint_step(batch)
        if self.schedule.hal_updates_backbone:
            return self.hallucination_step(batch), self.classification_step(batch)
        # When step (a) leaves the backbone alone, the backbone's output is the same
        # in both steps, so one pass (kept with its graph for step (b)) serves both:
        # the alternating schedule then costs about what the RGB-only model does,
        # instead of two backbone passes.
        with self.autocast():
            x_rgb = self.model.backbone(batch["clip"])
        return self.hallucination_step(batch, x_rgb), self.classification_step(batch, x_rgb)

    @torch.no_grad()
    def search_beta(self, val: DataLoader) -> tuple[float, dict[str, float]]:
        """Sets the fusion's β to the golden-section minimiser of the validation loss.

        The streams and HAF do not depend on β, so they are computed once and
        only the fusion and PredNet run for each candidate β; the validation
        metrics at the chosen β come from the same cache, so the epoch makes
        one validation pass, not two. Returns (β, validation metrics).
        """
        model = self.model
        model.eval()
        streams, haf, labels = [], [], []
        for batch in val:
            with self.autocast():
                x = model.backbone(batch["clip"].to(self.device))
                streams.append(model.hallucinate(x).float())
                haf.append(model.power_norm(model.haf(x)).float())
            labels.append(batch["label"])
        streams, haf, labels = torch.cat(streams), torch.cat(haf), torch.cat(labels)
        target = (labels.float() if self.multilabel else labels).to(self.device)
        from hallucinate.fusion import golden_section

        def logits(beta: float) -> torch.Tensor:
            model.fuse.beta.fill_(beta)
            return model.prednet(model.fuse(streams, haf))

        best = golden_section(
            lambda beta: float(self.classify_loss(logits(beta), target)), 0.0, self.schedule.beta_high
        )
        return best, classification_metrics(logits(best).cpu(), labels, self.multilabel)

    # ------------------------------------------------------------ loop

    def fit(self, train: DataLoader, val: DataLoader | None = None, progress: bool = True) -> list[dict]:
        history = []
        metrics_file = self.run_dir / "metrics.jsonl"
        for epoch in range(self.epoch, self.schedule.epochs):
            if hasattr(getattr(train, "sampler", None), "set_epoch"):
                train.sampler.set_epoch(epoch)  # the epoch's clips, whether resumed or not
            self.model.train()
            if self.hal_loss is not None:
                self.hal_loss.train()
            t0, hal_sum, cls_sum, n, looped = time.perf_counter(), 0.0, 0.0, 0, 0
            bar = tqdm(
                train,
                desc=f"epoch {epoch + 1}/{self.schedule.epochs}",
                leave=False,
                disable=not progress,
                unit="batch",
            )
            for batch in bar:
                looped += int(batch["looped"].sum()) if "looped" in batch else 0
                batch = to_device(batch, self.device)
                hal, cls = self.train_step(batch)
                if not (math.isfinite(hal) and math.isfinite(cls)):
                    raise self._diverged(epoch + 1, hal, cls)
                hal_sum, cls_sum, n = hal_sum + hal, cls_sum + cls, n + 1
                bar.set_postfix(cls=f"{cls_sum / n:.3f}", hal=f"{hal_sum / n:.3f}")
            for scheduler in self.schedulers.values():
                scheduler.step()
            self.epoch = epoch + 1
            row = {
                "epoch": self.epoch,
                "train_cls_loss": cls_sum / max(n, 1),
                "train_hal_loss": hal_sum / max(n, 1),
                "lr": self.schedulers["cls"].get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
                "looped_clips": looped,
            }
            if val is not None:
                if hasattr(self.model.fuse, "beta") and self.epoch >= self.schedule.beta_warmup:
                    row["beta"], val_metrics = self.search_beta(val)
                else:
                    with self.autocast():
                        val_metrics = evaluate_logits(self.model, val, self.device, self.multilabel)
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, self.epoch)
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            history.append(row)
            score = row.get("val_map", row.get("val_top1", -row["train_cls_loss"]))
            self.save("last.pt")
            if score > self.best:
                self.best = score
                self.save("best.pt")
            self.log(
                f"epoch {self.epoch}: cls {row['train_cls_loss']:.3f} hal {row['train_hal_loss']:.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("val_"))
            )
            if looped and epoch == 0:
                self.log(
                    f"note: {looped} training clip(s) of epoch 1 came from videos shorter than the clip "
                    "at the sampled rate, so they loop (the clip restarts at the video's first frame); "
                    "metrics.jsonl counts them per epoch (looped_clips)"
                )
        if self._writer is not None:
            self._writer.close()
        return history

    def _diverged(self, epoch: int, hal: float, cls: float) -> DivergedError:
        """Why a run stops at a NaN or infinite loss: every later step would train on
        it, and the weights it has reached are garbage, while last.pt still holds
        the previous epoch. A resumed run takes its learning rate from the saved
        optimiser, so a lower one needs a new run; the precision is not saved, so
        going back to fp32 can resume."""
        fresh = f"lower the learning rate (lr={self.schedule.lr}) in a new run (run=...)"
        if self.schedule.precision == "fp32":
            hint = f"{fresh}; a resumed run keeps the saved optimiser's learning rate"
        else:
            cause = (
                "PyTorch's CPU (oneDNN) bfloat16 3-D convolutions have given NaN gradients on small inputs"
                if self.amp_dtype is torch.bfloat16 and self.device.type == "cpu"
                else "activations can overflow"
            )
            hint = (
                f"the same command with precision=fp32 resumes from it ({cause} in "
                f"{self.schedule.precision}); or {fresh}"
            )
        return DivergedError(
            f"epoch {epoch}: the training loss is not finite (hallucination {hal}, classification "
            f"{cls}), so the run stopped. {self.run_dir / 'last.pt'} holds epoch {self.epoch}: {hint}."
        )

    # ------------------------------------------------------------ checkpoints

    def save(self, name: str) -> Path:
        path = self.run_dir / name
        state = {
            "model": self.model.state_dict(),
            "hal_loss": self.hal_loss.state_dict() if self.hal_loss is not None else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            "epoch": self.epoch,
            "best": self.best,
            "rng": rng_state(),
            "schedule": asdict(self.schedule),
            "config": self.config,
            "streams": [(s.name, s.dim) for s in self.model.streams],
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def resume(self, name: str = "last.pt") -> bool:
        path = self.run_dir / name
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        load_model_state(self.model, state["model"], path)
        if self.hal_loss is not None and state["hal_loss"] is not None:
            self.hal_loss.load_state_dict(state["hal_loss"])
        for key, optimizer in self.optimizers.items():
            try:
                optimizer.load_state_dict(state["optimizers"][key])
            except ValueError as err:  # e.g. one tensor per stream head, before StreamHeads
                raise HallucinateError(
                    f"{path}: its optimiser state does not fit this version's model ({err}). "
                    "Its weights still load for `hallucinate evaluate`; to train on, start a new "
                    "run directory (run=...)."
                ) from err
            # Runs written before the warm-up (2026-11-24) saved a StepLR, which has
            # no lr_lambdas; the epoch and the optimiser's lr carry over as they are.
            scheduler = {"lr_lambdas": [None] * len(optimizer.param_groups), **state["schedulers"][key]}
            self.schedulers[key].load_state_dict(scheduler)
            if state.get("scalers", {}).get(key):  # fp16 runs; an fp32 scaler's state is empty
                self.scalers[key].load_state_dict(state["scalers"][key])
        self.epoch, self.best = state["epoch"], state["best"]
        set_rng_state(state["rng"])
        self.log(f"resumed {path} at epoch {self.epoch}")
        return True


@torch.no_grad()
def evaluate_logits(
    model: HallucinationNet, loader: DataLoader, device, multilabel: bool
) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model(batch["clip"].to(device)).float().cpu())
        labels.append(batch["label"])
    return classification_metrics(torch.cat(logits), torch.cat(labels), multilabel)
