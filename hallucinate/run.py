"""Training and evaluation runs: the composition behind ``hallucinate train/evaluate``.

Everything here takes plain typed values; the CLI turns YAML and key=value
overrides into them. A run directory holds::

    config.json            the resolved options of the run
    model/                 the hallucination model: best.pt, last.pt, metrics.jsonl, tb/, inference.pt
    baseline/              the RGB-only model with the same backbone and budget
    evaluation.json        the three protocols, the ablation and stream quality
    curves.png, quality.png
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from hallucinate.backbones import create_backbone
from hallucinate.data import ClipDataset, ClipSpec, sample_records
from hallucinate.metrics import classification_metrics, label_r2, stream_quality
from hallucinate.model import FoldedClassifier, FoldedHeads, HallucinationNet, StreamSpec, load_model_state
from hallucinate.power_norm import create_power_norm
from hallucinate.trainer import Schedule, Trainer, build_hallucination_loss, seed_everything, to_device


@dataclass(frozen=True)
class ModelOptions:
    backbone: str = "tiny3d"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    d: int = 128
    copies: int = 1  # multiple sketches per target (MSK)
    hidden: int = 512
    fused_dim: int | None = 2000  # P_tot; None: no sketch on the concatenation
    head: str = "fc"
    power_norm: str = "asinhe"
    power_norm_options: dict[str, float] = field(default_factory=dict)
    loss: str = "mse"  # or "uncertainty"
    pattern: str = "grouped"
    kappa: float = 1.0
    fusion: str = "concat"  # or "weighted_mean" (Eqs. 21-22)

    def build(
        self, streams: list[StreamSpec], num_classes: int, clip: ClipSpec, seed: int
    ) -> HallucinationNet:
        return HallucinationNet(
            create_backbone(self.backbone, **self.backbone_options),
            streams,
            num_classes,
            clip.frames,
            clip.size,
            create_power_norm(self.power_norm, **self.power_norm_options),
            d=self.d,
            copies=self.copies,
            hidden=self.hidden,
            fused_dim=self.fused_dim,
            head=self.head,
            seed=seed,
            fusion=self.fusion,
        )


@dataclass
class Splits:
    train: ClipDataset
    val: ClipDataset
    test: ClipDataset


def _seed_worker(worker_id: int) -> None:
    """Gives each DataLoader worker its own clip sampler.

    Every worker gets a copy of the dataset, random state included, so
    without this they would all draw the same starts, crops and flips. The
    seed torch hands each worker derives from the run's seed, so runs stay
    reproducible for a given number of workers.
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


class SeededOrder(torch.utils.data.Sampler):
    """A training epoch's order, and one random-draw seed per clip, from (seed, epoch) alone.

    Why: each DataLoader worker used to draw clip starts, crops and flips
    from its own copy of the sampler's generator, so the same seed gave other
    clips, and other weights, with another number of workers (and so with
    ``preload``'s choice, which sets it). The draws are made here, in the
    main process, and each item is ``(index, draw)``: the dataset seeds that
    clip's sampling from ``draw``, whichever worker reads it. The trainer
    sets the epoch (``set_epoch``), so a resumed run draws what an
    uninterrupted one would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        draws = rng.integers(0, 2**63 - 1, self.n)
        return iter(zip(order.tolist(), draws.tolist(), strict=True))


def loader(
    ds: ClipDataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Batches of ``ds``; a shuffled (training) loader never ends on a batch of one clip.

    BatchNorm in training mode cannot normalise one value per channel, so
    17 training videos at ``batch_size=16`` stopped every epoch with
    "Expected more than 1 value per channel". Such an epoch drops its last,
    single clip instead; the shuffle makes it a different clip each epoch.
    Evaluation loaders keep every clip (BatchNorm uses its running
    statistics there).
    """
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=SeededOrder(len(ds), seed) if shuffle else None,
        drop_last=shuffle and len(ds) % batch_size == 1,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )


def train_model(
    run_dir: Path,
    splits: Splits,
    streams: list[StreamSpec],
    num_classes: int,
    options: ModelOptions,
    schedule: Schedule,
    clip: ClipSpec,
    batch_size: int,
    seed: int,
    multilabel: bool = False,
    workers: int = 0,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    log=print,
) -> Trainer:
    """Trains one model (the hallucination model, or the baseline when ``streams`` is empty)."""
    seed_everything(seed)
    model = options.build(streams, num_classes, clip, seed)
    loss = None
    if streams:
        train_rows, val_rows = (
            ground_truth_rows(splits.train, seed=seed),
            ground_truth_rows(splits.val, seed=seed),
        )
        model.set_target_statistics(target_statistics(train_rows, streams))
        share = label_r2(targets(model, train_rows), targets(model, val_rows), num_classes)
        log(
            "label R2 of each stream's target (validation; near 0: its ground truth is mostly "
            "not about the classes): "
            + ", ".join(f"{s.name} {r:.2f}" for s, r in zip(streams, share, strict=True))
        )
        if hasattr(model.fuse, "set_prior"):
            prior = fusion_prior(train_rows, val_rows, streams, num_classes)
            log(
                "fusion prior w' (validation accuracy of a linear SVM on each stream's ground truth): "
                + ", ".join(f"{s.name} {p:.2f}" for s, p in zip(streams, prior.tolist(), strict=True))
            )
            model.fuse.set_prior(prior)
        loss = build_hallucination_loss(
            options.loss, len(streams), options.d * options.copies, options.pattern, options.kappa, seed
        )
    config = {
        "model": asdict(options),
        "clip": asdict(clip),
        "seed": seed,
        "streams": [asdict(s) for s in streams],
        "num_classes": num_classes,
        "multilabel": multilabel,
    }
    trainer = Trainer(model, loss, schedule, run_dir, multilabel, device, config, log)
    if resume:
        trainer.resume()
    trainer.fit(
        loader(splits.train, batch_size, workers, shuffle=True, seed=seed),
        loader(splits.val, batch_size, workers),
        progress=progress,
    )
    return trainer


@dataclass(frozen=True)
class GroundTruthRows:
    """The ground truth of some videos of a split, stacked: ``gt`` maps each stream to
    (N, D) (zeros where absent), ``labels`` is (N,) class indices (-1: none) or
    (N, classes) multi-hot, ``mask`` (N, S) says which streams have ground truth."""

    gt: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor


def ground_truth_rows(ds: ClipDataset, max_videos: int = 2000, seed: int = 0) -> GroundTruthRows:
    """The ground truth and labels of at most ``max_videos`` videos (``sample_records``),
    read from the store only: the target statistics, the label R² and the fusion
    prior computed at the start of training all come from it, so the store is
    read once for the three.
    """
    records = sample_records(ds.records, max_videos, seed)
    read = [ds.ground_truth(r) for r in records]
    return GroundTruthRows(
        {s.name: torch.stack([gt[s.name] for gt, _ in read]) for s in ds.streams},
        torch.stack([ds.label(r) for r in records]),
        torch.stack([mask for _, mask in read]),
    )


def target_statistics(
    rows: GroundTruthRows, streams: list[StreamSpec]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-dimension mean and std of each stream's descriptor over the rows that have it
    (``HallucinationNet.target`` standardises with them). From the same sample as
    the label R² and the fusion prior: a mean and a spread need no more than 2,000
    videos, and a second read of every training video's ground truth grew with the
    set (240,000 videos on Kinetics-400) where this does not. A stream with no ground truth in
    the rows gets mean 0 and std 0 (clamped by the model), as before."""
    stats = {}
    for i, stream in enumerate(streams):
        values = rows.gt[stream.name][rows.mask[:, i]]
        if not len(values):
            values = torch.zeros(1, stream.dim)
        stats[stream.name] = (values.mean(0), values.std(0, unbiased=False))
    return stats


@torch.no_grad()
def targets(
    model: HallucinationNet, rows: GroundTruthRows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sketched targets, labels, mask) of ``ground_truth_rows``, as ``label_r2`` takes them."""
    device = next(model.buffers()).device
    true = model.target({s.name: rows.gt[s.name].to(device) for s in model.streams}).cpu()
    return true, rows.labels, rows.mask


def fusion_prior(
    train_rows: GroundTruthRows, val_rows: GroundTruthRows, streams: list[StreamSpec], num_classes: int
) -> torch.Tensor:
    """w′ of Eq. 22: per stream, the validation accuracy of a linear SVM trained on its
    ground-truth descriptor (``ground_truth_rows``: at most 2,000 training videos, as
    the paper used "a subset"). A stream that cannot be scored gets chance level,
    as does every stream of multi-label data."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    def xy(rows: GroundTruthRows, i: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        single = rows.labels.ndim == 1
        keep = rows.mask[:, i] & (rows.labels >= 0) if single else torch.zeros_like(rows.mask[:, i])
        return rows.gt[name][keep].numpy(), rows.labels[keep].numpy()

    chance = 1.0 / max(num_classes, 1)
    prior = []
    for i, stream in enumerate(streams):
        (xt, yt), (xv, yv) = xy(train_rows, i, stream.name), xy(val_rows, i, stream.name)
        if len(set(yt.tolist())) < 2 or not len(yv):
            prior.append(chance)
            continue
        scaler = StandardScaler().fit(xt)
        svm = LinearSVC(C=0.1, max_iter=5000).fit(scaler.transform(xt), yt)
        prior.append(float(svm.score(scaler.transform(xv), yv)))
    return torch.tensor(prior)


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The config a checkpoint was trained with; memory-mapped, so the weights are not read."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"]


def load_model(run_dir: Path, name: str = "best.pt", device: str = "cpu") -> HallucinationNet:
    state = torch.load(run_dir / name, map_location=device, weights_only=False)
    cfg = state["config"]
    options = ModelOptions(**cfg["model"])
    streams = [StreamSpec(**s) for s in cfg["streams"]]
    model = options.build(streams, cfg["num_classes"], ClipSpec(**cfg["clip"]), cfg["seed"])
    load_model_state(model, state["model"], run_dir / name)
    return model.to(device).eval()


class InferenceModel(torch.nn.Module):
    """RGB clip in, logits out: what is deployed (no extractor, no ground truth).

    What follows the backbone runs folded where it can: the stream heads and
    HAF as ``FoldedHeads`` (fc heads of one output size, the default), the
    fusion and PredNet as one affine map (``FoldedClassifier``, any fusion
    that is linear once trained; both of ours are). Otherwise those parts run
    as trained. Built from a trained model in eval mode, since folding copies
    the weights and BatchNorm's running statistics; only the parts that run
    are kept, so an export does not carry the trained heads next to their
    folded copy.
    """

    def __init__(self, model: HallucinationNet) -> None:
        super().__init__()
        self.backbone, self.power_norm = model.backbone, model.power_norm
        self.folded = self.classifier = None
        try:
            self.folded = FoldedHeads(
                [*(model.heads.unstack() if model.heads is not None else []), model.haf]
            )
        except ValueError:  # conv heads, or HAF of another size (MSK with concat)
            self.model = model
        try:
            self.classifier = FoldedClassifier(
                model.fuse, model.prednet, len(model.streams), model.d * model.copies, model.haf.out_dim
            )
        except ValueError:
            self.fuse, self.prednet = model.fuse, model.prednet

    def tail(self, x_rgb: torch.Tensor) -> torch.Tensor:
        """Logits from X_rgb: what hallucination adds to the backbone."""
        if self.folded is not None:
            out = self.power_norm(self.folded(x_rgb))
            streams, haf = out[:, :-1], out[:, -1]
        else:
            streams, haf = self.model.hallucinate(x_rgb), self.power_norm(self.model.haf(x_rgb))
        if self.classifier is not None:
            return self.classifier(torch.cat([streams.flatten(1), haf], 1))
        return self.prednet(self.fuse(streams, haf))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.tail(self.backbone(clip))


@contextlib.contextmanager
def _quiet_torchscript_deprecation():
    """torch 2.14 flags ``torch.jit.trace`` and the TorchScript-based ONNX exporter as
    deprecated. They are the formats chosen on purpose (a file that loads without
    Python code or onnxscript), the files they write are unaffected, and the notices
    at the end of every ``make train`` were noise a user had to read past."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def export_torchscript(model: HallucinationNet, clip: ClipSpec, path: Path) -> Path:
    """Traces the RGB-only inference model and checks it against eager mode."""
    wrapper = InferenceModel(model).eval()
    example = model.backbone.example_input(2, clip.frames, clip.size)
    with torch.no_grad(), _quiet_torchscript_deprecation():
        traced = torch.jit.trace(wrapper, example)
        torch.testing.assert_close(traced(example), model.eval()(example), rtol=1e-4, atol=1e-5)
    traced.save(str(path))
    return path


def export_onnx(model: HallucinationNet, clip: ClipSpec, path: Path) -> Path:
    """Exports the RGB-only inference model to ONNX (batch axis dynamic) and checks
    onnxruntime's logits against eager mode, so a deployment never gets a model that
    silently disagrees with the one that was evaluated."""
    import onnxruntime

    # ONNX has had Asinh (AsinhE's op) since opset 9; the TorchScript-based
    # exporter just lacks the mapping.
    torch.onnx.register_custom_op_symbolic("aten::asinh", lambda g, x: g.op("Asinh", x), 9)
    # The wrapper itself in eval mode: the exporter restores the wrapper's mode
    # afterwards, recursively, which would put a train-mode wrapper's model
    # (BatchNorm) into training mode for the check below.
    wrapper = InferenceModel(model).eval()
    example = model.backbone.example_input(2, clip.frames, clip.size)
    with torch.no_grad(), _quiet_torchscript_deprecation():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency
            input_names=["clip"],
            output_names=["logits"],
            dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}},
        )
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check = model.backbone.example_input(3, clip.frames, clip.size)
        got = torch.from_numpy(session.run(None, {"clip": check.numpy()})[0])
        torch.testing.assert_close(got, model.eval()(check), rtol=1e-3, atol=1e-4)
    return path


EXPORTERS = {"torchscript": (export_torchscript, "inference.pt"), "onnx": (export_onnx, "inference.onnx")}


@torch.no_grad()
def collect(model: HallucinationNet, ds: ClipDataset, batch_size: int, device: str = "cpu") -> dict:
    """Backbone features, hallucinated streams, sketched ground truth, masks and labels of a split."""
    model.eval()
    out: dict[str, list] = {"x": [], "hal": [], "true": [], "mask": [], "label": []}
    for batch in loader(ds, batch_size, 0):
        batch = to_device(batch, torch.device(device))
        x = model.backbone(batch["clip"])
        out["x"].append(x)
        out["hal"].append(model.hallucinate(x))
        out["true"].append(model.target(batch["gt"]) if model.streams else model.hallucinate(x))
        out["mask"].append(batch["mask"])
        out["label"].append(batch["label"])
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def evaluate_run(
    run_dir: Path, splits: Splits, batch_size: int, multilabel: bool, device: str = "cpu"
) -> dict[str, Any]:
    """The three protocols, the per-stream ablation and hallucination quality."""
    model = load_model(run_dir / "model", device=device)
    test, train = (
        collect(model, splits.test, batch_size, device),
        collect(model, splits.train, batch_size, device),
    )

    def score(streams: torch.Tensor) -> dict[str, float]:
        return classification_metrics(
            model.classify(test["x"], streams).cpu(), test["label"].cpu(), multilabel
        )

    m = test["mask"][..., None].float()
    loss = checkpoint_config(run_dir / "model" / "best.pt")["model"].get("loss", "mse")
    report: dict[str, Any] = {"streams": model.stream_names, "loss": loss, "protocols": {}}
    if (run_dir / "baseline" / "best.pt").is_file():
        baseline = load_model(run_dir / "baseline", device=device)
        base = collect(baseline, splits.test, batch_size, device)
        logits = baseline.classify(base["x"], base["hal"])
        report["protocols"]["rgb_only"] = classification_metrics(
            logits.cpu(), base["label"].cpu(), multilabel
        )
    report["protocols"]["hallucinated"] = score(test["hal"])
    report["protocols"]["oracle"] = score(m * test["true"] + (1 - m) * test["hal"])
    train_mean = train["hal"].mean(0, keepdim=True)
    report["drop_one"] = {}
    for i, name in enumerate(model.stream_names):
        dropped = test["hal"].clone()
        dropped[:, i] = train_mean[:, i]  # the stream carries no information about the clip
        report["drop_one"][name] = score(dropped)
    report["label_r2"] = dict(
        zip(
            model.stream_names,
            label_r2(
                tuple(train[k].cpu() for k in ("true", "label", "mask")),
                tuple(test[k].cpu() for k in ("true", "label", "mask")),
                model.prednet[-1].out_features,
            ),
            strict=True,
        )
    )
    report["quality"] = {
        split: dict(
            zip(
                model.stream_names,
                stream_quality(d["hal"].cpu(), d["true"].cpu(), d["mask"].cpu()),
                strict=True,
            )
        )
        for split, d in (("train", train), ("test", test))
    }
    (run_dir / "evaluation.json").write_text(json.dumps(report, indent=1))
    plot_run(run_dir, report)
    return report


def plot_run(run_dir: Path, report: dict[str, Any]) -> None:
    """curves.png (loss and validation accuracy per epoch) and quality.png (R² per stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("model", "baseline"):
        path = run_dir / name / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["train_cls_loss"] for r in rows], label=f"{name} cls loss")
        if rows and "train_hal_loss" in rows[0] and name == "model":
            axes[0].plot(epochs, [r["train_hal_loss"] for r in rows], label="hallucination loss")
        key = "val_map" if "val_map" in rows[0] else "val_top1"
        axes[1].plot(epochs, [r.get(key, np.nan) for r in rows], label=name)
    axes[0].set_xlabel("epoch"), axes[0].legend()
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel("validation accuracy"), axes[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
    names = report["streams"]
    if names:
        fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(names)), 3.5))
        x = np.arange(len(names))
        for k, split in enumerate(("train", "test")):
            ax.bar(x + 0.4 * k, [report["quality"][split][n]["r2"] for n in names], 0.4, label=split)
        ax.set_xticks(x + 0.2, [n.replace("/", "\n") for n in names], fontsize=7)
        ax.set_ylabel("R² (hallucinated vs ground truth)"), ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "quality.png", dpi=100)
        plt.close(fig)
