"""``fss-compare RUN_A RUN_B``: is B better than A on the same test episodes?

Both arguments are run directories (a ``metrics.json`` and ``episodes.csv``) or multirun
directories (every job below them). Jobs are paired by (dataset, fold, shot); within a job,
by test seed and episode index. The runs must have been tested on the same episodes under
the same protocol: the same folds and shots, the same protocol settings
(metrics.json ``protocol``) and, episode by episode, the same class, query and supports;
otherwise the command refuses, naming the first difference.

Statistic: Δ = B − A of mIoU and FB-IoU, per fold (the mean over its test seeds) and
overall (the mean over folds, as a paper's mean), with a 95 % interval from a paired
bootstrap over episodes: each resample draws the episodes of every (fold, seed) with
replacement, the same draw for A and B, and recomputes both metrics by class-wise
accumulation over the drawn episodes (``fss.metrics.episodes``), as the metric itself
does. The interval is the 2.5 and 97.5 percentiles of the resampled Δ. The bootstrap is
seeded (``--seed``), so the same runs give the same interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fss.metrics import episodes
from fss.utils.errors import ConfigError

METRICS = ("mIoU", "FB-IoU")
# data_settings (metrics.json) that change the test images themselves beyond the protocol
# record (synthetic scenes: their level, colour and size).
SCENE_SETTINGS = ("data.image_size", "data.level", "data.colour", "data.fold_scheme")
CHUNK = 250  # resamples per block (bounds the (resamples, episodes) weight matrix)


@dataclass
class RunJob:
    """One tested job: where it is, what it is, its episodes per test seed."""

    path: Path
    key: tuple[str, int, int]         # (dataset, fold, shot)
    protocol: Any
    groups: dict[Any, list[dict[str, Any]]]


def find_jobs(directory: Path, label: str) -> dict[tuple[str, int, int], RunJob]:
    """The tested jobs under ``directory`` keyed by (dataset, fold, shot)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{label} {directory} is not a directory; pass a run or multirun "
                          "directory")
    files = ([directory / "metrics.json"] if (directory / "metrics.json").is_file()
             else sorted(directory.rglob("metrics.json")))
    if not files:
        raise ConfigError(f"{label} {directory} holds no metrics.json; pass a tested run or "
                          "multirun directory")
    jobs: dict[tuple[str, int, int], RunJob] = {}
    for file in files:
        metrics = json.loads(file.read_text())
        if metrics.get("status", "ok") not in ("ok", "regression"):
            continue
        csv = file.parent / episodes.FILENAME
        if not csv.is_file():
            raise ConfigError(f"{label}: {csv} does not exist; re-test the run (every test "
                              "writes episodes.csv next to metrics.json)")
        key = (str(metrics.get("data")), int(metrics.get("fold", 0)), int(metrics.get("shot", 1)))
        if key in jobs:
            raise ConfigError(f"{label}: two jobs test {_name(key)} ({jobs[key].path} and "
                              f"{file.parent}); compare one of them at a time")
        jobs[key] = RunJob(file.parent, key, test_settings(metrics),
                           episodes.by_seed(episodes.read(csv)))
    if not jobs:
        raise ConfigError(f"{label} {directory}: no job finished with a score")
    return jobs


def test_settings(metrics: dict[str, Any]) -> dict[str, Any]:
    """The protocol record (metrics.json ``protocol``) and the scene settings of a job."""
    settings = dict(metrics.get("protocol") or {})
    recorded = metrics.get("data_settings") or {}
    settings.update({k: recorded[k] for k in SCENE_SETTINGS if k in recorded})
    return settings


def _name(key: tuple[str, int, int]) -> str:
    return f"{key[0]} fold {key[1]} {key[2]}-shot"


def check_same_episodes(a: dict, b: dict) -> None:
    """ConfigError naming the first difference of jobs, protocols or episodes."""
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        where = (f"RUN_A has {_name(only_a[0])} and RUN_B not" if only_a
                 else f"RUN_B has {_name(only_b[0])} and RUN_A not")
        raise ConfigError(f"the runs test different folds or shots: {where}")
    for key in sorted(a):
        job_a, job_b = a[key], b[key]
        if job_a.protocol != job_b.protocol:
            setting = _first_difference(job_a.protocol, job_b.protocol)
            raise ConfigError(f"{_name(key)}: the runs use different protocols ({setting}); "
                              "compare runs tested under one protocol")
        if list(job_a.groups) != list(job_b.groups):
            raise ConfigError(f"{_name(key)}: the runs use different test seeds "
                              f"({list(job_a.groups)} vs {list(job_b.groups)})")
        for seed, rows_a in job_a.groups.items():
            rows_b = job_b.groups[seed]
            if len(rows_a) != len(rows_b):
                raise ConfigError(f"{_name(key)} test seed {seed}: {len(rows_a)} episodes in "
                                  f"RUN_A, {len(rows_b)} in RUN_B")
            for row_a, row_b in zip(rows_a, rows_b, strict=True):
                for column in episodes.IDENTITY:
                    if row_a[column] != row_b[column]:
                        raise ConfigError(
                            f"{_name(key)} test seed {seed}: the episodes differ from index "
                            f"{row_a['index']} on ({column}: {row_a[column]!r} in RUN_A, "
                            f"{row_b[column]!r} in RUN_B); compare runs tested on the same "
                            "episodes (same protocol, data.episodes, test seed and shots)")


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                return f"{name}: {a.get(name)!r} vs {b.get(name)!r}"
    return f"{a!r} vs {b!r}"


def _group_scores(classes: np.ndarray, counts: np.ndarray, weights: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """mIoU and FB-IoU (R,) of R weightings (R, N) of N episodes, class-wise accumulated."""
    labels = np.unique(classes)
    sums = np.stack([weights[:, classes == c] @ counts[classes == c] for c in labels], 1)
    seen = np.stack([weights[:, classes == c].sum(1) > 0 for c in labels], 1)
    return episodes.scores_from_sums(sums, seen)


def bootstrap(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per fold key and ``overall``: the mIoU / FB-IoU of A and B, Δ = B − A and the 95 %
    bootstrap interval of Δ (see the module docstring)."""
    if resamples < 1:
        raise ConfigError(f"--resamples={resamples} must be >= 1")
    rng = np.random.default_rng(seed)
    keys = sorted(a)
    results: dict[str, Any] = {}
    # Resampled Δ per fold, (resamples,) per metric; point values on all episodes.
    resampled: dict[tuple, dict[str, np.ndarray]] = {}
    for key in keys:
        sums = {run: {m: np.zeros(resamples) for m in METRICS} for run in "AB"}
        point = {run: {m: 0.0 for m in METRICS} for run in "AB"}
        seeds = list(a[key].groups)
        for seed_key in seeds:
            rows = {"A": a[key].groups[seed_key], "B": b[key].groups[seed_key]}
            classes, _ = episodes.count_arrays(rows["A"])
            count = len(classes)
            arrays = {run: episodes.count_arrays(r)[1] for run, r in rows.items()}
            for run in "AB":
                whole = _group_scores(classes, arrays[run], np.ones((1, count)))
                for metric, value in zip(METRICS, whole, strict=True):
                    point[run][metric] += float(value[0]) / len(seeds)
            for start in range(0, resamples, CHUNK):
                size = min(CHUNK, resamples - start)
                draws = rng.integers(0, count, size=(size, count))
                weights = np.stack([np.bincount(d, minlength=count) for d in draws]).astype(float)
                for run in "AB":
                    scored = _group_scores(classes, arrays[run], weights)
                    for metric, value in zip(METRICS, scored, strict=True):
                        sums[run][metric][start:start + size] += value / len(seeds)
        resampled[key] = {m: sums["B"][m] - sums["A"][m] for m in METRICS}
        results[_name(key)] = _summary(point, resampled[key])
    overall_point = {run: {m: float(np.mean([results[_name(k)][run][m] for k in keys]))
                           for m in METRICS} for run in "AB"}
    overall = {m: np.mean([resampled[k][m] for k in keys], axis=0) for m in METRICS}
    results["overall"] = _summary(overall_point, overall)
    return results


def _summary(point: dict[str, dict[str, float]], deltas: dict[str, np.ndarray]) -> dict:
    summary: dict[str, Any] = {"A": point["A"], "B": point["B"], "delta": {}}
    for metric in METRICS:
        low, high = np.percentile(deltas[metric], [2.5, 97.5])
        summary["delta"][metric] = {"value": point["B"][metric] - point["A"][metric],
                                    "low": float(low), "high": float(high)}
    return summary


def compare(run_a: Path, run_b: Path, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    jobs_a = find_jobs(run_a, "RUN_A")
    jobs_b = find_jobs(run_b, "RUN_B")
    check_same_episodes(jobs_a, jobs_b)
    return bootstrap(jobs_a, jobs_b, resamples, seed)


def format_table(results: dict[str, Any], resamples: int) -> str:
    lines = [f"{'':28} {'mIoU A':>7} {'mIoU B':>7} {'ΔmIoU [95 % interval]':>26} "
             f"{'ΔFB-IoU [95 % interval]':>26}"]
    for name, row in results.items():
        cells = []
        for metric in METRICS:
            d = row["delta"][metric]
            cells.append(f"{d['value']:+6.2f} [{d['low']:+6.2f}, {d['high']:+6.2f}]")
        lines.append(f"{name:28} {row['A']['mIoU']:7.2f} {row['B']['mIoU']:7.2f} "
                     f"{cells[0]:>26} {cells[1]:>26}")
    lines.append(f"Δ = RUN_B − RUN_A; paired bootstrap over episodes, {resamples} resamples, "
                 "class-wise accumulation in each")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fss-compare",
        description="Paired comparison of two runs tested on the same episodes: ΔmIoU and "
                    "ΔFB-IoU (B − A) per fold and overall with a 95 %% bootstrap interval.")
    parser.add_argument("run_a", type=Path, help="run or multirun directory A")
    parser.add_argument("run_b", type=Path, help="run or multirun directory B")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        results = compare(args.run_a, args.run_b, args.resamples, args.seed)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_table(results, args.resamples))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
