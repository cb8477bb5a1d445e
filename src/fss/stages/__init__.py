"""Stages: what a model needs trained before it is built, cached and shared between runs.

A model config lists its stages in order (``model.stages``: ``[trunk]`` for HSNet and the
prototype baseline, ``[base_learner]`` for HDMNet and ``model=pspnet``); the pipeline checks
them before anything is built and runs them (:func:`run_stages`). Each stage goes through one
cache (:mod:`fss.stages.cache`: key → lock → train → atomic save → meta → RNG kept).

- ``trunk`` (:mod:`fss.stages.trunk`): the backbone trained on the fold's base classes, when
  ``backbone.weights=pretrain`` (the synthetic benchmark's default);
- ``base_learner`` (:mod:`fss.stages.base_learner`): HDMNet's frozen PSPNet.

A model whose job is its last stage (``model.net: null``, e.g. ``model=pspnet``) runs that
stage as the job (:func:`run_stage_job`).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from fss.stages.cache import Artifact, Stage, obtain, preserved_rng, stage_key
from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Artifact", "Stage", "check_stages", "model_stages", "obtain", "preserved_rng",
           "run_stage_job", "run_stages", "stage_key"]


def _registry() -> dict[str, Stage]:
    # Imported on use: the stages import Lightning and the model zoo.
    from fss.stages.base_learner import BASE_LEARNER
    from fss.stages.trunk import TRUNK

    return {stage.name: stage for stage in (TRUNK, BASE_LEARNER)}


def model_stages(cfg: DictConfig) -> list[Stage]:
    """The stages ``model.stages`` lists, in order; an unknown name is a ConfigError."""
    names = list(cfg.model.get("stages") or [])
    registry = _registry()
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(f"model.stages={names}: unknown stage {unknown[0]!r}; accepted: "
                          f"{', '.join(registry)}")
    return [registry[name] for name in names]


def check_stages(cfg: DictConfig) -> None:
    """Each listed stage's own checks (backbone, sizes ...), before anything is built; and
    ``backbone.weights=pretrain`` only for a network built by the trunk stage."""
    stages = model_stages(cfg)
    for stage in stages:
        stage.check(cfg)
    net = cfg.model.get("net")
    names = [stage.name for stage in stages]
    if cfg.backbone.get("weights") == "pretrain" and not names and net is not None \
            and "weights" in net:
        raise ConfigError(f"backbone.weights=pretrain but model={cfg.model.name} lists no trunk "
                          f"stage (model.stages={names}); use backbone.weights=imagenet|none|"
                          "<file>, or model.stages=[trunk]")


def run_stages(cfg: DictConfig) -> str | None:
    """Runs (or reuses) the model's stages in order; returns the weights file the network
    is built with: the last applicable stage's output, else ``backbone.weights`` (None for
    ``none``). A run given ``ckpt_path`` (test or resume) restores every weight from it, so
    neither a stage nor a weights file is needed."""
    if cfg.get("ckpt_path"):
        log.info("ckpt_path given: the weights come from %s (no stage runs)", cfg.ckpt_path)
        return None
    weights = cfg.backbone.get("weights")
    for stage in model_stages(cfg):
        if stage.applies(cfg):
            weights = obtain(stage, cfg).path
    return None if weights in (None, "none") else str(weights)


def run_stage_job(cfg: DictConfig) -> dict[str, Any]:
    """``model.net: null``: the job is the model's last stage (``model=pspnet``)."""
    stages = model_stages(cfg)
    job = getattr(stages[-1], "job", None) if stages else None
    if job is None:
        raise ConfigError(f"model={cfg.model.name} has no network (model.net) and no stage "
                          "that runs as a job; list one in model.stages")
    return job(cfg)
