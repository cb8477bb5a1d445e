"""The run: validate config → (pretrain stage) → build → fit → test → metrics.json.

``run.py`` calls :func:`run` from a Hydra main; tests call it with composed configs.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fss.lightning import FewShotModule
from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

# Frozen backbones are in eval mode on purpose (HSNet/HDMNet recipes).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*does not have many workers")

MODES = ("train", "test")


def validate(cfg: DictConfig) -> None:
    """Cheap checks that would otherwise fail deep inside a worker or torch."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not supported; accepted: {', '.join(MODES)}")
    if not isinstance(cfg.fold, int) or not 0 <= cfg.fold <= 3:
        raise ConfigError(f"fold={cfg.fold!r} is out of range; accepted: 0, 1, 2, 3")
    for key in ("shot", "train_shot"):
        value = cfg[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be an integer >= 1")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass a .ckpt file "
                          "(e.g. <run dir>/checkpoints/last.ckpt)")
    weights = cfg.backbone.weights
    special = {None, "none", "imagenet", "pretrain"}
    if weights not in special and not Path(str(weights)).is_file():
        raise ConfigError(f"backbone.weights={weights} is not a file; accepted: none, imagenet, "
                          "pretrain, or the path of a torchvision-format state dict")


def resolve_backbone_weights(cfg: DictConfig) -> str | None:
    """The weights file the model is built with.

    A model config may name its own stage with ``weights_stage`` (a dotted function
    ``cfg -> path``, e.g. HDMNet's base-learner stage); otherwise ``backbone.weights=pretrain``
    runs the generic base-class backbone pretraining.
    """
    stage = cfg.model.get("weights_stage")
    if stage:
        from hydra.utils import get_method

        return str(get_method(stage)(cfg))
    weights = cfg.backbone.weights
    if weights == "pretrain":
        from fss.pretrain import ensure_pretrained_backbone

        return str(ensure_pretrained_backbone(cfg))
    return None if weights in (None, "none") else str(weights)


def build_model(cfg: DictConfig, weights: str | None) -> torch.nn.Module:
    overrides = {"weights": weights} if "weights" in cfg.model.net else {}
    return instantiate(cfg.model.net, **overrides)


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one job and returns (and writes) its metrics."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()

    datamodule = instantiate(cfg.data.module)
    weights = resolve_backbone_weights(cfg)
    net = build_model(cfg, weights)

    if hasattr(net, "calibrate"):
        from fss.models.proto import calibrate_on_base_episodes

        calibrate_on_base_episodes(net, datamodule, **cfg.model.get("calibration", {}))

    module = FewShotModule(
        net,
        optimizer=instantiate(cfg.model.optimizer) if cfg.model.get("optimizer") else None,
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        eval_class_ids=datamodule.novel_classes,
        base_class_ids=datamodule.base_classes,
    )
    loggers = _instantiate_all(cfg.get("logger"))
    trainable = bool(cfg.model.get("trainable", True))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not trainable or cfg.mode == "test":
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(_loggable_config(cfg))

    test_ckpt = None
    fit_seconds = 0.0
    if cfg.mode == "train" and trainable:
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        fit_seconds = time.perf_counter() - fit_start
        test_ckpt = _best_checkpoint(trainer)
    elif cfg.mode == "test":
        test_ckpt = cfg.ckpt_path

    test_start = time.perf_counter()
    results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
    test_seconds = time.perf_counter() - test_start
    scores = results[0] if results else {}
    metrics = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "fold": cfg.fold,
        "shot": cfg.shot,
        "train_shot": cfg.train_shot,
        "seed": cfg.seed,
        "episodes": int(scores.get("test/episodes", 0)),
        "mIoU": round(float(scores.get("test/miou", float("nan"))), 2),
        "FB-IoU": round(float(scores.get("test/fbiou", float("nan"))), 2),
        "class_iou": {k.split("class")[-1]: round(v, 2) for k, v in scores.items()
                      if k.startswith("test/iou_class")},
        "mode": cfg.mode,
        "checkpoint": str(test_ckpt) if test_ckpt else None,
        "fit_seconds": round(fit_seconds, 1),
        "test_seconds": round(test_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "tags": list(cfg.get("tags") or []),
        "status": "ok",
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("Wrote %s", output_dir / "metrics.json")
    return metrics


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best-validation checkpoint if one was kept, else the weights in memory."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_path", ""):
        return callback.best_model_path
    return None


def _loggable_config(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    return container


def print_summary(metrics: dict[str, Any]) -> None:
    """A clear final table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['model']} on {metrics['data']} — fold {metrics['fold']}, "
                        f"{metrics['shot']}-shot, backbone {metrics['backbone']}")
    for column in ("mIoU", "FB-IoU", "episodes", "fit time", "test time", "total time"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{metrics['mIoU']:.2f}", f"{metrics['FB-IoU']:.2f}", str(metrics["episodes"]),
        f"{metrics['fit_seconds']:.0f} s", f"{metrics['test_seconds']:.0f} s",
        f"{metrics['total_seconds']:.0f} s",
    )
    Console().print(table)
