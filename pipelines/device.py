"""Which torch device "auto" means, in one place for the CLI, extractors and trainer."""

from __future__ import annotations


def pick_device(device: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU; any other name as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
