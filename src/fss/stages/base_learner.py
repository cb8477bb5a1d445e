"""Stage ``base_learner``: the PSPNet that HDMNet builds on, trained on the fold's base classes.

HDMNet freezes a PSPNet trained as an ordinary segmenter over background + the fold's base
classes (novel classes are background there, never seen). This module trains it, caches it
and hands it to HDMNet:

- ``python run.py model=pspnet data=<d> fold=<k> backbone=<b>`` runs the stage as a job
  (:meth:`BaseLearnerStage.job`) and writes ``metrics.json`` (base-class val mIoU);
- ``model=hdmnet`` lists the stage in ``model.stages``, so the pipeline obtains it before it
  builds the network: a configured ``base_learner.ckpt`` is used as is; otherwise the cached
  checkpoint is reused, or — on the synthetic benchmark only — trained first. On real
  datasets a missing checkpoint is a :class:`~fss.utils.errors.ConfigError` that names the
  command making it (training PSPNet is hours of GPU time, never a side effect).

Cache layout (:mod:`fss.stages.cache`): ``<paths.cache_dir>/base_learner/<data>-fold<k>-<backbone>-
<hash>/best.pth`` (``{"state_dict": PSPNet state dict}``, the layout of the official
``best.pth``) + ``meta.json`` (data, fold, backbone, classes, base-class val mIoU, recipe).
The hash covers what changes the trained network: the ``base_learner`` recipe (minus
``ckpt``), ``data.semantic`` (minus loader settings, seeds and path-like keys, so moving
a dataset keeps its cache) and debug limits (a ``fast_dev_run`` network is never reused by
a real run). The training images are drawn with ``base_learner.seed``, not the run's
``seed``: every HDMNet seed of a fold shares one base learner, as in the official code.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf

from fss.lightning import SegmentationModule
from fss.models.psp_backbones import PSP_BACKBONES
from fss.models.pspnet import (
    PSPNet,
    aligned_sizes,
    load_pspnet_checkpoint,
    pspnet_state_dict_from_checkpoint,
)
from fss.stages.cache import Artifact, Stage, StageContext, obtain, read_meta
from fss.stages.training import stage_trainer
from fss.utils.errors import ConfigError
from fss.utils.ranks import is_global_zero

log = logging.getLogger(__name__)

# Datasets whose base learner may be trained on the fly by an HDMNet run (minutes on a CPU).
TRAIN_ON_THE_FLY = ("synth",)
MONITOR = "pretrain/val_miou"  # logged by SegmentationModule
_LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "seed", "val_seed")
_PATH_SUFFIXES = ("root", "dir", "path", "file")
# Source settings of the episodes only (the model's training chain), not of semantic images.
_EPISODE_KEYS = ("train_augmentation",)


# ----------------------------------------------------------------------------- cache key
def _without_paths(node: Any) -> Any:
    """Drops path-like keys (``root``, ``data_root``, ``list_dir`` ...) and episode-only
    settings recursively."""
    if isinstance(node, dict):
        return {k: _without_paths(v) for k, v in node.items()
                if not str(k).lower().endswith(_PATH_SUFFIXES) and k not in _EPISODE_KEYS}
    if isinstance(node, list):
        return [_without_paths(v) for v in node]
    return node


def make_command(cfg: DictConfig) -> str:
    """The command that trains the base learner this run needs."""
    return (f"python run.py model=pspnet data={cfg.data.name} fold={cfg.fold} "
            f"backbone={cfg.backbone.name}")


# ------------------------------------------------------------------------------ checks
def check_backbone(cfg: DictConfig) -> None:
    """Refuses a backbone without a PSPNet variant and an image size PSPNet's strict rule
    rejects, naming the override to use: nothing is replaced silently (without a backbone
    on the command line, model=pspnet / hdmnet default to conf/backbone/pspnet_<data>.yaml)."""
    name = cfg.backbone.name
    if name not in PSP_BACKBONES:
        real = "|".join(b for b in PSP_BACKBONES if b != "resnet_small")
        raise ConfigError(
            f"backbone={name} has no PSPNet variant (HDMNet's base learner); use "
            f"backbone=resnet_small (synthetic) or {real}"
        )
    size = cfg.data.get("image_size")
    strict = bool(cfg.base_learner.get("strict_size", True))
    if strict and isinstance(size, int) and not isinstance(size, bool) and (size - 1) % 8:
        lower, upper = aligned_sizes(size)
        raise ConfigError(
            f"data.image_size={size} breaks PSPNet's (size - 1) % 8 == 0 rule "
            f"(base_learner.strict_size=true); use data.image_size={lower} or {upper}, or "
            "base_learner.strict_size=false"
        )


def _configured_base_classes(cfg: DictConfig) -> int | None:
    net = cfg.model.get("net")
    value = net.get("num_classes_base") if isinstance(net, DictConfig) else None
    return None if value is None else int(value)


def _expected_num_classes(cfg: DictConfig) -> int | None:
    """Background + base classes: from the data when it has a semantic split (checked
    against HDMNet's ``num_classes_base``), else from ``num_classes_base``."""
    configured = _configured_base_classes(cfg)
    if cfg.data.get("semantic") is None:
        return None if configured is None else configured + 1
    labels = int(instantiate(cfg.data.semantic).num_labels)
    if configured is not None and configured + 1 != labels:
        raise ConfigError(
            f"model.net.num_classes_base={configured} but fold {cfg.fold} of data="
            f"{cfg.data.name} has {labels - 1} base classes; set "
            f"model.net.num_classes_base={labels - 1}"
        )
    return labels


def verify_checkpoint(path: Path, cfg: DictConfig, num_classes: int | None) -> dict:
    """Refuses a base-learner checkpoint made for another dataset, fold, backbone or class
    count (``meta.json`` beside it, and the classifier's shape); returns the meta (``{}``
    for a file without one, e.g. an official ``best.pth``)."""
    meta = read_meta(path)
    expected = {"data": cfg.data.name, "fold": cfg.fold, "backbone": cfg.backbone.name}
    if num_classes is not None:
        expected["num_classes"] = num_classes
    mismatched = [key for key, value in expected.items() if key in meta and meta[key] != value]
    found = {key: meta[key] for key in mismatched}
    if num_classes is not None and "num_classes" not in mismatched:
        try:
            state = pspnet_state_dict_from_checkpoint(path)
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"base-learner checkpoint {path} cannot be read: {error}") from error
        classifier = state.get("cls.4.weight")
        if classifier is not None and classifier.shape[0] != num_classes:
            mismatched.append("num_classes")
            found["num_classes"] = int(classifier.shape[0])
    if mismatched:
        details = "; ".join(f"{key}={found[key]} (this run: {key}={expected[key]})"
                            for key in mismatched)
        raise ConfigError(
            f"base-learner checkpoint {path} was made for another setting: {details}. "
            f"Train the right one with `{make_command(cfg)}` or point base_learner.ckpt at it"
        )
    if not meta:
        log.warning("Base-learner checkpoint %s has no meta.json: its dataset and fold cannot "
                    "be checked (class count checked: %s)", path, num_classes is not None)
    return meta


# ------------------------------------------------------------------------------ stage
class BaseLearnerStage(Stage):
    name = "base_learner"
    description = "base learner"
    folder = "base_learner"
    filename = "best.pth"

    def check(self, cfg: DictConfig) -> None:
        check_backbone(cfg)

    def trains_on_the_fly(self, cfg: DictConfig) -> bool:
        return cfg.data.name in TRAIN_ON_THE_FLY

    def key_payload(self, cfg: DictConfig) -> dict[str, Any]:
        """See the module docstring for what is hashed."""
        # Resolved without `model` and without the episodes' own settings (a recipe passes
        # the model's augmentation to the episodes): they must not split the cache between
        # the model=pspnet job and the HDMNet runs that use its checkpoint.
        neutral = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        neutral.model = {}
        source = neutral.data.get("source")
        if source is not None:
            for key in _EPISODE_KEYS:
                source.pop(key, None)
        semantic = neutral.data.get("semantic")
        semantic = {} if semantic is None else OmegaConf.to_container(semantic, resolve=True)
        for key in _LOADER_KEYS:
            semantic.pop(key, None)
        recipe = OmegaConf.to_container(cfg.base_learner, resolve=True)
        recipe.pop("ckpt", None)
        return {
            "semantic": _without_paths(semantic),
            "recipe": recipe,
            "backbone": cfg.backbone.name,
            "limits": {k: cfg.trainer.get(k) for k in
                       ("fast_dev_run", "limit_train_batches", "limit_val_batches",
                        "overfit_batches")},
        }

    def configured(self, cfg: DictConfig) -> Artifact | None:
        configured = cfg.base_learner.get("ckpt")
        if not configured:
            return None
        path = Path(str(configured))
        if not path.is_file():
            raise ConfigError(f"base_learner.ckpt={path} does not exist; pass a PSPNet "
                              f"checkpoint (best.pth) or null to use the cache / `{make_command(cfg)}`")
        meta = verify_checkpoint(path, cfg, _expected_num_classes(cfg))
        log.info("Using the configured base learner %s", path)
        return Artifact(path, meta, trained=False)

    def verify(self, cfg: DictConfig, path: Path) -> dict[str, Any]:
        meta = verify_checkpoint(path, cfg, _expected_num_classes(cfg))
        log.info("Base learner %s: base-class val mIoU %s", path, meta.get("val_miou_base"))
        return meta

    def missing(self, cfg: DictConfig, path: Path) -> Exception:
        return ConfigError(
            f"no base-learner (PSPNet) checkpoint for data={cfg.data.name} fold={cfg.fold} "
            f"backbone={cfg.backbone.name}: expected {path}. Train it first with "
            f"`{make_command(cfg)}` (same paths.cache_dir), or pass "
            "base_learner.ckpt=<path of a PSPNet best.pth>"
        )

    def train(self, cfg: DictConfig, context: StageContext) -> None:
        """Trains PSPNet on the fold's base classes, keeping the best validation weights."""
        _expected_num_classes(cfg)  # a class-count mismatch is refused before training
        recipe = cfg.base_learner
        if recipe.get("imagenet_weights") is None and cfg.data.name not in TRAIN_ON_THE_FLY:
            log.warning("base_learner.imagenet_weights is null: PSPNet starts from random weights "
                        "(the official recipe starts from ImageNet, resnet50_v2.pth)")
        L.seed_everything(int(recipe.seed), workers=True)
        datamodule = _semantic_datamodule(cfg)
        num_classes = datamodule.num_labels
        net = build_pspnet(cfg, num_classes)
        module = SegmentationModule(
            net,
            num_classes=num_classes,
            optimizer=instantiate(recipe.optimizer),
            scheduler=instantiate(recipe.scheduler) if recipe.get("scheduler") else None,
        )
        best = BestWeights()
        callbacks: list[L.Callback] = [best]
        if recipe.get("early_stop_patience"):
            callbacks.append(EarlyStopping(MONITOR, patience=int(recipe.early_stop_patience),
                                           mode="max"))
        trainer = stage_trainer(cfg, "base_learner", int(recipe.max_epochs), callbacks)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        elapsed = time.perf_counter() - start
        state = best.state if best.state is not None else net.state_dict()
        context.save({"state_dict": state}, {
            "data": cfg.data.name,
            "fold": cfg.fold,
            "backbone": cfg.backbone.name,
            "num_classes": num_classes,
            "base_classes": list(datamodule.base_classes),
            "head_channels": net.feat5_channels,
            "val_miou_base": None if best.best is None else round(best.best, 2),
            "best_epoch": best.epoch,
            "epochs_run": int(trainer.current_epoch),
            "seconds": round(elapsed, 1),
            "fast_dev_run": bool(cfg.trainer.get("fast_dev_run")),
            "recipe": OmegaConf.to_container(recipe, resolve=True),
        })
        trainer.strategy.barrier("base-learner-saved")

    # -- model=pspnet: the stage as a job ----------------------------------------------
    def job(self, cfg: DictConfig) -> dict[str, Any]:
        """Trains (or reuses) the fold's base learner; ``mode=test`` evaluates the cached /
        configured one. Writes and returns ``metrics.json`` (``mIoU`` = base-class val mIoU,
        background included; no episodes, so ``FB-IoU`` is NaN)."""
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if cfg.mode == "test":
            artifact = obtain(self, cfg, train_if_missing=False)
            test_start = time.perf_counter()
            miou = evaluate_base_learner(cfg, artifact.path)
            test_seconds = time.perf_counter() - test_start
        else:
            artifact = obtain(self, cfg, train_if_missing=True)
            miou = artifact.meta.get("val_miou_base")
            miou = float("nan") if miou is None else float(miou)
            test_seconds = 0.0
        from fss.checkpoints import job_identity

        meta = artifact.meta
        metrics = {
            **job_identity(cfg),
            "episodes": 0,
            "mIoU": round(miou, 2),
            "FB-IoU": float("nan"),
            "metric": "base-class val mIoU (background + base classes)",
            "num_classes": meta.get("num_classes"),
            "mode": cfg.mode,
            "checkpoint": str(artifact.path),
            "reused": not artifact.trained,
            "fit_seconds": float(meta.get("seconds", 0.0)) if artifact.trained else 0.0,
            "test_seconds": round(test_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "tags": list(cfg.get("tags") or []),
            "status": "ok",
        }
        if is_global_zero():  # under DDP every rank gets here with the same numbers
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log.info("Wrote %s", output_dir / "metrics.json")
        return metrics


BASE_LEARNER = BaseLearnerStage()


def base_learner_key(cfg: DictConfig) -> str:
    """``<data>-fold<k>-<backbone>-<hash>``: see the module docstring for what is hashed."""
    return BASE_LEARNER.key(cfg)


class BestWeights(L.Callback):
    """Keeps a CPU copy of the weights at the best validation score (BAM's ``best.pth``)."""

    def __init__(self, monitor: str = MONITOR) -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.epoch = value, int(trainer.current_epoch)
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}


def build_pspnet(cfg: DictConfig, num_classes: int) -> PSPNet:
    recipe = cfg.base_learner
    return PSPNet(
        cfg.backbone.name,
        num_classes=num_classes,
        backbone_weights=recipe.get("imagenet_weights"),
        head_channels=recipe.get("head_channels"),
        strict_size=bool(recipe.get("strict_size", True)),
        backbone_lr_scale=float(recipe.get("backbone_lr_scale", 1.0)),
        head_lr_scale=float(recipe.get("head_lr_scale", 10.0)),
    )


def _semantic_datamodule(cfg: DictConfig):
    if cfg.data.get("semantic") is None:
        raise ConfigError(f"data={cfg.data.name} has no semantic (base-class) split to train the "
                          "base learner on; pass base_learner.ckpt=<path of a PSPNet best.pth>")
    return instantiate(cfg.data.semantic, seed=int(cfg.base_learner.seed))


# -------------------------------------------------------------------------------- job
def evaluate_base_learner(cfg: DictConfig, path: Path) -> float:
    """Base-class val mIoU (background included, as BAM) of the checkpoint at ``path``."""
    datamodule = _semantic_datamodule(cfg)
    net = build_pspnet(cfg, datamodule.num_labels)
    load_pspnet_checkpoint(net, path)
    module = SegmentationModule(net, num_classes=datamodule.num_labels,
                                optimizer=instantiate(cfg.base_learner.optimizer))
    trainer = stage_trainer(cfg, "base_learner", 1)
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(results[0][MONITOR]) if results else float("nan")
