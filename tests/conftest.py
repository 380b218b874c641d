import csv
import os
from pathlib import Path

import pytest

import tests.helpers  # noqa: F401  (registers the test extractors)
from pipelines.demo import DemoSpec, generate_demo

TINY_DEMO = DemoSpec(clips_per_class=5, held_out_per_class=0)


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    """A small demo set (6 classes x 5 clips), generated once per test session."""
    data_root = tmp_path_factory.mktemp("data")
    generate_demo(data_root / "demo", TINY_DEMO, workers=2, progress=False)
    return data_root


@pytest.fixture(scope="session")
def deep_options(tmp_path_factory) -> dict[str, dict]:
    """Per-extractor options that load small saved models instead of pretrained weights."""
    from tests.helpers import deep_extractor_options

    return deep_extractor_options(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def demo_copy(tiny_demo_root, tmp_path) -> Path:
    """A private copy of the tiny demo, which a test may add broken files to."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    return root


def add_to_manifest(data_root: Path, files: dict[str, Path], label: str = "ball_bounce") -> None:
    manifest = data_root / "demo" / "annotations" / "manifest.csv"
    with manifest.open("a", newline="") as fh:
        writer = csv.writer(fh)
        for name, path in files.items():
            rel = os.path.relpath(path, data_root / "demo")
            writer.writerow([name, rel, label, "train", "?"])
