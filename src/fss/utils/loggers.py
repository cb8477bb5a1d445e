"""Logger factories used from the Hydra configs (conf/logger/)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

# Top-level keys of the run config that become wandb config columns as they are.
DASHBOARD_KEYS = ("fold", "shot", "train_shot", "seed", "mode", "task_name", "eval_resolution")


def wandb_logger(
    project: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    save_dir: str = ".",
    tags: Sequence[str] = (),
    task_name: str | None = None,
    **kwargs: Any,
) -> DashboardWandbLogger:
    """A WandbLogger that runs offline (no account needed) unless a project is given.

    ``group`` defaults to the sweep (``<task_name>-<multirun dir name>``) so the jobs of
    one multirun share it; a single run has no group unless one is given. ``name`` (the
    job, e.g. ``fold0-1shot-seed0``) gets the job's ``model.net.*`` overrides appended, so
    the runs of an ablation sweep have different names.

    Offline runs are written under ``<save_dir>/wandb/offline-run-*``; upload them later
    with ``wandb sync <that folder>`` (docs/sweeps.md).
    """
    offline = project is None
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    overrides = _hydra_task_overrides()
    return DashboardWandbLogger(
        project=project or "fss",
        entity=entity,
        group=group or sweep_group(task_name),
        name=job_name(name, overrides) if name else None,
        save_dir=save_dir,
        tags=list(tags),
        offline=offline,
        **kwargs,
    )


class DashboardWandbLogger(WandbLogger):
    """Logs a run config as flat, pivotable columns (:func:`dashboard_config`) plus the full
    config under ``cfg``; any other hyperparameters are logged as they are."""

    def log_hyperparams(self, params: Any) -> None:
        if isinstance(params, Mapping) and _is_run_config(params):
            params = {**dashboard_config(params), "cfg": dict(params)}
        super().log_hyperparams(params)


def dashboard_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The columns a sweep dashboard pivots on: model, data, backbone names, fold, shot,
    seed, ... and every scalar of ``model.net`` (the ablation switches) as
    ``model.net.<key>``."""
    flat: dict[str, Any] = {
        "model": config["model"].get("name"),
        "data": (config.get("data") or {}).get("name"),
        "backbone": (config.get("backbone") or {}).get("name"),
    }
    flat.update({key: config[key] for key in DASHBOARD_KEYS if key in config})
    net = config["model"].get("net") or {}
    for key, value in net.items():
        if not key.startswith("_") and (value is None or isinstance(value, bool | int | float | str)):
            flat[f"model.net.{key}"] = value
    return flat


def sweep_group(task_name: str | None) -> str | None:
    """``<task_name>-<multirun directory name>`` inside a Hydra multirun job, else None."""
    from hydra.types import RunMode

    config = _hydra_config()
    if config is None or config.mode != RunMode.MULTIRUN:
        return None
    sweep = Path(str(config.sweep.dir)).name
    return f"{task_name}-{sweep}" if task_name else sweep


def job_name(name: str, overrides: Sequence[str]) -> str:
    """``name`` plus the job's ``model.net.*`` overrides, e.g. ``fold0-1shot-seed0
    num_stages=2``."""
    switches = [o.removeprefix("model.net.") for o in overrides if o.startswith("model.net.")]
    return " ".join([name, *switches])


def _is_run_config(params: Mapping[str, Any]) -> bool:
    model = params.get("model")
    return isinstance(model, Mapping) and "name" in model and "fold" in params


def _hydra_config() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _hydra_task_overrides() -> list[str]:
    config = _hydra_config()
    return [] if config is None else [str(o) for o in config.overrides.task]
