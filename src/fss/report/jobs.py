"""The jobs of a multirun directory: what each one is, how it ended, which ones never ran.

A job directory is one with a ``metrics.json`` (written by the pipeline, or by the CLI with
``status: failed``) or a ``.hydra/`` folder (Hydra writes it when the job starts, so a job
that was killed or is still running has one but no ``metrics.json``). The jobs a sweep
should have are re-expanded from ``multirun.yaml`` (saved by Hydra's basic sweeper).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fss.utils.errors import ConfigError

# Fields of metrics.json that say which job it is (fss.checkpoints.job_identity).
IDENTITY_KEYS = ("model", "data", "backbone", "fold", "shot", "seed")
# Where those fields are in a job's composed config (.hydra/config.yaml).
CONFIG_KEYS = {"model": "model.name", "data": "data.name", "backbone": "backbone.name",
               "fold": "fold", "shot": "shot", "seed": "seed"}
NUMERIC_STATUSES = ("ok", "regression")  # a regression still has a score


@dataclass(frozen=True)
class Job:
    """One job of a sweep. ``metrics`` is None when it has no metrics.json yet."""

    name: str                    # the job directory, relative to the sweep directory
    identity: dict[str, Any]     # model, data, backbone, fold, shot, seed
    overrides: tuple[str, ...]   # Hydra's task overrides of this job
    metrics: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        """ok | regression | failed | no result."""
        if self.metrics is None:
            return "no result"
        return str(self.metrics.get("status", "ok"))

    @property
    def has_score(self) -> bool:
        return self.status in NUMERIC_STATUSES

    @property
    def error(self) -> str:
        """The failure in one line (metrics.json ``error``), or ''."""
        text = str((self.metrics or {}).get("error") or "")
        return text.strip().splitlines()[0] if text.strip() else ""


@dataclass
class Sweep:
    """The jobs found under a directory and the swept jobs that have no directory."""

    directory: Path
    jobs: list[Job]
    # The override list of every job multirun.yaml launches, when known.
    expected: list[tuple[str, ...]] | None = None

    @property
    def missing(self) -> list[tuple[str, ...]]:
        """Expected jobs with no directory (matched on their set of overrides)."""
        found = {frozenset(job.overrides) for job in self.jobs}
        return [o for o in self.expected or [] if frozenset(o) not in found]


def collect(directory: Path) -> Sweep:
    """Reads every job under ``directory`` (a multirun directory or a single run's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; pass a multirun directory, e.g. "
                          "logs/multiruns/<date_time>")
    job_dirs = {p.parent for p in directory.rglob("metrics.json")}
    job_dirs |= {p.parent.parent for p in directory.rglob(".hydra/overrides.yaml")}
    jobs = [_read_job(directory, d) for d in sorted(job_dirs, key=lambda d: _natural_key(
        d.relative_to(directory).as_posix()))]
    expected = expected_jobs(directory / "multirun.yaml")
    return Sweep(directory, jobs, None if expected is None else [tuple(o) for o in expected])


def expected_jobs(multirun_yaml: Path) -> list[list[str]] | None:
    """The override list of every job the sweep launches, in job order, as Hydra's basic
    sweeper expands them (``hydra.sweeper.params`` then the command line); None when the
    file is absent or the sweep is not the basic sweeper's (e.g. Optuna's)."""
    if not multirun_yaml.is_file():
        return None
    config = OmegaConf.load(multirun_yaml)
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def _read_job(root: Path, job_dir: Path) -> Job:
    name = job_dir.relative_to(root).as_posix() if job_dir != root else job_dir.name
    hydra_overrides = _hydra_overrides(job_dir)
    metrics_file = job_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as error:
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {error}"}
        identity = {key: metrics.get(key) for key in IDENTITY_KEYS}
        if any(value is None for value in identity.values()):
            identity = {**_identity_from_config(job_dir),
                        **{k: v for k, v in identity.items() if v is not None}}
        overrides = metrics.get("overrides") or hydra_overrides
        return Job(name, identity, tuple(overrides), metrics)
    return Job(name, _identity_from_config(job_dir), tuple(hydra_overrides), None)


def _hydra_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.load(path)]


def _identity_from_config(job_dir: Path) -> dict[str, Any]:
    """Identity of a job without metrics.json, from the config Hydra saved at its start."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return dict.fromkeys(IDENTITY_KEYS)
    config = OmegaConf.load(path)
    return {key: OmegaConf.select(config, dotted, default=None,
                                  throw_on_resolution_failure=False)
            for key, dotted in CONFIG_KEYS.items()}


def _natural_key(text: str) -> list[Any]:
    """'10_fold2' after '9_fold1': numbers compare as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part)
            for part in re.split(r"(\d+)", text) if part]
