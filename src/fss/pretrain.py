"""Stage 1 (when ``backbone.weights=pretrain``): train the backbone on the fold's base classes.

The trained trunk is saved in torchvision's key layout under
``<paths.cache_dir>/pretrain/<data>-fold<k>-<backbone>-<hash>/backbone.pth`` and reused by
every later run (HSNet, the prototype baseline, any shot) with the same data, fold,
backbone and pretraining recipe. Novel classes are never seen: their pixels are background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from fss.lightning import SegmentationModule
from fss.lightning.callbacks import display_callbacks
from fss.models.segmenter import PyramidSegmenter
from fss.utils.filelock import file_lock
from fss.utils.ranks import is_global_zero

log = logging.getLogger(__name__)
DEFAULT_HEAD_LEVELS = (2, 3, 4)


def pretrain_key(cfg: DictConfig) -> str:
    """Cache key: everything that changes the trained trunk, nothing that does not."""
    semantic = OmegaConf.to_container(cfg.data.semantic, resolve=True)
    semantic.pop("num_workers", None)
    recipe = {
        "source": OmegaConf.to_container(cfg.data.source, resolve=True),
        "semantic": semantic,
        "pretrain": _pretrain_recipe(cfg),
        "backbone": cfg.backbone.name,
        # A fast_dev_run/limited trunk must never be reused by a real run.
        "limits": {k: cfg.trainer.get(k) for k in ("fast_dev_run", "limit_train_batches")},
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.name}-fold{cfg.fold}-{cfg.backbone.name}-{digest}"


def _pretrain_recipe(cfg: DictConfig) -> dict:
    recipe = OmegaConf.to_container(cfg.pretrain, resolve=True)
    if sorted(recipe.get("head_levels", DEFAULT_HEAD_LEVELS)) == list(DEFAULT_HEAD_LEVELS):
        recipe.pop("head_levels", None)  # trunks cached before the option existed stay valid
    return recipe


def pretrained_backbone_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.cache_dir) / "pretrain" / pretrain_key(cfg) / "backbone.pth"


def ensure_pretrained_backbone(cfg: DictConfig) -> Path:
    """Returns the cached trunk for this config, training it first if it does not exist."""
    path = pretrained_backbone_path(cfg)
    if not is_global_zero():
        # A DDP rank > 0: rank 0 holds the lock while its fit waits for this process to join,
        # so train along without the lock; rank 0 saves the trunk (see _train_backbone).
        if not path.exists():
            _train_backbone(cfg, path)
        return path
    with file_lock(path.parent.with_suffix(".lock")):
        if path.exists():
            log.info("Reusing base-class pretrained backbone %s", path)
            return path
        log.info("No cached base-class backbone for %s: training it now (stage 'pretrain')",
                 pretrain_key(cfg))
        _train_backbone(cfg, path)
    return path


def _train_backbone(cfg: DictConfig, path: Path) -> None:
    datamodule = instantiate(cfg.data.semantic)
    num_classes = datamodule.num_labels
    net = PyramidSegmenter(cfg.backbone.name, num_classes, head_channels=cfg.pretrain.head_channels,
                           init_weights=cfg.pretrain.init_weights,
                           head_levels=tuple(cfg.pretrain.get("head_levels", DEFAULT_HEAD_LEVELS)))
    module = SegmentationModule(
        net,
        num_classes=num_classes,
        optimizer=instantiate(cfg.pretrain.optimizer),
        scheduler=instantiate(cfg.pretrain.scheduler) if cfg.pretrain.scheduler else None,
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(
        max_epochs=cfg.pretrain.max_epochs,
        enable_checkpointing=False,
        logger=CSVLogger(cfg.paths.output_dir, name="pretrain"),
        callbacks=display_callbacks(cfg),
    )
    trainer_cfg.pop("max_steps", None)
    trainer: L.Trainer = instantiate(trainer_cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    val_miou = trainer.callback_metrics.get("pretrain/val_miou")
    if not trainer.is_global_zero:  # under DDP rank 0 writes the trunk; wait until it has
        trainer.strategy.barrier("pretrained-backbone-saved")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.backbone_state_dict(), tmp)
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written trunk behind
    meta = {
        "key": pretrain_key(cfg),
        "backbone": cfg.backbone.name,
        "fold": cfg.fold,
        "data": cfg.data.name,
        "base_classes": list(datamodule.base_classes),
        "val_miou_base": float(val_miou) if val_miou is not None else None,
        "seconds": round(elapsed, 1),
        "fast_dev_run": bool(trainer_cfg.get("fast_dev_run")),
    }
    (path.parent / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("Pretrained backbone saved to %s (base-class val mIoU %s, %.0f s)",
             path, meta["val_miou_base"], elapsed)
    trainer.strategy.barrier("pretrained-backbone-saved")
