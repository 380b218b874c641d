"""Classification and hallucination-quality metrics."""

from __future__ import annotations

import numpy as np
import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """top-1, top-5 and mean class accuracy; mAP (macro, over classes with positives) if multi-label."""
    if multilabel:
        from sklearn.metrics import average_precision_score

        y, s = labels.numpy(), logits.float().numpy()
        present = y.sum(0) > 0
        return {"map": float(average_precision_score(y[:, present], s[:, present], average="macro"))}
    pred = logits.argmax(1)
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean()
    per_class = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return {
        "top1": float((pred == labels).float().mean()),
        "top5": float(top5),
        "mean_class_acc": float(np.mean(per_class)),
    }


def stream_quality(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[dict[str, float]]:
    """Per stream: R² (1 − SSE/SST over all coordinates) and mean cosine similarity,
    on the samples that have ground truth."""
    out = []
    for i in range(pred.shape[1]):
        keep = mask[:, i]
        p, t = pred[keep, i].double(), target[keep, i].double()
        if len(t) < 2:
            out.append({"r2": float("nan"), "cosine": float("nan"), "n": int(len(t))})
            continue
        sse = (p - t).pow(2).sum()
        sst = (t - t.mean(0)).pow(2).sum()
        cos = torch.nn.functional.cosine_similarity(p, t, dim=1).mean()
        out.append({"r2": float(1 - sse / sst), "cosine": float(cos), "n": int(len(t))})
    return out
