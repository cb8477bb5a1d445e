"""Stage ``trunk``: the backbone trained on the fold's base classes (``backbone.weights=pretrain``).

The trained trunk is saved in torchvision's key layout under
``<paths.cache_dir>/pretrain/<data>-fold<k>-<backbone>-<hash>/backbone.pth`` and reused by
every later run (HSNet, the prototype baseline, any shot) with the same data, fold,
backbone and pretraining recipe (the ``pretrain`` config node). Novel classes are never
seen: their pixels are background.
"""

from __future__ import annotations

import time
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fss.lightning import SegmentationModule
from fss.lightning.segmentation_module import check_low_resolution
from fss.models.segmenter import PyramidSegmenter
from fss.stages.cache import Stage, StageContext
from fss.stages.training import stage_trainer
from fss.utils.errors import ConfigError

DEFAULT_HEAD_LEVELS = (2, 3, 4)
# The value of backbone.weights that asks for this stage.
PRETRAIN = "pretrain"


class TrunkStage(Stage):
    name = "trunk"
    description = "base-class pretrained backbone"
    folder = "pretrain"
    filename = "backbone.pth"

    def applies(self, cfg: DictConfig) -> bool:
        return cfg.backbone.get("weights") == PRETRAIN

    def check(self, cfg: DictConfig) -> None:
        try:
            check_low_resolution(_low_resolution(cfg))
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def key_payload(self, cfg: DictConfig) -> dict[str, Any]:
        semantic = OmegaConf.to_container(cfg.data.semantic, resolve=True)
        semantic.pop("num_workers", None)
        return {
            "source": OmegaConf.to_container(cfg.data.source, resolve=True),
            "semantic": semantic,
            "pretrain": _recipe(cfg),
            "backbone": cfg.backbone.name,
            # A fast_dev_run/limited trunk must never be reused by a real run.
            "limits": {k: cfg.trainer.get(k) for k in ("fast_dev_run", "limit_train_batches")},
        }

    def train(self, cfg: DictConfig, context: StageContext) -> None:
        datamodule = instantiate(cfg.data.semantic)
        num_classes = datamodule.num_labels
        recipe = cfg.pretrain
        net = PyramidSegmenter(cfg.backbone.name, num_classes, head_channels=recipe.head_channels,
                               init_weights=recipe.init_weights,
                               head_levels=tuple(recipe.get("head_levels", DEFAULT_HEAD_LEVELS)))
        module = SegmentationModule(
            net,
            num_classes=num_classes,
            optimizer=instantiate(recipe.optimizer),
            scheduler=instantiate(recipe.scheduler) if recipe.scheduler else None,
            low_resolution=_low_resolution(cfg),
        )
        trainer = stage_trainer(cfg, "pretrain", int(recipe.max_epochs))
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        elapsed = time.perf_counter() - start
        val_miou = trainer.callback_metrics.get("pretrain/val_miou")
        context.save(net.backbone_state_dict(), {
            "backbone": cfg.backbone.name,
            "fold": cfg.fold,
            "data": cfg.data.name,
            "base_classes": list(datamodule.base_classes),
            "val_miou_base": float(val_miou) if val_miou is not None else None,
            "seconds": round(elapsed, 1),
            "fast_dev_run": bool(cfg.trainer.get("fast_dev_run")),
        })
        trainer.strategy.barrier("pretrained-backbone-saved")


def _low_resolution(cfg: DictConfig) -> dict | None:
    value = cfg.pretrain.get("low_resolution")
    return None if value is None else OmegaConf.to_container(value, resolve=True)


def _recipe(cfg: DictConfig) -> dict:
    recipe = OmegaConf.to_container(cfg.pretrain, resolve=True)
    if sorted(recipe.get("head_levels", DEFAULT_HEAD_LEVELS)) == list(DEFAULT_HEAD_LEVELS):
        recipe.pop("head_levels", None)  # trunks cached before the option existed stay valid
    return recipe


TRUNK = TrunkStage()
