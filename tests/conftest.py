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


@pytest.fixture(scope="session")
def real_set(tmp_path_factory) -> dict[str, Path]:
    """The eight real clips (``../shared/data/real-clips``) as a folder dataset, extracted once.

    <root>/videos/<class>/ holds links to the clips, a splits file fixes the
    splits, and the default set runs as a user would run it (flow kept as
    uint8 so its frame size can be read, person maps kept so they can be
    compared with the skeletons). Skips, with the reason, without the clips.
    """
    from pipelines.cli import main
    from tests.helpers import CLIPS

    if not CLIPS.is_dir():
        pytest.skip(f"the real clips are not at {CLIPS}")
    people = {"kinetics_arm_wrestling", "ava_style_6fps", "people_426x240_2997fps", "mpeg4_mp3_audio"}
    root = tmp_path_factory.mktemp("real")
    rows = ["path,split"]
    for clip in sorted(CLIPS.iterdir()):
        if clip.suffix not in (".mp4", ".avi"):
            continue
        cls = "people" if clip.stem in people else "scene"
        (root / "videos" / cls).mkdir(parents=True, exist_ok=True)
        (root / "videos" / cls / clip.name).symlink_to(clip)
        split = "train" if clip.stem in ("short_32_frames", "kinetics_arm_wrestling") else "val"
        rows.append(f"{cls}/{clip.name},{split}")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")
    definition = root / "real.yaml"
    definition.write_text(f"name: real\nformat: folder\nroot: {root}\nsplits: splits.csv\n")
    store = root / "features"
    args = [f"dataset={definition}", f"out={store}", "workers=0", "progress=false"]
    assert main(["extract", *args, "options.flow.store=uint8", "options.sdf.person.store_maps=64"]) == 0
    return {"root": root, "definition": definition, "store": store, "args": args}
