"""Loading pretrained weights: a file the user names, or a library's own cache.

Shared by the backbones and every deep extractor, so a missing checkpoint
produces the same clear error everywhere: which model, which path, and how
to fix it. torch is imported inside the functions; the pipeline layer
stays light to import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipelines.errors import ConfigError, MissingWeightsError

T = TypeVar("T")

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


def file_sha256(path: str | Path) -> str:
    """Short sha256 of a weights file, stored with results so a changed checkpoint is visible."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_required_checkpoint(
    model: Any, weights: str | None, what: str, option: str, hint: str, layout: str
) -> str:
    """Loads a user's state-dict checkpoint into ``model``, for nets whose random form is no target.

    ``weights`` unset stops with ``hint`` (where to get the file, set at
    ``option``); ``"random"`` keeps the random weights (tests) and says so
    in the identity; a file that does not fit says it is not ``layout``.
    Returns what to record as the weights' identity (the file's hash, or
    ``"random"``).
    """
    if not weights:
        raise MissingWeightsError(what, option, hint)
    if weights == "random":
        return "random"
    try:
        model.load_state_dict(read_state_dict(weights, what))
    except RuntimeError as exc:
        raise ConfigError(f"{what}: {weights} is not {layout}: {str(exc)[:300]}") from None
    return file_sha256(weights)


def load_torchvision_weights(model: Any, model_name: str, weights: str | None, what: str) -> str:
    """Loads ``weights`` into a torchvision ``model``: a file, a member of the
    model's weights enum (``DEFAULT``, ``COCO_V1``) from torchvision's cache,
    or nothing (``None``: random, for tests). Returns what to record as the
    weights' identity: the file's hash, the enum name, or ``"random"``."""
    if not weights:
        return "random"
    from torchvision.models import get_model_weights

    if looks_like_file(weights):
        state, identity = read_state_dict(weights, what), file_sha256(weights)
    else:
        state = torchvision_state(f"{get_model_weights(model_name).__name__}.{weights}", what)
        identity = weights
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{what}: the weights do not fit the model: {str(exc)[:300]}") from None
    return identity


def torchvision_model(name: str, weights: str | None, what: str, **kwargs: Any) -> tuple[Any, str]:
    """``torchvision.models.get_model(name, weights=None, **kwargs)`` with ``weights`` loaded as
    :func:`load_torchvision_weights` does; a bad architecture argument names ``what``.
    Returns the model and its weights' identity."""
    from torchvision.models import get_model

    try:
        model = get_model(name, weights=None, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return model, load_torchvision_weights(model, name, weights, what)


def create_timm_model(name: str, weights: str | None, what: str, **kwargs: Any) -> Any:
    """``timm.create_model``; ``weights="pretrained"`` fetches timm's default weights
    through the Hugging Face cache (internet once), and a failed download is a
    MissingWeightsError that says to pass a checkpoint file instead. Loading a file
    is the caller's (classifier kept or dropped)."""
    import timm

    try:
        return timm.create_model(name, pretrained=weights == "pretrained", **kwargs)
    except RuntimeError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    except OSError as exc:
        raise MissingWeightsError(
            what, "the Hugging Face cache", f"Download failed ({exc}); pass weights=/path/to/checkpoint."
        ) from None


def build_seeded(build: Callable[[], T], seed: int = 0) -> T:
    """Runs ``build`` (a model constructor) in a forked torch RNG seeded with ``seed``.

    Models whose weights are then not loaded (tests, ``weights=null``) are
    random but the same on every worker and every run, and the caller's RNG
    stream is left untouched.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
