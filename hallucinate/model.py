"""The hallucination network (METHOD.md §1.2-1.4).

RGB clip -> backbone -> X_rgb (B, C, T′) -> one head per auxiliary stream
plus HAF -> power normalisation -> concatenation -> fixed count sketch P_tot
-> PredNet (BatchNorm + FC). Each stream head regresses its descriptor's
ground truth after the same power normalisation and a fixed count sketch
(``target``), and at test time only RGB goes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hallucinate.backbones import Backbone
from hallucinate.fusion import FUSIONS
from hallucinate.sketch import MultiSketch
from pipelines.errors import HallucinateError


@dataclass(frozen=True)
class StreamSpec:
    """One hallucinated descriptor: its name in the shards and its raw size."""

    name: str  # "<extractor>/<output>"
    dim: int


class StreamHead(nn.Module):
    """The per-stream head template (METHOD.md §1.2).

    ``fc``: the I3D template, a layer covering all temporal positions at once
    (conv2d with a kernel over the T′ positions, i.e. an FC over C·T′), ReLU,
    then FC to d. ``conv``: the DEEP-HAL conv head, two temporal convolutions
    then FC, for ablations. Power normalisation is applied by the model.

    Each hidden layer is followed by BatchNorm before its ReLU (our addition to
    the templates). X_rgb comes out of a ReLU, so it is non-negative with a
    large mean; one Adam step moves every weight of a unit by about the
    learning rate, which shifts its pre-activation by lr·Σx for every clip at
    once, and a unit pushed below zero on all clips never gets a gradient
    again. Without the BatchNorm, after make demo's training 60% of the
    baseline's HAF units and 98-100% of every stream head's units were dead:
    the heads output a constant and hallucinated nothing.
    """

    def __init__(self, channels: int, frames: int, d: int, hidden: int, kind: str = "fc") -> None:
        super().__init__()
        if kind == "fc":
            self.body = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * frames, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Linear(hidden, d),
            )
        elif kind == "conv":
            self.body = nn.Sequential(
                nn.Conv1d(channels, hidden, min(3, frames), padding="same", bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Conv1d(hidden, hidden, min(3, frames), padding="same", bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(hidden * frames, d),
            )
        else:
            raise ValueError(f"unknown head kind {kind!r}; use fc or conv")
        # The last layer starts at zero, so a head starts by predicting g(0) = 0
        # rather than noise. From a random start the cheapest way to cut the
        # regression loss is to silence the noise by driving every hidden ReLU
        # negative, after which the head can only ever output a constant: on
        # the demo every stream head died that way within an epoch.
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def foldable(self) -> bool:
        return isinstance(self.body[1], nn.Linear)

    @property
    def out_dim(self) -> int:
        return self.body[-1].out_features


# How one ``StreamHead``'s tensors sit in ``StreamHeads``: stacked name -> (the
# head's name, how): "cat" concatenates the heads' rows (a first layer or a
# BatchNorm of S·hidden units), "t" stacks the transposed last layers for
# ``baddbmm``, "row" stacks the biases, "same" is a counter all heads share.
_BN = ("weight", "bias", "running_mean", "running_var")
_LAYOUTS = {
    "fc": {
        "first.weight": ("body.1.weight", "cat"),
        **{f"norm.{k}": (f"body.2.{k}", "cat") for k in _BN},
        "norm.num_batches_tracked": ("body.2.num_batches_tracked", "same"),
        "last": ("body.4.weight", "t"),
        "bias": ("body.4.bias", "row"),
    },
    "conv": {
        "first.weight": ("body.0.weight", "cat"),
        **{f"norm.{k}": (f"body.1.{k}", "cat") for k in _BN},
        "norm.num_batches_tracked": ("body.1.num_batches_tracked", "same"),
        "second.weight": ("body.3.weight", "cat"),
        **{f"norm2.{k}": (f"body.4.{k}", "cat") for k in _BN},
        "norm2.num_batches_tracked": ("body.4.num_batches_tracked", "same"),
        "last": ("body.7.weight", "t"),
        "bias": ("body.7.bias", "row"),
    },
}


# how -> (stack S heads' tensors, split the stacked tensor back into S)
_HOW = {
    "cat": (torch.cat, lambda v, n: v.chunk(n)),
    "t": (lambda parts: torch.stack([p.t() for p in parts]), lambda v, n: [p.t() for p in v.unbind()]),
    "row": (lambda parts: torch.stack(parts)[:, None], lambda v, n: v[:, 0].unbind()),
    "same": (lambda parts: parts[0], lambda v, n: [v] * n),
}


class StreamHeads(nn.Module):
    """Every stream's head, the same template S times, stored stacked: (B, C, T′) -> (B, S, d).

    The same function as S ``StreamHead`` modules (BatchNorm normalises each
    unit on its own, so one BatchNorm over S·hidden units is S of them), built
    from S of them so that it starts from the very weights they would. What
    stacking buys is training speed: the first layers become one product, the
    conv template's second layers one grouped convolution, and the last layers
    one ``baddbmm``, forward and backward, where S separate heads make S times
    as many small calls and give Adam five tensors each. On tiny3d with seven
    streams the heads' forward and backward took 1.3 ms instead of 2.3, and
    the tail as trained (heads, fusion, PredNet) 1.0-1.1 ms instead of 1.6
    (``benchmarks/bench_training.py``).

    ``keys``: the streams, in order; checkpoints written before the heads were
    stacked (one ``heads.<key>.body.*`` per stream) are converted on load.
    """

    def __init__(
        self, keys: list[str], channels: int, frames: int, d: int, hidden: int, kind: str = "fc"
    ) -> None:
        super().__init__()
        self.keys, self.kind = list(keys), kind
        self._template = (channels, frames, d, hidden, kind)
        heads = [StreamHead(*self._template) for _ in self.keys]
        s, k = len(heads), min(3, frames)
        if kind == "fc":
            self.first = nn.Linear(channels * frames, s * hidden, bias=False)
        else:
            self.first = nn.Conv1d(channels, s * hidden, k, padding="same", bias=False)
            self.second = nn.Conv1d(s * hidden, s * hidden, k, padding="same", groups=s, bias=False)
            self.norm2 = nn.BatchNorm1d(s * hidden)
        self.norm = nn.BatchNorm1d(s * hidden)
        fan_in = hidden * (frames if kind == "conv" else 1)
        self.last = nn.Parameter(torch.empty(s, fan_in, d))
        self.bias = nn.Parameter(torch.empty(s, 1, d))
        self.load_state_dict(_stack_heads([h.state_dict() for h in heads], kind))
        self._register_load_state_dict_pre_hook(self._convert_per_head_checkpoint)

    def output_parameters(self) -> list[nn.Parameter]:
        """The last layer's weights and biases (``Schedule.head_out_lr``)."""
        return [self.last, self.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b = len(self.keys), x.shape[0]
        if self.kind == "fc":
            hidden = torch.relu(self.norm(self.first(x.flatten(1))))
        else:
            hidden = torch.relu(self.norm2(self.second(torch.relu(self.norm(self.first(x))))))
        hidden = hidden.reshape(b, s, -1).transpose(0, 1)  # (S, B, hidden[·T′])
        return torch.baddbmm(self.bias, hidden, self.last).transpose(0, 1)

    def unstack(self) -> list[StreamHead]:
        """Copies of the heads as separate ``StreamHead`` modules, in the order of ``keys``
        and in this module's mode (what ``FoldedHeads`` and the tests take)."""
        heads = [StreamHead(*self._template) for _ in self.keys]
        for head, state in zip(heads, _unstack_heads(self.state_dict(), len(heads), self.kind), strict=True):
            head.load_state_dict(state)
            head.train(self.training)
        return heads

    @property
    def out_dim(self) -> int:
        return self.last.shape[-1]

    def _convert_per_head_checkpoint(self, state, prefix, *args) -> None:
        if f"{prefix}last" in state or not any(k.startswith(f"{prefix}{self.keys[0]}.") for k in state):
            return
        old = {key: [k for k in state if k.startswith(f"{prefix}{key}.")] for key in self.keys}
        per_head = [{k[len(prefix + key) + 1 :]: state[k] for k in names} for key, names in old.items()]
        try:
            stacked = _stack_heads(per_head, self.kind)
        except KeyError:  # another layout still: load_state_dict names what is missing
            return
        for names in old.values():
            for k in names:
                del state[k]
        state.update({prefix + k: v for k, v in stacked.items()})


def _stack_heads(states: list[dict], kind: str) -> dict:
    return {
        name: _HOW[how][0]([st[source] for st in states]) for name, (source, how) in _LAYOUTS[kind].items()
    }


def _unstack_heads(state: dict, count: int, kind: str) -> list[dict]:
    out = [{} for _ in range(count)]
    for name, (source, how) in _LAYOUTS[kind].items():
        for head, value in zip(out, _HOW[how][1](state[name], count), strict=True):
            head[source] = value
    return out


class FoldedHeads(nn.Module):
    """Eval-mode ``fc`` heads over one X_rgb as two batched products: what is deployed.

    On a small backbone the heads are a visible share of inference: seven
    streams and HAF are 8 × (linear, BatchNorm, ReLU, linear), 32 small calls
    whose weights (about 5 MB) the backbone has pushed out of cache. Folding
    each BatchNorm's running statistics into the linear before it (as
    deployment tools fold conv+BN) and stacking the heads makes them one
    ``addmm`` for every first layer and one ``baddbmm`` for every last one:
    the same function up to float rounding, and on tiny3d a tail of 0.9-1.0
    ms instead of 1.4-1.7 (``benchmarks/bench_training.py``). Since the stream
    heads train stacked (``StreamHeads``) the tail as trained takes 1.0-1.1 ms,
    and folded 0.7: folding still saves the BatchNorms and HAF's separate
    calls. The weights are copied, so this is built from a trained model,
    after training. Outputs (B, heads, d), in the order of ``heads``.
    """

    def __init__(self, heads: list[StreamHead]) -> None:
        super().__init__()
        if not heads or not all(h.foldable for h in heads):
            raise ValueError("only fc heads fold; conv heads run as they are")
        if len({h.out_dim for h in heads}) > 1:
            raise ValueError("heads of different output sizes do not stack")
        firsts, shifts, lasts, biases = [], [], [], []
        with torch.no_grad():
            for head in heads:
                _, first, norm, _, last = head.body
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                firsts.append(first.weight * scale[:, None])
                shifts.append(norm.bias - norm.running_mean * scale)
                lasts.append(last.weight.t())
                biases.append(last.bias[None])
            self.register_buffer("first", torch.cat(firsts).t().contiguous())  # (C·T′, heads·hidden)
            self.register_buffer("shift", torch.cat(shifts))
            self.register_buffer("last", torch.stack(lasts).contiguous())  # (heads, hidden, d)
            self.register_buffer("bias", torch.stack(biases))  # (heads, 1, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.addmm(self.shift, x.flatten(1), self.first))
        hidden = hidden.view(x.shape[0], *self.last.shape[:2]).transpose(0, 1)  # (heads, B, hidden)
        return torch.baddbmm(self.bias, hidden, self.last).transpose(0, 1)


class FoldedClassifier(nn.Module):
    """Eval-mode fusion + PredNet as one affine map of the power-normalised outputs.

    Both fusions are linear once trained: concatenation and the fixed sketch
    P_tot, or the weighted mean, whose weights depend only on the prior and β,
    both buffers. PredNet's BatchNorm uses running statistics. So the
    deployed model can replace a dozen small calls (the weighted mean's loop
    over families, its softmaxes, BatchNorm, Linear) with one ``addmm``: the
    map is read off by passing the zero vector and the unit vectors through
    the trained modules, so it holds for any linear fusion without knowing its
    formula. A fusion that is not affine is refused (the check on random
    inputs), and the deployed model then runs the fusion as trained.

    The dense map has (S·D + D_haf) × classes entries, where the sketch is a
    list of indices: at the paper's size (7 streams of d = 1000 × 8 copies,
    400 classes) that is 23 million, larger and slower than what it replaces,
    so above ``max_entries`` nothing is folded.

    Input: the streams' outputs then HAF's, flattened, (B, S·D + D_haf).
    """

    def __init__(
        self,
        fuse: nn.Module,
        prednet: nn.Module,
        streams: int,
        dim: int,
        haf_dim: int,
        max_entries: int = 1 << 22,
        chunk: int = 1024,
    ) -> None:
        super().__init__()
        if fuse.training or prednet.training:
            raise ValueError("fold a trained model in eval mode: BatchNorm's running statistics are folded")
        width = streams * dim

        def apply(z: torch.Tensor) -> torch.Tensor:
            return prednet(fuse(z[:, :width].reshape(len(z), streams, dim), z[:, width:]))

        with torch.no_grad():
            n = width + haf_dim
            offset = apply(torch.zeros(1, n))
            if n * offset.shape[1] > max_entries:
                raise ValueError(f"a dense {n} × {offset.shape[1]} map would outweigh the fusion it replaces")
            units = [  # row i: the logits' response to input i, a chunk of unit vectors at a time
                apply(nn.functional.one_hot(torch.arange(i, min(i + chunk, n)), n).float())
                for i in range(0, n, chunk)
            ]
            matrix = torch.cat(units) - offset
            probe = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
            if not torch.allclose(probe @ matrix + offset, apply(probe), rtol=1e-3, atol=1e-4):
                raise ValueError(f"{type(fuse).__name__} is not affine in eval mode; it runs as trained")
        self.register_buffer("matrix", matrix.contiguous())
        self.register_buffer("offset", offset)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.offset, z, self.matrix)


class HallucinationNet(nn.Module):
    """Backbone + hallucination streams + HAF + fusion + PredNet.

    With no streams this is the RGB-only baseline of the same backbone: HAF
    and PredNet only, the same budget otherwise.
    """

    def __init__(
        self,
        backbone: Backbone,
        streams: list[StreamSpec],
        num_classes: int,
        frames: int,
        size: int,
        power_norm: nn.Module,
        d: int = 128,
        copies: int = 1,
        hidden: int = 512,
        fused_dim: int | None = 2000,
        head: str = "fc",
        seed: int = 0,
        fusion: str = "concat",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.streams = list(streams)
        self.d, self.copies = d, copies
        channels, t_out = backbone.output_shape(frames, size)
        self.heads = (
            StreamHeads([_key(s.name) for s in streams], channels, t_out, d * copies, hidden, head)
            if streams
            else None
        )
        fusion_cls = FUSIONS.get(fusion)
        haf_dim = d * copies if fusion_cls.equal_sizes else d  # a mean needs HAF of the streams' size
        self.haf = StreamHead(channels, t_out, haf_dim, hidden, head)
        self.power_norm = power_norm
        self.targets = nn.ModuleDict(
            {_key(s.name): MultiSketch(s.dim, d, copies, seed + 17 * i + 1) for i, s in enumerate(streams)}
        )
        for s in streams:  # training-set statistics of each descriptor; see ``target``
            self.register_buffer(f"gt_mean__{_key(s.name)}", torch.zeros(s.dim))
            self.register_buffer(f"gt_std__{_key(s.name)}", torch.ones(s.dim))
        self.fuse = fusion_cls([s.name for s in streams], d * copies, haf_dim, fused_dim, seed)
        width = self.fuse.out_dim
        self.prednet = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, num_classes))

    @property
    def stream_names(self) -> list[str]:
        return [s.name for s in self.streams]

    def hallucinate(self, x_rgb: torch.Tensor) -> torch.Tensor:
        """Stacked, power-normalised stream outputs (B, S, d·copies)."""
        if not self.streams:
            return x_rgb.new_zeros(x_rgb.shape[0], 0, self.d * self.copies)
        return self.power_norm(self.heads(x_rgb))

    def set_target_statistics(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-dimension mean and std of each descriptor over the training set (a sample of
        at most 2,000 videos on large sets: ``hallucinate.run.target_statistics``)."""
        for name, (mean, std) in stats.items():
            getattr(self, f"gt_mean__{_key(name)}").copy_(mean)
            getattr(self, f"gt_std__{_key(name)}").copy_(robust_scale(mean, std))

    def target(self, gt: dict[str, torch.Tensor]) -> torch.Tensor:
        """Ground truth in the streams' space: standardise, ℓ2-normalise, PN, then sketch.

        The paper's descriptors arrive ℓ1/ℓ2-normalised (BoW, FV, ODF means);
        raw ones such as log-mel statistics in dB do not, and after PN every
        coordinate would saturate, giving sketched targets far outside what a
        power-normalised stream output can reach. Standardising with
        training-set statistics (buffers, so the oracle and exported model use
        the same; ``robust_scale`` for coordinates that barely vary) and
        ℓ2-normalising puts every family on the paper's footing.
        """
        out = []
        for s in self.streams:
            k = _key(s.name)
            z = (gt[s.name] - getattr(self, f"gt_mean__{k}")) / getattr(self, f"gt_std__{k}")
            z = z.clamp(-Z_CLIP, Z_CLIP)  # see robust_scale
            z = z / (z.norm(dim=-1, keepdim=True) + 1e-8)
            g = self.power_norm(z)
            # A count sketch keeps the norm, and ‖g(z)‖ grows with the descriptor's
            # size (~0.24·√D for AsinhE): an 8,000-d ODF would ask a d-dim PN'd
            # stream for coordinates it cannot reach. Rescaling g(z), a per-video
            # scalar that keeps the sketch linear, fixes the target's RMS at
            # TARGET_RMS per coordinate whatever D is.
            g = g * (TARGET_RMS * math.sqrt(self.d) / (g.norm(dim=-1, keepdim=True) + 1e-8))
            out.append(self.targets[k](g))
        return torch.stack(out, 1)

    def classify(self, x_rgb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        return self.prednet(self.fuse(streams, self.power_norm(self.haf(x_rgb))))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """RGB only in, class logits out: the test-time model."""
        x_rgb = self.backbone(clip)
        return self.classify(x_rgb, self.hallucinate(x_rgb))

    def oracle(self, clip: torch.Tensor, gt: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Logits with ground truth in place of the hallucinated streams (where it exists)."""
        x_rgb = self.backbone(clip)
        hal = self.hallucinate(x_rgb)
        true = self.target(gt)
        m = mask[..., None].to(hal.dtype)
        return self.classify(x_rgb, m * true + (1 - m) * hal)


# Standardised target coordinates are clipped here: 10 standard deviations is far in the tail
# of anything the training set showed (see robust_scale).
Z_CLIP = 10.0
# A coordinate's spread is floored at this share of the stream's median spread.
SCALE_FLOOR = 0.1


def robust_scale(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The divisor that standardises a descriptor: its training-set std, made safe for held-out videos.

    Why: sparse real descriptors have coordinates that never (or once) vary
    over the training videos: a detector class slot no training clip showed,
    a hand seen in one video. With the std clamped at 1e-6, a held-out video
    with a value there got z up to 9e5 (odf.hands on the fight-detection set),
    so after l2-normalisation its target was a one-coordinate spike that no
    head can predict: half the held-out hands targets had over half their
    energy in one coordinate, and the test R² and oracle were meaningless.
    Now a constant coordinate (std within rounding of 0) gets an infinite
    divisor, so z = 0 there: the training set taught nothing about it. Every
    other std is floored at ``SCALE_FLOOR`` times the stream's median std,
    and ``target`` clips z at ``Z_CLIP``; together they keep held-out targets
    shaped like the training ones (largest coordinate 2-5% of the energy).
    """
    constant = std <= 1e-6 * (1 + mean.abs())
    if bool(constant.all()):
        return torch.full_like(std, math.inf)
    floor = SCALE_FLOOR * std[~constant].median()
    return torch.where(constant, torch.full_like(std, math.inf), std.clamp(min=float(floor)))


# Root-mean-square of a sketched target coordinate: well inside what a
# power-normalised stream output reaches (AsinhE(γ′=100) gives 0.5 at x ≈ 0.07).
TARGET_RMS = 0.5


def load_model_state(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict`` that names the checkpoint and the fix when the layout
    differs, e.g. a run written before the heads got BatchNorm (2026-11-23)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise HallucinateError(
            f"{path}: the checkpoint does not fit this version's model ({str(err).splitlines()[0]}). "
            "It was probably written by an older Hallucinate; train again into a new run "
            "directory (run=...), or evaluate it with the version that wrote it."
        ) from err


def _key(name: str) -> str:
    """ModuleDict keys may not contain dots."""
    return name.replace(".", "__").replace("/", "--")
