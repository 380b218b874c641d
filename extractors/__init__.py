"""Auxiliary descriptor extractors behind one registered interface.

Importing this package registers the built-in extractors; their modules
import only light dependencies at the top, and anything heavy (torch,
librosa, model weights) inside ``setup``/``process``.
"""

from extractors import audio, flow, idt, odf, pose, rgb, saliency  # noqa: F401  (registers audio.*, flow, idt, off.*, odf.*, pose.*, rgb.*, sdf.*)
from extractors.base import (
    AudioSpec,
    AudioTrack,
    Extractor,
    FrameBatch,
    FrameSpec,
    Needs,
    OutputSpec,
    Resources,
    Result,
    VideoInput,
)
from extractors.registry import (
    EXTRACTORS,
    create_extractor,
    default_extractors,
    get_extractor_class,
    list_extractors,
    register,
)

__all__ = [
    "EXTRACTORS",
    "AudioSpec",
    "AudioTrack",
    "Extractor",
    "FrameBatch",
    "FrameSpec",
    "Needs",
    "OutputSpec",
    "Resources",
    "Result",
    "VideoInput",
    "create_extractor",
    "default_extractors",
    "get_extractor_class",
    "list_extractors",
    "register",
]
