import os

import pytest

from pipelines.cli import main
from pipelines.errors import ConfigError
from pipelines.orchestrate import ClusterOptions, jobqueue_cluster


def test_bad_config_key_names_the_key(capsys):
    assert main(["extract", "workerz=2"]) == 2
    assert "workerz" in capsys.readouterr().err


def test_bad_value_type_names_the_key(capsys):
    assert main(["extract", "shard_size=many"]) == 2
    assert "shard_size" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["loss=mae", "pattern=banded"])
def test_bad_loss_or_pattern_is_named_before_any_work(bad, tmp_path, capsys):
    assert main(["train", "loss=uncertainty", bad, f"run={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert bad.split("=")[1] in err and "uncertainty" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["precision=fp8", "schedule=sometimes"])
def test_bad_precision_or_schedule_is_named_before_any_work(bad, tmp_path, capsys):
    assert main(["train", bad, f"run={tmp_path / 'run'}"]) == 2
    key, value = bad.split("=")
    err = capsys.readouterr().err
    assert value in err and key in err
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_lists_known(capsys):
    assert main(["extract", "dataset=kinetics9000"]) == 2
    err = capsys.readouterr().err
    assert "kinetics9000" in err and "k400" in err and "charades" in err


def test_unknown_extractor_is_named(capsys, tiny_demo_root):
    assert main(["extract", f"data_root={tiny_demo_root}", "extractors=audio.logmell"]) == 2
    assert "audio.logmel" in capsys.readouterr().err


def test_missing_video_root_names_it_and_how_to_set_it(tmp_path, capsys):
    assert main(["extract", "dataset=k400", f"data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "k400" / "videos") in err and "VIDEO_ROOT=" in err


def test_yaml_config_file_and_overrides(tmp_path, tiny_demo_root, capsys):
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"data_root: {tiny_demo_root}\nextractors: [audio.logmel]\nworkers: 0\nprogress: false\n")
    out = tmp_path / "out"
    assert (
        main(["extract", "--config", str(cfg), f"out={out}", "limit=5", "options.audio.logmel.n_mels=16"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "audio.logmel" in printed and "5 videos" in printed
    assert main(["inspect", f"out={out}", "video=ball_bounce_000"]) == 0
    shown = capsys.readouterr().out
    assert "5 videos in" in shown and '"n_mels": 16' in shown and "[pyramid] shape (112,)" in shown


def test_inspect_without_store(tmp_path, capsys):
    assert main(["inspect", f"out={tmp_path}"]) == 2
    assert "make extract" in capsys.readouterr().err


def test_fit_codebooks_names_the_splits_when_one_is_missing(tiny_demo_root, tmp_path, capsys):
    assert main(["fit-codebooks", f"data_root={tiny_demo_root}", f"out={tmp_path}", "split=training"]) == 2
    err = capsys.readouterr().err
    assert "no 'training' videos" in err and "'train'" in err and "split=" in err


def test_extractors_listing(capsys):
    assert main(["extractors"]) == 0
    out = capsys.readouterr().out
    assert "audio.logmel (default)" in out and "stats[372]" in out
    # Each entry says what it runs: a model shipped in a package, a heuristic, or a checkpoint's.
    lines = out.splitlines()
    runs = {line.split()[0]: lines[i + 2] for i, line in enumerate(lines) if not line.startswith(" ")}
    assert "pretrained model" in runs["odf.face"] and "pretrained model" in runs["pose.skeleton"]
    assert "heuristic" in runs["odf.motion"] and "checkpoint" in runs["odf.fasterrcnn"]


def test_slurm_cluster_uses_the_jobqueue_options():
    options = ClusterOptions(
        cluster="slurm",
        jobqueue={"cores": 4, "memory": "16GB", "queue": "gpu", "walltime": "02:00:00", "account": "lab"},
    )
    with jobqueue_cluster(options) as cluster:
        script = cluster.job_script()
        port = cluster.scheduler.http_server.port  # the dashboard: a free port, not a taken 8787
    assert "#SBATCH -p gpu" in script and "#SBATCH -A lab" in script and "02:00:00" in script
    assert port and port != 8787


def test_pbs_cluster_writes_the_job_script_of_the_docs_command():
    """docs/clusters.md's PBS command: no PBS server runs here, so its job script is what is checked."""
    options = ClusterOptions(
        cluster="pbs", jobqueue={"cores": 8, "memory": "32GB", "queue": "workq", "walltime": "04:00:00"}
    )
    with jobqueue_cluster(options) as cluster:
        script = cluster.job_script()
    assert "#PBS -q workq" in script and "walltime=04:00:00" in script and "ncpus=8" in script


def test_unknown_cluster_and_bad_jobqueue_options():
    with pytest.raises(ConfigError, match="local, slurm, pbs"):
        jobqueue_cluster(ClusterOptions(cluster="k8s"))
    with pytest.raises(ConfigError, match="jobqueue options"):
        jobqueue_cluster(ClusterOptions(cluster="pbs", jobqueue={"cores": 1, "memory": "1GB", "bogus": 1}))


def test_extract_demo_generates_it_on_a_fresh_checkout(tmp_path, capsys):
    data_root = tmp_path / "datasets"
    out = tmp_path / "out"
    args = ["extract", f"data_root={data_root}", f"out={out}", "workers=0", "progress=false", "limit=4"]
    assert main(args) == 0
    from pipelines.demo import DEMO_CLASSES, DemoSpec, total_clips_per_class

    videos = len(DEMO_CLASSES) * total_clips_per_class(DemoSpec())
    assert len((data_root / "demo" / "annotations" / "manifest.csv").read_text().splitlines()) == 1 + videos
    marker = (data_root / "demo" / "demo.json").stat().st_mtime_ns
    assert main(args) == 0  # present: not generated again
    assert (data_root / "demo" / "demo.json").stat().st_mtime_ns == marker
    assert "4 videos" in capsys.readouterr().out


def test_bad_generator_is_a_config_error(tmp_path, capsys):
    definition = tmp_path / "mine.yaml"
    definition.write_text("name: mine\nformat: folder\nroot: mine\ngenerator: nowhere:make\n")
    assert main(["extract", f"dataset={definition}", f"data_root={tmp_path}"]) == 2
    assert "nowhere:make" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["extract_demo.yaml", "extract_k400_slurm.yaml"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from pipelines.cli import ExtractConfig, resolve_extractors
    from pipelines.config import build_config

    cfg = build_config(ExtractConfig, Path(__file__).parents[1] / "configs" / name)
    assert resolve_extractors(cfg.extractors, cfg.options)


def test_clip_and_optimiser_defaults_come_from_the_backbone():
    """Unset clip and optimiser keys take the backbone's defaults (the paper's 64
    frames and lr 1e-4 for video backbones, the demo's for tiny3d); given ones win."""
    from pipelines.cli import TrainConfig, with_backbone_defaults
    from pipelines.config import build_config

    def resolved(*overrides):
        cfg = with_backbone_defaults(build_config(TrainConfig, overrides=overrides))
        return cfg.frames, cfg.size, cfg.short_side, cfg.lr, cfg.batch_size

    assert resolved() == (16, 72, 72, 1e-3, 16)  # tiny3d: what make demo trains with
    assert resolved("backbone=r3d_18") == (64, 112, 128, 1e-4, 32)  # its Kinetics weights' crop
    assert resolved("backbone=s3d") == (64, 224, 256, 1e-4, 32)
    assert resolved("backbone=mvit_v2_s")[:2] == (16, 224)
    assert resolved("backbone=r3d_18", "frames=32", "lr=0.01") == (32, 112, 128, 0.01, 32)
    assert resolved("rgb_features=rgb.features/x_rgb")[3:] == (1e-4, 32)  # frozen mode: HAF + PredNet
    with pytest.raises(ConfigError, match="r3d_18"):
        resolved("backbone=r3d18")


def test_evaluate_measures_train_quality_on_a_seeded_sample(tiny_demo_root):
    from pipelines.cli import _split_records
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition("demo")
    dataset = load_dataset(defn, resolve_paths(defn, tiny_demo_root))
    every = _split_records(dataset)
    assert every["train"] == dataset.split("train") and every["test"] == dataset.split("test")
    sample = _split_records(dataset, max_train=6, seed=1)["train"]
    order = [every["train"].index(r) for r in sample]
    assert len(sample) == 6 and order == sorted(order) and order != list(range(6))  # not the first 6
    assert len({r.labels for r in sample}) > 1  # the set is sorted by class
    assert _split_records(dataset, max_train=6, seed=1)["train"] == sample


def test_train_and_evaluate_end_to_end(tiny_demo_root, tmp_path, capsys):
    import json

    store, run = tmp_path / "store", tmp_path / "run"
    common = [f"data_root={tiny_demo_root}"]
    assert main(["extract", *common, f"out={store}", "workers=0", "progress=false"]) == 0
    small = [
        "frames=8",
        "size=32",
        "short_side=36",
        "epochs=2",
        "batch_size=8",
        "hidden=32",
        "d=16",
        "backbone_options.width=4",
        "progress=false",
    ]
    capsys.readouterr()
    assert main(["train", *common, f"features={store}", f"run={run}", *small]) == 0
    trained = capsys.readouterr()
    assert "decode" not in trained.err  # progress=false silences the preload bar too
    assert "label R2 of each stream's target (validation" in trained.err
    assert "preload=auto: holding the videos' frames in memory" in trained.err
    saved = json.loads((run / "config.json").read_text())  # resolved: no None left
    assert (saved["batch_size"], saved["lr"], saved["preload"], saved["workers"]) == (8, 1e-3, True, 0)
    assert saved["threads"] == (os.cpu_count() or 1)  # no loader workers: every core
    for name in ("model", "baseline"):
        assert (run / name / "best.pt").is_file() and (run / name / "last.pt").is_file()
        assert len((run / name / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "model" / "inference.pt").is_file()
    assert main(["train", *common, f"features={store}", f"run={run}", *small]) == 0  # resumes: no epoch left
    assert len((run / "model" / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["evaluate", *common, f"features={store}", f"run={run}"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "decode" in captured.err
    assert main(["evaluate", *common, f"features={store}", f"run={run}", "progress=false"]) == 0
    assert "decode" not in capsys.readouterr().err
    for word in ("rgb_only", "hallucinated", "oracle", "audio.logmel/stats", "R2 train", "R2 label"):
        assert word in out
    report = json.loads((run / "evaluation.json").read_text())
    assert set(report["label_r2"]) == set(report["streams"])
    assert set(report["protocols"]) == {"rgb_only", "hallucinated", "oracle"}
    assert report["loss"] == "mse"
    assert (run / "curves.png").is_file() and (run / "quality.png").is_file()


def test_frozen_backbone_mode_trains_on_stored_x_rgb(tiny_demo_root, tmp_path, capsys):
    """rgb.features stores X_rgb once; training and evaluation then never decode video."""
    import torch

    from hallucinate.run import load_model
    from pipelines.store import ShardReader

    store, run = tmp_path / "store", tmp_path / "run"
    common = [f"data_root={tiny_demo_root}", f"features={store}", f"run={run}"]
    rgb = "options.rgb.features"
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    extract += ["extractors=audio.logmel,rgb.features", f"{rgb}.frames=8", f"{rgb}.size=32"]
    extract += [f"{rgb}.short_side=36", f"{rgb}.clips=2", f"{rgb}.backbone_options.width=4"]
    assert main(extract) == 0
    reader = ShardReader(store)
    assert reader.get(reader.video_ids[0], "rgb.features/x_rgb").shape == (2, 32, 2)  # clips, C, T′

    train = ["train", *common, "rgb_features=rgb.features/x_rgb", "epochs=2", "batch_size=8"]
    train += ["hidden=32", "d=16", "progress=false", "preload=false", "export_formats=torchscript,onnx"]
    assert main(train) == 0
    model = load_model(run / "model")
    assert model.backbone.__class__.__name__ == "Precomputed" and model.backbone.out_channels == 32
    traced = torch.jit.load(str(run / "model" / "inference.pt"))
    x_rgb = torch.rand(3, 32, 2)
    with torch.no_grad():
        torch.testing.assert_close(traced(x_rgb), model.eval()(x_rgb), rtol=1e-4, atol=1e-5)
    assert (run / "model" / "inference.onnx").is_file()
    capsys.readouterr()
    assert main(["evaluate", f"run={run}"]) == 0  # data_root and features: the run's own
    captured = capsys.readouterr()
    assert "hallucinated" in captured.out and f"feature store {store}" in captured.err
    assert main(["train", *common, "rgb_features=nope/x", "run=" + str(tmp_path / "r2")]) == 2


def test_evaluate_defaults_to_where_the_run_was_trained(tmp_path):
    """Each location field the command line leaves out comes from the run's config.json."""
    import dataclasses
    import json

    from pipelines.cli import EvaluateConfig, RunLocation, trained_location
    from pipelines.config import build_config

    run = tmp_path / "run"
    run.mkdir()
    trained = RunLocation("k400", {"classes": 3}, "/data", "/videos", "/feats", str(run))
    (run / "config.json").write_text(json.dumps({**dataclasses.asdict(trained), "epochs": 5}))
    assert trained_location(build_config(EvaluateConfig, overrides=[f"run={run}"])) == trained
    given = trained_location(build_config(EvaluateConfig, overrides=[f"run={run}", "features=/other"]))
    assert given == dataclasses.replace(trained, features="/other")
    bare = trained_location(build_config(EvaluateConfig, overrides=[f"run={tmp_path / 'old'}"]))
    assert bare == RunLocation(run=str(tmp_path / "old"))  # no config.json: train's defaults
    assert trained_location(build_config(EvaluateConfig, overrides=["dataset=ucf101"])).run == "runs/ucf101"


def test_weighted_mean_fusion_end_to_end(tiny_demo_root, tmp_path, capsys):
    """fusion=weighted_mean: the prior w′ from SVMs on the ground truth, β searched, evaluation loads it."""
    import json

    store, run = tmp_path / "store", tmp_path / "run"
    common = [f"data_root={tiny_demo_root}", f"features={store}", f"run={run}"]
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    assert main([*extract, "extractors=audio.logmel"]) == 0
    train = ["train", *common, "fusion=weighted_mean", "beta_warmup=1", "epochs=2", "frames=8", "size=32"]
    train += ["short_side=36", "hidden=32", "d=16", "backbone_options.width=4", "progress=false"]
    train += ["baseline=false", "export=false"]
    capsys.readouterr()
    assert main(train) == 0
    err = capsys.readouterr().err
    assert "fusion prior w'" in err and "audio.logmel/stats" in err
    rows = [json.loads(line) for line in (run / "model" / "metrics.jsonl").read_text().splitlines()]
    assert "beta" in rows[-1]
    assert main(["evaluate", *common]) == 0


def test_train_names_and_can_leave_out_streams_with_ground_truth_on_few_videos(
    tiny_demo_root, tmp_path, capsys
):
    """A stream with ground truth on 1 of 18 clips is named in a warning; min_coverage
    leaves such auto-discovered streams out, never one the user names."""
    from hallucinate.run import checkpoint_config
    from pipelines.datasets import load_dataset, load_definition, resolve_paths
    from tests.test_trainer import write_store

    defn = load_definition("demo")
    ids = [r.video_id for r in load_dataset(defn, resolve_paths(defn, tiny_demo_root)).split("train")]
    store = tmp_path / "store"
    write_store(store, ids, {"dense.x": len(ids), "sparse.x": 1, "absent.x": 0})
    train = ["train", f"data_root={tiny_demo_root}", f"features={store}", "epochs=1", "frames=8", "size=32"]
    train += ["short_side=36", "hidden=32", "d=16", "backbone_options.width=4", "progress=false"]
    train += ["baseline=false", "export=false"]

    def trained_streams(*extra):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        capsys.readouterr()
        assert main([*train, f"run={run}", *extra]) == 0
        saved = checkpoint_config(run / "model" / "best.pt")["streams"]
        return [s["name"] for s in saved], capsys.readouterr().err

    streams, err = trained_streams()  # kept by default, and named
    assert streams == ["dense.x/descriptor", "sparse.x/descriptor"]
    assert f"sparse.x/descriptor has ground truth on 1 of {len(ids)} training videos" in err
    assert "training it anyway (min_coverage=0.1 would leave it out)" in err
    assert "dense.x/descriptor has" not in err
    # Flagged on every video (no audio anywhere): named, with the flags' count, not silently absent.
    assert f"absent.x gives no stream: none of the {len(ids)} training videos" in err
    assert f"(no_boxes: {len(ids)})" in err
    assert "keeps equal weights" not in err
    _, err = trained_streams("fusion=weighted_mean")  # epochs=1, beta_warmup=10: beta is never searched
    assert "fusion=weighted_mean keeps equal weights (beta 0) for the whole run" in err
    streams, err = trained_streams("min_coverage=0.1")
    assert streams == ["dense.x/descriptor"]
    assert "sparse.x/descriptor has ground truth on 1" in err and "leaving it out" in err
    streams, err = trained_streams("streams=[dense.x,sparse.x]", "min_coverage=0.5")
    assert streams == ["dense.x/descriptor", "sparse.x/descriptor"]
    assert "sparse.x/descriptor has ground truth on 1" in err and "as named in streams=" in err
    assert main([*train, "min_coverage=2"]) == 2
    assert "min_coverage=2" in capsys.readouterr().err


def test_the_report_says_which_streams_hallucinate_nothing():
    from pipelines.cli import format_report

    def q(r2):
        return {"r2": r2, "cosine": 0.0, "n": 10}

    metrics = {"top1": 0.5, "top5": 1.0, "mean_class_acc": 0.5}
    report = {
        "streams": ["a/x", "b/y", "c/z"],
        "protocols": {"hallucinated": metrics},
        "drop_one": {"a/x": metrics, "b/y": metrics, "c/z": metrics},
        "quality": {
            "train": {"a/x": q(-1.2), "b/y": q(0.4), "c/z": q(0.6)},
            "test": {"a/x": q(-1.5), "b/y": q(-0.2), "c/z": q(0.3)},
        },
    }
    lines = format_report(report).splitlines()
    unfit = [line for line in lines if "R2 train < 0" in line]
    ungeneral = [line for line in lines if "R2 test < 0" in line]
    assert len(unfit) == 1 and unfit[0].endswith(": a/x")
    assert len(ungeneral) == 1 and "b/y" in ungeneral[0] and "a/x" not in ungeneral[0]
    assert not any("c/z" in line for line in unfit + ungeneral)
    assert "loss=none" not in "\n".join(lines)
    assert not any("R2 label" in line for line in lines)  # an older report has no label R²
    report["label_r2"] = {"a/x": 0.5, "b/y": 0.02, "c/z": float("nan")}
    lines = format_report(report).splitlines()
    assert next(line for line in lines if line.startswith("stream quality")).endswith("R2 label")
    nuisance = [line for line in lines if "explained by the label" in line]
    assert len(nuisance) == 1 and nuisance[0].endswith(": b/y")
    del report["label_r2"]
    report["loss"] = "none"  # the control: its streams' accuracy is not hallucination's
    assert "note: trained with loss=none (the control)" in format_report(report)


def test_the_report_columns_stay_aligned_for_long_stream_names():
    from pipelines.cli import format_report

    names = ["a/x", "sdf.spectral_residual/descriptor"]
    metrics = {"top1": 0.5, "top5": 1.0}
    quality = {n: {"r2": 0.1, "cosine": 0.2, "n": 3} for n in names}
    report = {
        "streams": names,
        "protocols": {"hallucinated": metrics},
        "drop_one": dict.fromkeys(names, metrics),
        "quality": {"train": quality, "test": quality},
        "label_r2": dict.fromkeys(names, 0.3),
    }
    lines = format_report(report).splitlines()
    drop = lines[lines.index(next(line for line in lines if line.startswith("drop one"))) :][:3]
    quality_rows = lines[lines.index(next(line for line in lines if line.startswith("stream quality"))) :][:3]
    for table in (drop, quality_rows):
        assert len({len(line) for line in table}) == 1, table


def test_threads_default_to_the_cores_each_process_may_use(tiny_demo_root, tmp_path):
    """Extraction: cores / workers per worker, or threads=; the in-process path applies it."""
    import torch

    from pipelines.process import default_threads, keep_freed_memory

    cores = os.cpu_count() or 1
    assert ClusterOptions(workers=2).local_threads() == max(1, cores // 2)
    assert ClusterOptions(workers=0).local_threads() == cores
    assert ClusterOptions(workers=8, threads=3).local_threads() == 3
    assert default_threads(4 * cores) == 1  # never zero
    assert keep_freed_memory()  # glibc here
    before = torch.get_num_threads()
    try:
        args = [f"data_root={tiny_demo_root}", f"out={tmp_path}", "limit=1", "workers=0", "progress=false"]
        assert main(["extract", "extractors=audio.logmel", "threads=1", *args]) == 0
        assert torch.get_num_threads() == 1
        assert main(["extract", "threads=0", *args]) == 2
    finally:
        torch.set_num_threads(before)


def test_a_last_training_batch_of_one_clip_trains(tiny_demo_root, tmp_path):
    """With N training videos and batch_size=N-1 the last batch holds one clip, which
    BatchNorm cannot normalise in training mode; video and frozen-feature paths both train."""
    from hallucinate.run import loader
    from pipelines.datasets import load_dataset, load_definition, resolve_paths

    defn = load_definition("demo")
    records = load_dataset(defn, resolve_paths(defn, tiny_demo_root)).records
    n_train = sum(r.split == "train" for r in records)
    assert n_train > 2
    assert len(loader(list(range(n_train)), n_train - 1, 0, shuffle=True)) == 1  # the single clip is left
    assert len(loader(list(range(n_train)), n_train - 1, 0)) == 2  # evaluation keeps every clip
    assert len(loader(list(range(n_train)), n_train - 2, 0, shuffle=True)) == 2  # two clips: a batch

    store = tmp_path / "store"
    rgb = "options.rgb.features"
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    extract += ["extractors=audio.logmel,rgb.features", f"{rgb}.frames=8", f"{rgb}.size=32"]
    extract += [f"{rgb}.short_side=36", f"{rgb}.clips=2", f"{rgb}.backbone_options.width=4"]
    assert main(extract) == 0
    common = [f"data_root={tiny_demo_root}", f"features={store}", f"batch_size={n_train - 1}", "epochs=1"]
    common += ["hidden=16", "d=8", "progress=false", "export=false"]
    frozen = ["train", *common, f"run={tmp_path / 'frozen'}", "rgb_features=rgb.features/x_rgb"]
    assert main(frozen) == 0
    video = ["train", *common, f"run={tmp_path / 'video'}", "frames=8", "size=32", "short_side=36"]
    assert main([*video, "backbone_options.width=4", "preload=true"]) == 0


@pytest.mark.parametrize(
    "bad", ["limit=-1", "shard_size=0", "workers=-1", "threads=0", "max_attempts=0", "shard_size=-4"]
)
def test_counts_that_would_mean_something_else_are_refused(bad, tmp_path, capsys):
    """limit=-1 used to drop the last video, shard_size=0 meant automatic, workers=-1 hung."""
    assert main(["extract", bad, f"out={tmp_path}", "data_root=/nonexistent", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: give at least" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_resuming_with_other_settings_names_them_and_changes_nothing(tiny_demo_root, tmp_path, capsys):
    """`make train` after `make demo` used to overwrite runs/demo/config.json, then blame the version."""
    store, run = tmp_path / "store", tmp_path / "run"
    common = [f"data_root={tiny_demo_root}", f"features={store}", f"run={run}"]
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    assert main([*extract, "extractors=audio.logmel"]) == 0
    small = ["frames=8", "size=32", "short_side=36", "batch_size=8", "hidden=16", "d=8"]
    small += ["backbone_options.width=4", "progress=false", "export=false", "baseline=false"]
    assert main(["train", *common, *small, "epochs=1", "alpha=0.05"]) == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", *common, *small, "epochs=1", "loss=none"]) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings" in err
    assert "alpha: 0.05 there, 1.0 now" in err and "loss: 'mse' there, 'none' now" in err
    own = err.split("resume it with its own: ")[1].split(" (")[0].split()
    assert sorted(own) == ["alpha=0.05", "loss=mse"] and "into a new run=" in err  # the two ways on
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # nothing changed
    # Its own settings resume it; more epochs and fewer threads are allowed.
    assert main(["train", *common, *small, "alpha=0.05", "epochs=2", "threads=1"]) == 0
    assert len((run / "model" / "metrics.jsonl").read_text().splitlines()) == 2


def test_one_seed_gives_one_model_whatever_the_data_path(tiny_demo_root, tmp_path):
    """Loader workers and preload used to change the clips drawn, and so the weights; a run
    resumed after its first epoch now also ends where an uninterrupted one does."""
    import torch

    store = tmp_path / "store"
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    assert main([*extract, "extractors=audio.logmel"]) == 0
    small = [
        "frames=8",
        "size=32",
        "short_side=36",
        "batch_size=8",
        "hidden=16",
        "d=8",
        "backbone_options.width=4",
    ]
    small += ["progress=false", "export=false", "baseline=false", "deterministic=true"]

    def weights(name: str, *extra: str) -> dict:
        run = tmp_path / name
        assert (
            main(["train", f"data_root={tiny_demo_root}", f"features={store}", f"run={run}", *small, *extra])
            == 0
        )
        state = torch.load(run / "model" / "last.pt", weights_only=False)["model"]
        return {k: v for k, v in state.items() if torch.is_tensor(v)}

    preloaded = weights("preloaded", "epochs=2", "preload=true")
    streamed = weights("streamed", "epochs=2", "preload=false", "workers=2")
    assert preloaded.keys() == streamed.keys()
    for key in preloaded:
        torch.testing.assert_close(preloaded[key], streamed[key], rtol=0, atol=0, msg=key)
    weights("resumed", "epochs=1", "preload=true")
    resumed = weights("resumed", "epochs=2", "preload=true")
    for key in preloaded:
        torch.testing.assert_close(preloaded[key], resumed[key], rtol=0, atol=0, msg=key)
    assert main(["train", f"data_root={tiny_demo_root}", f"features={store}", *small, "threads=2"]) == 2
