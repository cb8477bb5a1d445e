"""A sweep's jobs as paper-style rows: one row per (model, data, backbone, shot, variant),
one column per fold, the mean over folds, FB-IoU, the paper's number and the difference.

The variant of a job is its overrides of keys whose value differs between the jobs of the
sweep (e.g. ``model.net.num_stages=2`` in an ablation sweep), except the row and column keys
themselves and paths, followed by the data settings its metrics.json records
(``data_settings``: image size, level, colour, episodes per split, test seeds ...) that differ
between the jobs recording them, written as the override that sets them (e.g.
``data.module.train_episodes=640``), so two jobs on different data never share a row. The paper's numbers come from each job's metrics.json ``paper`` block
(the experiment file's ``paper:``; see conf/config.yaml).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from fss.report.jobs import Job, Sweep

FOLDS = (0, 1, 2, 3)
# Override keys never used to tell rows apart: they are columns, row keys, or locations.
NOT_VARIANT_KEYS = ("fold", "shot", "model", "data", "backbone")
NOT_VARIANT_PREFIXES = ("paths.", "hydra.")


@dataclass
class Row:
    model: str
    data: str
    backbone: str
    shot: int | None
    variant: str
    jobs: dict[int, Job] = field(default_factory=dict)   # fold -> the job shown
    unshown: list[Job] = field(default_factory=list)     # a repeated fold, or fold unknown

    @property
    def label(self) -> str:
        text = f"{self.model} / {self.data} / {self.backbone} / {self.shot}-shot"
        return f"{text} / {self.variant}" if self.variant else text

    @property
    def scored_folds(self) -> list[int]:
        return sorted(f for f, job in self.jobs.items() if job.has_score)

    def fold_miou(self, fold: int) -> float | None:
        job = self.jobs.get(fold)
        return float(job.metrics["mIoU"]) if job is not None and job.has_score else None

    @property
    def mean(self) -> float | None:
        values = [self.fold_miou(f) for f in self.scored_folds]
        return _mean(values)

    @property
    def fbiou(self) -> float | None:
        values = [float(self.jobs[f].metrics.get("FB-IoU", math.nan)) for f in self.scored_folds]
        return _mean([v for v in values if not math.isnan(v)])

    # -- the paper ------------------------------------------------------------------------
    @property
    def paper(self) -> dict[str, Any] | None:
        """The first ``paper`` block among the row's jobs."""
        for job in self.jobs.values():
            block = (job.metrics or {}).get("paper")
            if isinstance(block, dict):
                return block
        return None

    @property
    def targets(self) -> dict[str, float]:
        """The paper's numbers for this row's shot, keyed '0'..'3', 'mean', 'fbiou'."""
        numbers = shot_targets(self.paper, self.shot)
        return {str(k): float(v) for k, v in numbers.items() if v is not None}

    @property
    def expected_folds(self) -> list[int]:
        """The folds the paper reports for this shot; else all four, or the folds run when
        the paper has a single number (e.g. FSS-1000)."""
        per_fold = sorted(int(k) for k in self.targets if k.isdigit())
        if per_fold:
            return per_fold
        if self.targets:
            return sorted(self.jobs)
        return list(FOLDS)

    @property
    def paper_miou(self) -> float | None:
        """The paper's mean when every fold it reports was scored here; else the mean of its
        per-fold numbers over the folds scored here (see :attr:`paper_is_partial`)."""
        scored = self.scored_folds
        if not scored:
            return None
        if set(self.expected_folds) <= set(scored) and "mean" in self.targets:
            return self.targets["mean"]
        if all(str(f) in self.targets for f in scored):
            return _mean([self.targets[str(f)] for f in scored])
        return None

    @property
    def paper_is_partial(self) -> bool:
        return self.paper_miou is not None and not set(self.expected_folds) <= set(self.scored_folds)

    @property
    def delta(self) -> float | None:
        if self.mean is None or self.paper_miou is None:
            return None
        return self.mean - self.paper_miou

    @property
    def paper_fbiou(self) -> float | None:
        return self.targets.get("fbiou")

    # -- test seeds ----------------------------------------------------------------------
    def _seed_series(self) -> list[list[float]] | None:
        """Per scored fold, its per-seed mIoU (``seeds`` of a multi-seed metrics.json);
        None when a fold has a single seed or the folds have different seed lists."""
        series, seed_lists = [], []
        for fold in self.scored_folds:
            seeds = self.jobs[fold].metrics.get("seeds")
            if not isinstance(seeds, list) or len(seeds) < 2:
                return None
            series.append([float(s["mIoU"]) for s in seeds])
            seed_lists.append([s.get("seed") for s in seeds])
        if not series or any(s != seed_lists[0] for s in seed_lists):
            return None
        return series

    @property
    def seed_count(self) -> int | None:
        """N of a multi-seed row (every fold tested on the same N seeds), else None."""
        series = self._seed_series()
        return None if series is None else len(series[0])

    @property
    def mean_ci95(self) -> float | None:
        """Half-width of the 95 % Student-t interval of the mean over folds, over seeds
        (the mean over folds is taken seed by seed, then its spread over the N seeds)."""
        series = self._seed_series()
        if series is None:
            return None
        per_seed = [sum(values) / len(values) for values in zip(*series, strict=True)]
        return ci95_half_width(per_seed)

    @property
    def best_of_n(self) -> float | None:
        """The mean over folds of each fold's best seed: what "best of N" papers report;
        shown only labelled as such, next to the mean."""
        series = self._seed_series()
        return None if series is None else _mean([max(values) for values in series])

    # -- protocol ------------------------------------------------------------------------
    @property
    def protocol(self) -> dict[str, Any] | None:
        for fold in self.scored_folds:
            record = self.jobs[fold].metrics.get("protocol")
            if isinstance(record, dict):
                return record
        return None

    @property
    def protocol_label(self) -> str:
        """The protocol in one cell: name, input size, where scored, boundary, episode
        stream (docs/protocols.md); empty for data without a protocol (synthetic)."""
        record = self.protocol
        if record is None:
            return ""
        boundary = "255 ignored" if record.get("ignore_boundary", True) else "255 scored as bg"
        return (f"{record.get('name')} {record.get('image_size')}² "
                f"{record.get('eval_resolution')}-size {boundary} "
                f"{record.get('episodes', 'seeded')}")


def ci95_half_width(values: list[float]) -> float | None:
    """Half-width of the 95 % Student-t interval of the mean of ``values`` (None for one)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return float(stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values)))


def shot_targets(paper: dict[str, Any] | None, shot: Any) -> dict[Any, Any]:
    """The numbers of ``paper.targets`` for one job: keyed by shot, then fold / mean / fbiou;
    when the block has ``by`` (``{setting: the job's value}``, e.g. ``{model.net.kernel:
    dense}``, resolved by each job), the targets are keyed by those values first, in that
    order. {} when the paper has no number for this job."""
    node: Any = (paper or {}).get("targets") or {}
    for value in ((paper or {}).get("by") or {}).values():
        if not isinstance(node, dict):
            return {}
        node = next((v for k, v in node.items() if same_value(k, value)), {})
    if not isinstance(node, dict):
        return {}
    numbers = next((v for k, v in node.items() if same_value(k, shot)), None)
    return numbers if isinstance(numbers, dict) else {}


def same_value(key: Any, value: Any) -> bool:
    """A targets key (as written in YAML, or a string after metrics.json) names ``value``:
    ``true`` / True, ``"1.0"`` / 1, ``"[3,4]"`` / [3, 4]."""
    return _canonical(key) == _canonical(value)


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return tuple(_canonical(v) for v in value)
    return str(value)


def build_rows(sweep: Sweep) -> list[Row]:
    """Rows in the order their first job appears; a fold's first job is shown, a further
    job of the same row and fold (or one whose fold is unknown) is kept in ``unshown``."""
    variants = _variants(sweep.jobs)
    rows: dict[tuple, Row] = {}
    for job in sweep.jobs:
        identity = job.identity
        key = (str(identity["model"]), str(identity["data"]), str(identity["backbone"]),
               identity["shot"], variants[job.name])
        row = rows.setdefault(key, Row(*key))
        fold = identity["fold"]
        if not isinstance(fold, int) or fold in row.jobs:
            row.unshown.append(job)
        else:
            row.jobs[fold] = job
    return list(rows.values())


def _variants(jobs: list[Job]) -> dict[str, str]:
    parsed = {job.name: _override_dict(job.overrides) for job in jobs}
    keys = sorted({k for overrides in parsed.values() for k in overrides})
    differing = [k for k in keys if len({o.get(k) for o in parsed.values()}) > 1]
    # Data settings: compared among the jobs that record them (a failure record or an older
    # metrics.json says nothing about its data); a differing override already shows its key.
    settings = {job.name: _data_settings(job) for job in jobs}
    recorded = [s for s in settings.values() if s]
    setting_keys = [k for k in dict.fromkeys(k for s in recorded for k in s) if k not in differing]
    differing_settings = [k for k in setting_keys if len({s.get(k) for s in recorded}) > 1]
    variants = {}
    for name, o in parsed.items():
        parts = [f"{k}={o[k]}" for k in differing if k in o]
        parts += [f"{k}={settings[name][k]}" for k in differing_settings if k in settings[name]]
        variants[name] = " ".join(parts)
    return variants


def _data_settings(job: Job) -> dict[str, str]:
    """The job's ``data_settings`` (fss.checkpoints.data_settings) as override text."""
    recorded = (job.metrics or {}).get("data_settings")
    if not isinstance(recorded, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
            for k, v in recorded.items()}


def _override_dict(overrides: tuple[str, ...]) -> dict[str, str]:
    result = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or key in NOT_VARIANT_KEYS or key.startswith(NOT_VARIANT_PREFIXES):
            continue
        result[key] = value
    return result


def _mean(values: list[float | None]) -> float | None:
    numbers = [v for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None
