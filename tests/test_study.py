"""``hallucinate study``: the statistics on hand-made run results, the grid and its resume, the
report read from the runs (never typed in), and the command's errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from hallucinate.study import (
    MAIN,
    build_report,
    paired,
    parse_seeds,
    parse_variants,
    plan_runs,
    summarise,
)
from pipelines.cli import main
from pipelines.errors import ConfigError

BASELINE = {0: {"top1": 0.60}, 1: {"top1": 0.70}, 2: {"top1": 0.65}}
HALLUCINATED = {0: {"top1": 0.66}, 1: {"top1": 0.72}, 2: {"top1": 0.70}}
CONTROL = {0: {"top1": 0.66}, 1: {"top1": 0.69}, 2: {"top1": 0.70}}


def test_summary_by_hand():
    s = summarise([0.60, 0.70, 0.65])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.65) and s["std"] == pytest.approx(0.05)
    assert (s["min"], s["max"]) == (0.60, 0.70)
    assert s["min"] <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= s["max"]  # a bootstrap of the mean


def test_paired_statistics_by_hand():
    from scipy.stats import t

    d = paired({s: v["top1"] for s, v in HALLUCINATED.items()}, {s: v["top1"] for s, v in BASELINE.items()})
    diffs = np.array([0.06, 0.02, 0.05])
    assert d["n"] == 3 and d["mean_diff"] == pytest.approx(diffs.mean())
    sd = math.sqrt(sum((x - diffs.mean()) ** 2 for x in diffs) / 2)
    assert d["std_diff"] == pytest.approx(sd)
    t_stat = diffs.mean() / (sd / math.sqrt(3))  # the paired t statistic, from its definition
    assert d["t_p"] == pytest.approx(2 * t.sf(t_stat, df=2))
    assert d["wilcoxon_p"] == pytest.approx(0.25)  # exact: all 3 signs positive, 2 of 2^3 sign patterns
    assert (d["won"], d["lost"], d["tied"]) == (3, 0, 0)


def test_identical_seeds_tie_rather_than_divide_by_zero():
    d = paired({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert (d["mean_diff"], d["t_p"], d["wilcoxon_p"], d["tied"]) == (0.0, 1.0, 1.0, 2)


def test_report_compares_with_baseline_and_control_and_says_if_inside_the_spread():
    report = build_report({"baseline": BASELINE, "hallucinated": HALLUCINATED, "control": CONTROL})
    assert set(report["versus"]) == {"baseline", "control"}
    assert report["versus"]["control"]["hallucinated"]["mean_diff"] == pytest.approx(0.01)
    assert report["variants"]["hallucinated"]["seeds"] == {"0": 0.66, "1": 0.72, "2": 0.70}
    [hal, control] = report["sentences"]
    # +0.043 against the baseline's own 0.10 range over seeds: inside, so no gain is claimed.
    assert hal.startswith("hallucinated - baseline: +0.043") and "inside the 0.100 range" in hal
    assert "no gain can be claimed" in hal
    wide = build_report(
        {"baseline": BASELINE, "big": {s: {"top1": v["top1"] + 0.2} for s, v in BASELINE.items()}}
    )
    assert "outside the 0.100 range" in wide["sentences"][0]


def test_the_readme_table_is_the_reports_and_only_a_marked_block_is_rewritten(tmp_path):
    from hallucinate.study import summary_table, update_readme

    table = summary_table(build_report({"baseline": BASELINE, "hallucinated": HALLUCINATED}))
    rows = table.splitlines()
    assert rows[2] == "| baseline | 0.650 ± 0.050 (0.600-0.700) |  |"
    assert rows[3].startswith(
        "| hallucinated | 0.693 ± 0.031 (0.660-0.720) | +0.043, 3 of 3 seeds won, t-test p = "
    )
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- study:demo -->\nold figures\n<!-- /study:demo -->\n\nMore.\n")
    assert update_readme(readme, "demo", table)
    assert readme.read_text() == f"# Title\n\n<!-- study:demo -->\n{table}\n<!-- /study:demo -->\n\nMore.\n"
    assert update_readme(readme, "demo", table)  # idempotent
    assert readme.read_text().count("<!-- study:demo -->") == 1
    other = tmp_path / "MINE.md"
    other.write_text("my own notes\n")
    assert not update_readme(other, "demo", table) and other.read_text() == "my own notes\n"


def test_variants_seeds_and_the_plan():
    variants = parse_variants(
        ["baseline", "hal", "oracle", "control", "drop:sdf.motion", "h64:hidden=64+d=32"]
    )
    assert [v.name for v in variants] == [
        "baseline",
        "hallucinated",
        "oracle",
        "control",
        "drop:sdf.motion",
        "h64",
    ]
    assert variants[5].overrides == ("hidden=64", "d=32") and variants[3].overrides == ("loss=none",)
    runs = plan_runs(variants, [0, 1])
    assert [r.group for r in runs[:2]] == [MAIN, MAIN]  # one training run gives three variants
    assert [r.group for r in runs] == [MAIN] * 2 + ["control"] * 2 + ["drop-sdf.motion"] * 2 + ["h64"] * 2
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    for bad in ("3-1", "x", "-1", "4"):
        with pytest.raises(ConfigError, match="seeds="):
            parse_seeds(bad)
    for bad in ("bogus", "drop:", "h:nokey", ["baseline", "baseline"]):
        with pytest.raises(ConfigError, match="variants"):
            parse_variants(bad if isinstance(bad, list) else [bad])


def test_study_command_errors(tmp_path, tiny_demo_root, capsys):
    base = [f"data_root={tiny_demo_root}", f"study={tmp_path / 's'}"]
    assert main(["study", *base, "variants=baseline,warp"]) == 2
    assert "'warp' is not a variant" in capsys.readouterr().err
    assert main(["study", *base, "seeds=2-0"]) == 2
    assert "seeds='2-0'" in capsys.readouterr().err
    assert main(["study", *base, f"features={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "no feature store at" in err and "hallucinate extract" in err


def test_a_small_study_reports_its_runs_and_resumes(tiny_demo_root, tmp_path, capsys):
    """Two seeds x {baseline, hallucinated, oracle, control, drop:...}: six training runs in
    child processes; the report's numbers are the runs' own; a re-run trains nothing, and a
    run whose evaluation is gone is the only one run again."""
    store, study = tmp_path / "store", tmp_path / "study"
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    assert main([*extract, "extractors=audio.logmel"]) == 0
    args = ["study", f"data_root={tiny_demo_root}", f"features={store}", f"study={study}", "seeds=0-1"]
    args += ["variants=baseline,hal,oracle,control,drop:audio.logmel/pyramid", "workers=2"]
    for key in ("frames=8", "size=32", "short_side=36", "epochs=1", "batch_size=8", "hidden=16", "d=8"):
        args.append(f"train.{key}")
    args += ["train.backbone_options.width=4", "train.export=false"]
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "6 runs, 0 finished before, 6 to run" in err
    report = json.loads((study / "report.json").read_text())
    for variant, protocol, group in (
        ("baseline", "rgb_only", "main"),
        ("hallucinated", "hallucinated", "main"),
        ("control", "hallucinated", "control"),
        ("drop:audio.logmel/pyramid", "hallucinated", "drop-audio.logmel_pyramid"),
    ):
        for seed in (0, 1):
            run = study / "runs" / f"{group}-s{seed}"
            truth = json.loads((run / "evaluation.json").read_text())["protocols"][protocol]["top1"]
            assert report["variants"][variant]["seeds"][str(seed)] == pytest.approx(truth), (variant, seed)
    dropped = json.loads((study / "runs" / "drop-audio.logmel_pyramid-s0" / "evaluation.json").read_text())
    assert dropped["streams"] == ["audio.logmel/stats"]
    control = json.loads((study / "runs" / "control-s0" / "config.json").read_text())
    assert control["loss"] == "none" and control["baseline"] is False and control["seed"] == 0
    for name in ("report.md", "seeds.png", "quality.png", "curves.png"):
        assert (study / name).is_file(), name
    assert "Paired by seed, against baseline" in (study / "report.md").read_text()
    assert "hallucinated - baseline" in out

    assert main(args) == 0
    assert "6 finished before, 0 to run" in capsys.readouterr().err
    (study / "runs" / "control-s1" / "evaluation.json").unlink()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "5 finished before, 1 to run" in err and "control-s1 done" in err
    timings = json.loads((study / "report.json").read_text())["seconds"]
    assert {f"{g}-s{s}" for g in ("main", "control", "drop-audio.logmel_pyramid") for s in (0, 1)} <= set(
        timings
    )


def test_a_study_runs_its_runs_as_tasks_on_an_existing_dask_scheduler(tiny_demo_root, tmp_path, capsys):
    """``scheduler=``: each run is a task on that cluster's workers (another process, which
    reports its pid), with absolute paths, since a worker's working directory is not ours."""
    from distributed import Client, LocalCluster

    store, study = tmp_path / "store", tmp_path / "study"
    extract = ["extract", f"data_root={tiny_demo_root}", f"out={store}", "workers=0", "progress=false"]
    assert main([*extract, "extractors=audio.logmel"]) == 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            (worker_pid,) = client.run(os.getpid).values()
        args = ["study", f"data_root={tiny_demo_root}", f"features={store}", f"study={study}", "seeds=0-1"]
        args += ["variants=baseline,hal", f"scheduler={cluster.scheduler_address}"]
        for key in ("frames=8", "size=32", "short_side=36", "epochs=1", "batch_size=8", "hidden=16", "d=8"):
            args.append(f"train.{key}")
        args += ["train.backbone_options.width=4", "train.export=false"]
        capsys.readouterr()
        assert main(args) == 0
    err = capsys.readouterr().err
    assert f"as tasks on {cluster.scheduler_address}" in err
    for seed in (0, 1):
        assert f"main-s{seed} done in" in err
        assert (study / "runs" / f"main-s{seed}" / "evaluation.json").is_file()
    assert err.count(f"pid {worker_pid}") == 2  # both ran on the worker, not here
    report = json.loads((study / "report.json").read_text())
    assert set(report["variants"]) == {"baseline", "hallucinated"}
