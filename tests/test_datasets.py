import dataclasses
import json
from collections import Counter

import pytest

from pipelines.datasets import (
    DatasetDef,
    VideoRecord,
    known_datasets,
    load_dataset,
    load_definition,
    resolve_paths,
    split_counts,
)
from pipelines.errors import ConfigError, DatasetError


def _defn(tmp_path, **kw) -> tuple[DatasetDef, object]:
    defn = DatasetDef(name="t", root=str(tmp_path), **kw)
    paths = resolve_paths(defn, tmp_path)
    paths.videos.mkdir(parents=True, exist_ok=True)
    paths.annotations.mkdir(parents=True, exist_ok=True)
    return defn, paths


def test_every_definition_in_data_loads():
    expected = {"k400", "k600", "ssv2", "ucf101", "hmdb51", "charades", "demo", "folder"}
    assert expected <= set(known_datasets())
    for name in known_datasets():
        defn = load_definition(name)
        assert defn.name == name and defn.format


def test_definition_overrides_are_validated():
    assert load_definition("ucf101", {"split_number": 3}).split_number == 3
    with pytest.raises(ConfigError, match="split_numbr"):
        load_definition("ucf101", {"split_numbr": 3})


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ConfigError, match="k400.*ssv2|ssv2.*k400"):
        load_definition("kinetics9000")


def test_missing_video_root_names_it_and_the_fix(tmp_path):
    defn = load_definition("k400")
    paths = resolve_paths(defn, tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(defn, paths)
    msg = str(info.value)
    assert str(tmp_path / "k400" / "videos") in msg and "VIDEO_ROOT=" in msg


def test_kinetics_csv(tmp_path):
    defn, paths = _defn(
        tmp_path,
        format="kinetics_csv",
        files={"train": "train.csv", "test": "test.csv"},
        video_template="{split}/{id}.mp4",
    )
    (paths.annotations / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,---QUuC4vJs,3,13,train\n"
        "air drumming,--nQbRBEz2s,104,114,train\n"
    )
    (paths.annotations / "test.csv").write_text("youtube_id,time_start,time_end,split\nzzz_abc,0,10,test\n")
    ds = load_dataset(defn, paths)
    assert ds.classes == ["abseiling", "air drumming"]
    first = ds.records[0]
    assert first.video_id == "---QUuC4vJs_000003_000013" and first.labels == (0,)
    assert first.path == str(paths.videos / "train" / "---QUuC4vJs_000003_000013.mp4")
    assert ds.split("test")[0].labels == ()


def test_kinetics_bad_row_names_file(tmp_path):
    defn, paths = _defn(tmp_path, format="kinetics_csv", files={"train": "train.csv"})
    (paths.annotations / "train.csv").write_text("label,youtube_id\nx,y\n")
    with pytest.raises(DatasetError, match="train.csv"):
        load_dataset(defn, paths)


def test_ssv2_json(tmp_path):
    defn, paths = _defn(
        tmp_path,
        format="ssv2_json",
        video_template="{id}.webm",
        files={"labels": "labels.json", "train": "train.json", "val": "validation.json"},
    )
    (paths.annotations / "labels.json").write_text(
        json.dumps(
            {
                "Holding something next to something": "1",
                "Approaching something with your camera": "0",
            }
        )
    )
    (paths.annotations / "train.json").write_text(
        json.dumps(
            [
                {
                    "id": "78687",
                    "label": "holding potato next to bottle",
                    "template": "Holding [something] next to [something]",
                    "placeholders": ["potato", "bottle"],
                }
            ]
        )
    )
    (paths.annotations / "validation.json").write_text(
        json.dumps([{"id": "24", "template": "Approaching [something] with your camera"}])
    )
    ds = load_dataset(defn, paths)
    assert ds.classes == [
        "Approaching something with your camera",
        "Holding something next to something",
    ]
    assert {(r.video_id, r.labels, r.split) for r in ds.records} == {
        ("78687", (1,), "train"),
        ("24", (0,), "val"),
    }
    assert ds.records[0].path.endswith("78687.webm")


def test_ucf101_splits(tmp_path):
    defn, paths = _defn(
        tmp_path,
        format="ucf101_splits",
        files={"classes": "classInd.txt", "train1": "trainlist01.txt", "test1": "testlist01.txt"},
    )
    (paths.annotations / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (paths.annotations / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    (paths.annotations / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\n")
    ds = load_dataset(defn, paths)
    assert [(r.video_id, r.labels, r.split) for r in ds.records] == [
        ("v_ApplyEyeMakeup_g08_c01", (0,), "train"),
        ("v_Archery_g01_c01", (1,), "test"),
    ]


def test_hmdb51_splits(tmp_path):
    defn, paths = _defn(tmp_path, format="hmdb51_splits", files={"splits": "splits"})
    (paths.annotations / "splits").mkdir()
    (paths.annotations / "splits" / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (paths.annotations / "splits" / "cartwheel_test_split1.txt").write_text("d.avi 1 \n")
    (paths.annotations / "splits" / "cartwheel_test_split2.txt").write_text("d.avi 2 \n")
    ds = load_dataset(defn, paths)
    assert ds.classes == ["brush_hair", "cartwheel"]
    assert [(r.video_id, r.labels, r.split) for r in ds.records] == [
        ("a", (0,), "train"),
        ("b", (0,), "test"),
        ("d", (1,), "train"),
    ]
    assert ds.records[0].path == str(paths.videos / "brush_hair" / "a.avi")


def test_charades_multilabel(tmp_path):
    defn, paths = _defn(
        tmp_path,
        format="charades_csv",
        multilabel=True,
        files={"classes": "classes.txt", "train": "train.csv", "test": "test.csv"},
    )
    (paths.annotations / "classes.txt").write_text(
        "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking a cup\n"
    )
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    (paths.annotations / "train.csv").write_text(
        header + "46GP8,HR43,Kitchen,6,7,Yes,s,food,d,c002 11.90 21.20;c000 0.00 12.60,24.8\n"
    )
    (paths.annotations / "test.csv").write_text(header + "ZZZ01,HR43,Kitchen,6,7,Yes,s,o,d,,10\n")
    ds = load_dataset(defn, paths)
    assert ds.multilabel
    assert ds.records[0].labels == (0, 2) and ds.records[1].labels == ()


def _folder(tmp_path, sizes: dict[str, int], **kw):
    defn, paths = _defn(tmp_path, format="folder", **kw)
    for cls, n in sizes.items():
        (paths.videos / cls).mkdir()
        for i in range(n):
            (paths.videos / cls / f"{cls}{i}.mp4").touch()
    return defn, paths


def test_folder_layout_is_stable(tmp_path):
    defn, paths = _folder(tmp_path, {"jump": 20, "run": 20})
    (paths.videos / "run" / "notes.txt").touch()
    first = load_dataset(defn, paths)
    assert first.classes == ["jump", "run"] and len(first.records) == 40
    assert {r.split for r in first.records} == {"train", "val", "test"}
    assert first.records == load_dataset(defn, paths).records


def test_folder_splits_are_stratified_and_seeded(tmp_path):
    """Every class sends its share to val and test; the seed changes which videos, not how many."""
    defn, paths = _folder(tmp_path, {"a": 10, "b": 25, "c": 3})
    records = load_dataset(defn, paths).records
    counts = Counter((r.labels[0], r.split) for r in records)
    assert [counts[(0, s)] for s in ("train", "val", "test")] == [6, 2, 2]
    assert [counts[(1, s)] for s in ("train", "val", "test")] == [15, 5, 5]
    assert [counts[(2, s)] for s in ("train", "val", "test")] == [1, 1, 1]  # one each from 3 videos
    reseeded = load_dataset(dataclasses.replace(defn, split_seed=1), paths).records
    assert Counter((r.labels[0], r.split) for r in reseeded) == counts
    assert [r.split for r in reseeded] != [r.split for r in records]


def test_a_splits_file_fixes_every_video(tmp_path):
    defn, paths = _folder(tmp_path, {"a": 2, "b": 2}, splits="splits.csv")
    (paths.root / "splits.csv").write_text("path,split\na/a0.mp4,train\na/a1.mp4,validation\nb/b0.mp4,test\n")
    with pytest.raises(DatasetError, match="no split for 1 video.*b1.mp4"):
        load_dataset(defn, paths)
    with (paths.root / "splits.csv").open("a") as fh:
        fh.write(f"{paths.videos / 'b' / 'b1.mp4'},train\n")  # absolute paths work too
    splits = {r.video_id: r.split for r in load_dataset(defn, paths).records}
    assert splits == {"a0": "train", "a1": "val", "b0": "test", "b1": "train"}
    (paths.root / "splits.csv").write_text("path,split\na/a0.mp4,train\na/zz.mp4,test\n")
    with pytest.raises(DatasetError, match="zz.mp4 is not a file"):
        load_dataset(defn, paths)
    (paths.root / "splits.csv").write_text("path,split\na/a0.mp4,holdout\n")
    with pytest.raises(DatasetError, match="holdout"):
        load_dataset(defn, paths)


def test_split_counts_table_and_missing_class_warning(tmp_path):
    defn, paths = _folder(tmp_path, {"a": 10, "b": 2})
    ds = load_dataset(defn, paths)
    text = split_counts(ds.classes, ds.records)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert lines[1].split() == ["a", "6", "2", "2"]
    assert "warning: val has no video of 1 class(es): b" in text
    many = [VideoRecord(f"v{i}", "x", (i % 30,), "train" if i < 60 else "val") for i in range(90)]
    wide = split_counts([f"c{i}" for i in range(30)], many).splitlines()
    assert wide[0].split() == ["split", "videos", "classes", "min/class", "max/class"]
    assert wide[1].split() == ["train", "60", "30", "2", "2"]


def test_num_classes_mismatch_is_reported(tmp_path):
    defn, paths = _defn(tmp_path, format="folder", num_classes=3)
    (paths.videos / "a").mkdir()
    with pytest.raises(DatasetError, match="expects 3"):
        load_dataset(defn, paths)


def test_demo_definition_parses_generated_set(tiny_demo_root):
    defn = load_definition("demo")
    ds = load_dataset(defn, resolve_paths(defn, tiny_demo_root))
    assert len(ds.classes) == 6 and len(ds.records) == 30
    assert {r.split for r in ds.records} == {"train", "val", "test"}
