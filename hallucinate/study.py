"""Multi-seed studies: a grid of training runs, each evaluated, and honest statistics over them.

Why: one seed proves nothing here. On the demo, float rounding alone moved
the hallucinated model by 8 points of top-1, and the baseline's own range
over three seeds was 9 points; the ``loss=none`` control matched the
hallucinated model. A claim of a gain needs the runs, the paired
differences and their spread, computed from the runs' own reports and
never typed in.

A *variant* is what the report compares; a *run group* is what is
trained. One ``hallucinate train`` with its baseline (group ``main``)
gives three variants per seed: ``baseline`` (the RGB-only model),
``hallucinated`` and ``oracle`` (the same model with ground-truth
streams). ``control`` trains the same heads with ``loss=none``;
``drop:<stream>`` leaves one stream (or extractor) out; ``name:key=value+...``
trains any other setting under a name. Each run is its own run directory
``<study>/runs/<group>-s<seed>``, so a killed study resumes: finished runs
(with an ``evaluation.json``) are skipped, interrupted ones resume.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import ConfigError

MAIN = "main"  # the run group that trains the model and its RGB-only baseline
PROTOCOL_OF = {"baseline": "rgb_only", "hallucinated": "hallucinated", "oracle": "oracle"}
ALIASES = {"hal": "hallucinated", "rgb_only": "baseline"}
METRICS = ("top1", "mean_class_acc", "mAP")


@dataclass(frozen=True)
class Variant:
    """A column of the report: the run group it is read from, the protocol, its train keys."""

    name: str
    group: str
    protocol: str
    overrides: tuple[str, ...] = ()
    drop: str | None = None  # a stream or extractor left out (``drop:<stream>``)


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """``baseline``, ``hallucinated`` (``hal``), ``oracle``, ``control``, ``drop:<stream>``, or
    ``name:key=value+key=value``; an unknown name is an error that lists the known ones."""
    variants: list[Variant] = []
    for spec in specs:
        name, sep, rest = spec.partition(":")
        name = ALIASES.get(name, name)
        if not sep and name in PROTOCOL_OF:
            variants.append(Variant(name, MAIN, PROTOCOL_OF[name]))
        elif not sep and name == "control":
            variants.append(Variant("control", "control", "hallucinated", ("loss=none",)))
        elif sep and name == "drop" and rest:
            group = "drop-" + rest.replace("/", "_")  # a run directory's name: no slash
            variants.append(Variant(f"drop:{rest}", group, "hallucinated", drop=rest))
        elif sep and rest and all("=" in kv for kv in rest.split("+")) and name.isidentifier():
            variants.append(Variant(name, name, "hallucinated", tuple(rest.split("+"))))
        else:
            raise ConfigError(
                f"variants: {spec!r} is not a variant; use baseline, hallucinated (hal), oracle, "
                "control, drop:<stream or extractor>, or name:key=value+key=value (e.g. hal64:hidden=64)"
            )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variants: a name is given twice in {names}")
    return variants


def parse_seeds(text: str) -> list[int]:
    """``0-5`` (inclusive), ``0,2,7`` or a mix; at least two seeds, none negative."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            first, sep, last = part.strip().partition("-")
            lo, hi = int(first), int(last) if sep else int(first)
            if hi < lo or lo < 0:
                raise ValueError
            seeds.extend(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(
            f"seeds={text!r}: give a range like 0-5 or a list like 0,2,7 (non-negative)"
        ) from None
    if len(set(seeds)) < 2:
        raise ConfigError(f"seeds={text!r}: a study needs at least two seeds; its point is their spread")
    return sorted(set(seeds))


@dataclass(frozen=True)
class StudyRun:
    """One training run of the grid: a run group at one seed."""

    group: str
    seed: int
    overrides: tuple[str, ...]
    drop: str | None = None

    def directory(self, study: Path) -> Path:
        return study / "runs" / f"{self.group}-s{self.seed}"


def plan_runs(variants: Sequence[Variant], seeds: Sequence[int]) -> list[StudyRun]:
    """The runs the variants need, ``main`` first (drop variants read its stream list)."""
    groups: dict[str, Variant] = {}
    for v in variants:
        groups.setdefault(v.group, v)
    if any(v.drop for v in variants):
        groups.setdefault(MAIN, Variant("hallucinated", MAIN, "hallucinated"))
    order = sorted(groups, key=lambda g: g != MAIN)
    return [StudyRun(g, s, groups[g].overrides, groups[g].drop) for g in order for s in seeds]


def finished(run_dir: Path) -> bool:
    return (run_dir / "evaluation.json").is_file()


# ---------------------------------------------------------------- statistics


def summarise(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """n, mean, standard deviation (n-1), range and a 95% percentile bootstrap interval of the mean."""
    from scipy.stats import bootstrap

    x = np.asarray(values, np.float64)
    out = {"n": len(x), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan}
    out.update(min=float(x.min()), max=float(x.max()))
    if len(x) > 1 and x.std() > 0:
        ci = bootstrap((x,), np.mean, n_resamples=10_000, method="percentile", random_state=seed)
        out.update(ci_low=float(ci.confidence_interval.low), ci_high=float(ci.confidence_interval.high))
    else:  # every seed the same: the interval is that value
        out.update(ci_low=float(x.mean()), ci_high=float(x.mean()))
    return out


def paired(values: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, float]:
    """Seed-paired differences ``values - reference``: mean, std, paired t-test and Wilcoxon
    signed-rank p-values (scipy), and the seeds won, lost and tied."""
    from scipy.stats import ttest_rel, wilcoxon

    seeds = sorted(set(values) & set(reference))
    a = np.array([values[s] for s in seeds], np.float64)
    b = np.array([reference[s] for s in seeds], np.float64)
    d = a - b
    out: dict[str, float] = {"n": len(seeds), "mean_diff": float(d.mean()) if len(d) else math.nan}
    out["std_diff"] = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    out.update(won=int((d > 0).sum()), lost=int((d < 0).sum()), tied=int((d == 0).sum()))
    if len(d) > 1 and d.std() > 0:
        out["t_p"] = float(ttest_rel(a, b).pvalue)
    else:
        out["t_p"] = 1.0 if len(d) > 1 and not d.any() else math.nan
    nonzero = d[d != 0]
    out["wilcoxon_p"] = float(wilcoxon(nonzero).pvalue) if len(nonzero) else (1.0 if len(d) else math.nan)
    return out


def spread_sentence(name: str, reference: str, diff: Mapping[str, float], ref: Mapping[str, float]) -> str:
    """One sentence: is the mean paired difference inside the reference's own seed range?"""
    spread = ref["max"] - ref["min"]
    inside = abs(diff["mean_diff"]) <= spread
    where = "inside" if inside else "outside"
    return (
        f"{name} - {reference}: {diff['mean_diff']:+.3f} on average "
        f"({diff['won']} of {diff['n']} seeds won; paired t-test p = {_fmt(diff['t_p'])}), {where} "
        f"the {spread:.3f} range of {reference} over its seeds"
        + ("; no gain can be claimed from these seeds." if inside else ".")
    )


def build_report(
    results: Mapping[str, Mapping[int, Mapping[str, float]]], metric: str = "top1"
) -> dict[str, Any]:
    """Per-variant summaries and paired comparisons against ``baseline`` and ``control``.

    ``results`` maps variant -> seed -> the protocol's metrics (from each
    run's ``evaluation.json``); only what is there is reported.
    """
    report: dict[str, Any] = {"metric": metric, "variants": {}, "versus": {}, "sentences": []}
    for name, by_seed in results.items():
        entry = {}
        for m in METRICS:
            values = [v[m] for v in by_seed.values() if m in v]
            if values:
                entry[m] = summarise(values)
        entry["seeds"] = {str(s): v.get(metric) for s, v in sorted(by_seed.items())}
        report["variants"][name] = entry
    for ref in ("baseline", "control"):
        if ref not in results:
            continue
        ref_values = {s: v[metric] for s, v in results[ref].items()}
        for name, by_seed in results.items():
            if name == ref:
                continue
            diff = paired({s: v[metric] for s, v in by_seed.items()}, ref_values)
            report["versus"].setdefault(ref, {})[name] = diff
            if ref == "baseline" and diff["n"]:
                report["sentences"].append(spread_sentence(name, ref, diff, report["variants"][ref][metric]))
    return report


# ---------------------------------------------------------------- reading runs


def read_results(study: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> dict:
    """variant -> seed -> metrics, from the finished runs' evaluation.json; missing runs are absent."""
    results: dict[str, dict[int, dict[str, float]]] = {}
    for v in variants:
        for s in seeds:
            path = StudyRun(v.group, s, v.overrides).directory(study) / "evaluation.json"
            if path.is_file():
                protocols = json.loads(path.read_text())["protocols"]
                if v.protocol in protocols:
                    results.setdefault(v.name, {})[s] = protocols[v.protocol]
    return results


def read_quality(study: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> dict:
    """group -> split -> stream -> (mean R2, mean cosine) over seeds, for the hallucination runs."""
    out: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for group in dict.fromkeys(v.group for v in variants if v.protocol != "rgb_only"):
        per: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for s in seeds:
            path = StudyRun(group, s, ()).directory(study) / "evaluation.json"
            if not path.is_file():
                continue
            for split, streams in json.loads(path.read_text()).get("quality", {}).items():
                for stream, q in streams.items():
                    per.setdefault((split, stream), []).append((q["r2"], q["cosine"]))
        for (split, stream), pairs in per.items():
            with warnings.catch_warnings():  # a stream with ground truth on one clip has no R2
                warnings.simplefilter("ignore", RuntimeWarning)
                r2, cos = np.nanmean(np.array(pairs, np.float64), 0)
            out.setdefault(group, {}).setdefault(split, {})[stream] = (float(r2), float(cos))
    return out


def read_curves(study: Path, groups: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[str, list]]:
    """ "<group>/<model or baseline>" -> seed -> validation top-1 per epoch (metrics.jsonl)."""
    curves: dict[str, dict[str, list]] = {}
    for group in groups:
        for model in ("model", "baseline"):
            for s in seeds:
                path = StudyRun(group, s, ()).directory(study) / model / "metrics.jsonl"
                if path.is_file():
                    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                    curves.setdefault(f"{group}/{model}", {})[str(s)] = [r.get("val_top1") for r in rows]
    return curves


# ---------------------------------------------------------------- the report


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report_markdown(report: Mapping[str, Any], command: str, timings: Mapping[str, float]) -> str:
    metric = report["metric"]
    lines = ["# Study report", "", f"Command: `{command}`", ""]
    lines += [f"Per variant, test {metric} over seeds (95% interval: percentile bootstrap of the mean).", ""]
    lines += [
        "| variant | n | mean | std | min | max | 95% interval | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["variants"].items():
        s = entry.get(metric)
        if not s:
            continue
        seeds = ", ".join(f"{k}: {_fmt(v)}" for k, v in entry["seeds"].items())
        lines.append(
            f"| {name} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['min'])} "
            f"| {_fmt(s['max'])} | {_fmt(s['ci_low'])}-{_fmt(s['ci_high'])} | {seeds} |"
        )
    for ref, rows in report["versus"].items():
        lines += ["", f"Paired by seed, against {ref}:", ""]
        lines += ["| variant | seeds | mean difference | std | t-test p | Wilcoxon p | won / lost / tied |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, d in rows.items():
            lines.append(
                f"| {name} | {d['n']} | {d['mean_diff']:+.3f} | {_fmt(d['std_diff'])} | {_fmt(d['t_p'])} "
                f"| {_fmt(d['wilcoxon_p'])} | {d['won']} / {d['lost']} / {d['tied']} |"
            )
    if report["sentences"]:
        lines += ["", *[f"- {s}" for s in report["sentences"]]]
    n = max((e[metric]["n"] for e in report["variants"].values() if metric in e), default=0)
    if n:
        lines += [
            "",
            f"With {n} seeds the Wilcoxon signed-rank test cannot go below p = {2 / 2**n:.3f} "
            "(every seed won), so only more seeds can make its answer firm.",
        ]
    lines += ["", "Plots: `seeds.png` (each seed's runs joined), `quality.png` (each stream's R2 and cosine,"]
    lines += ["train and test), `curves.png` (validation top-1 per epoch). Each run's own report, curves and"]
    lines += ["quality plot are in `runs/<group>-s<seed>/`.", ""]
    if timings:
        lines += ["| run | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], ""]
    return "\n".join(lines)


def summary_table(report: Mapping[str, Any]) -> str:
    """The short table a front page shows: each variant's mean ± std (range), paired with the baseline."""
    metric, versus = report["metric"], report["versus"].get("baseline", {})
    lines = [f"| variant | test {metric}, mean ± std (range) | paired with the baseline |", "|---|---|---|"]
    for name, entry in report["variants"].items():
        s = entry.get(metric)
        if not s:
            continue
        d = versus.get(name)
        pair = (
            f"{d['mean_diff']:+.3f}, {d['won']} of {d['n']} seeds won, t-test p = {_fmt(d['t_p'])}"
            if d
            else ""
        )
        lines.append(
            f"| {name} | {_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['min'])}-{_fmt(s['max'])}) | {pair} |"
        )
    return "\n".join(lines)


def update_readme(readme: Path, name: str, table: str) -> bool:
    """Puts ``table`` between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` in ``readme``.

    Why: a front page's figures are typed by hand and go stale. The study
    writes its own table there instead; a README without the markers is left
    alone (False), so a user's own README is never rewritten.
    """
    start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return True


def plot_seeds(report: Mapping[str, Any], path: Path) -> None:
    """Each variant's seeds as dots, the same seed joined across variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in report["variants"].items() if e["seeds"]]
    seeds = sorted({s for n in names for s in report["variants"][n]["seeds"]}, key=int)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 4))
    for s in seeds:
        ys = [report["variants"][n]["seeds"].get(s) for n in names]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [ys[i] for i in xs], "-o", alpha=0.7, label=f"seed {s}")
    for i, n in enumerate(names):
        summary = report["variants"][n][report["metric"]]
        ax.hlines(summary["mean"], i - 0.25, i + 0.25, colors="black", linewidth=2)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"test {report['metric']}")
    ax.set_title("seeds, paired across variants (bar: mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(quality: Mapping[str, Any], path: Path) -> None:
    """R2 and cosine of each stream per run group, train (open) and test (filled); below 0 is red.

    A stream whose R2 is negative on its own training clips hallucinates
    nothing, and shows as a red open marker under the zero line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = sorted({s for g in quality.values() for split in g.values() for s in split})
    if not streams:
        return
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2 + 1.2 * len(streams)), 5))
    for k, (ax, label) in enumerate(zip(axes, ("R2", "cosine"), strict=True)):
        for j, splits in enumerate(quality.values()):
            for split, filled in (("train", False), ("test", True)):
                values = [splits.get(split, {}).get(s, (math.nan, math.nan))[k] for s in streams]
                xs = np.arange(len(streams)) + 0.12 * j
                colours = ["tab:red" if k == 0 and v < 0 else f"C{j}" for v in values]
                ax.scatter(xs, values, c=colours if filled else "none", edgecolors=colours, s=30)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(
            range(len(streams)), [s.replace("/descriptor", "") for s in streams], rotation=60, fontsize=7
        )
        ax.set_title(f"{label} vs ground truth (mean over seeds)", fontsize=9)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", color=f"C{j}", markerfacecolor=f"C{j}" if filled else "none")
        for j in range(len(quality))
        for filled in (False, True)
    ]
    labels = [f"{group} {split}" for group in quality for split in ("train", "test")]
    fig.legend(
        handles, labels, fontsize=7, loc="lower center", ncol=4, title="red: below zero", title_fontsize=7
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, by_seed) in enumerate(curves.items()):
        for j, values in enumerate(by_seed.values()):
            ax.plot(
                range(1, len(values) + 1), values, color=f"C{i}", alpha=0.6, label=name if j == 0 else None
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    study: Path,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    command: str,
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """report.json, report.md and the plots, from what the finished runs wrote."""
    report = build_report(read_results(study, variants, seeds))
    quality = read_quality(study, variants, seeds)
    curves = read_curves(study, list(dict.fromkeys(v.group for v in variants)), seeds)
    report.update(command=command, seconds=dict(timings), quality=quality, curves=curves)
    (study / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (study / "report.md").write_text(report_markdown(report, command, timings))
    if report["variants"]:
        plot_seeds(report, study / "seeds.png")
    plot_quality(quality, study / "quality.png")
    if curves:
        plot_curves(curves, study / "curves.png")
    return report


# ---------------------------------------------------------------- running the grid


def run_commands(
    run: StudyRun, study: Path, common: Sequence[str], streams: Sequence[str] | None
) -> list[list[str]]:
    """The ``hallucinate train`` and ``evaluate`` command lines of one run."""
    import sys

    where = run.directory(study)
    train = [sys.executable, "-m", "pipelines.cli", "train", *common, f"run={where}", f"seed={run.seed}"]
    train += ["progress=false", *run.overrides]
    if run.group != MAIN:
        train.append("baseline=false")
    if run.drop is not None:
        kept = [s for s in streams or [] if not (s == run.drop or s.startswith(run.drop + "/"))]
        if len(kept) == len(streams or []):
            raise ConfigError(
                f"drop:{run.drop}: no stream of the main run is {run.drop!r} ({', '.join(streams or [])})"
            )
        if not kept:
            raise ConfigError(f"drop:{run.drop} leaves no stream: that model is the baseline variant")
        train.append("streams=" + ",".join(kept))
    evaluate = [sys.executable, "-m", "pipelines.cli", "evaluate", f"run={where}", "progress=false"]
    return [train, evaluate]


def execute(run: StudyRun, study: Path, common: Sequence[str], threads: int, log=print) -> tuple[bool, float]:
    """Trains and evaluates one run in child processes (their output in the run's study.log),
    with ``threads`` torch threads unless ``common`` sets them."""
    import subprocess
    import time

    where = run.directory(study)
    where.mkdir(parents=True, exist_ok=True)
    streams = None
    if run.drop is not None:
        main_eval = StudyRun(MAIN, run.seed, ()).directory(study) / "evaluation.json"
        if not main_eval.is_file():
            log(f"study: {where.name} needs the streams of {main_eval.parent.name}, which did not finish")
            return False, 0.0
        streams = json.loads(main_eval.read_text())["streams"]
    commands = run_commands(run, study, common, streams)
    if not any(a.startswith("threads=") for a in common):
        commands[0].append(f"threads={threads}")
    start = time.perf_counter()
    with open(where / "study.log", "a") as out:
        for command in commands:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
            if code:
                log(f"study: {where.name} failed (exit {code}); see {where / 'study.log'}")
                return False, time.perf_counter() - start
    return True, time.perf_counter() - start


def execute_on_worker(
    run: StudyRun, study: Path, common: Sequence[str]
) -> tuple[bool, float, list[str], str]:
    """``execute`` as a dask task: (ok, seconds, messages, where it ran).

    Why a task and not a job script per run: a study is embarrassingly
    parallel, and the cluster the extraction already uses (an existing
    scheduler, or SLURM/PBS through dask-jobqueue) places, retries and
    tears down workers for us. The run gets the worker's own thread count,
    and its messages come back to the client, which prints them; the study
    and store must be on a filesystem the workers share, as the extraction's
    store must.
    """
    import os
    import socket

    from distributed import get_worker

    messages: list[str] = []
    ok, seconds = execute(run, study, common, get_worker().state.nthreads, messages.append)
    return ok, seconds, messages, f"{socket.gethostname()} pid {os.getpid()}"
