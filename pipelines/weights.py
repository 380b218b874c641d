"""Loading pretrained weights: a file the user names, or a library's own cache.

Shared by the backbones and every deep extractor, so a missing checkpoint
produces the same clear error everywhere: which model, which path, and how
to fix it. torch is imported inside the functions; the pipeline layer
stays light to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError, MissingWeightsError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl")


def looks_like_file(weights: str) -> bool:
    """A path (``/x/y.pth``) rather than a weights name (``KINETICS400_V1``)."""
    return Path(weights).suffix in WEIGHT_SUFFIXES or "/" in weights or Path(weights).exists()


def read_state_dict(path: str | Path, what: str) -> dict[str, Any]:
    """A state dict from a file that holds one, or a checkpoint holding one under a common key."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            what,
            path,
            "Download the checkpoint there, or set weights=... to where it is (or "
            "weights=null for random initialisation).",
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in obj.items()}


def torchvision_state(enum_name: str, what: str) -> dict[str, Any]:
    """The state dict of torchvision weights ``Enum.MEMBER``, from torchvision's cache.

    Downloads once when there is internet; offline and not cached, the error
    names the file to copy and the folder to copy it to.
    """
    import torch
    from torchvision.models import get_weight

    try:
        weights = get_weight(enum_name)
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(f"{what}: no torchvision weights named {enum_name}") from None
    try:
        return weights.get_state_dict(progress=True)
    except OSError as exc:  # offline and not cached
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise MissingWeightsError(
            what,
            cache,
            f"It could not be downloaded ({exc}). Copy {Path(weights.url).name} "
            f"into {cache.parent}, or pass weights=/path/to/the/file.pth.",
        ) from None
