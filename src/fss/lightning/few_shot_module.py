"""LightningModule for episodic few-shot training and evaluation.

It knows the episode batch contract (docs/architecture.md) and the model contract, and
nothing of datasets' file layouts or of any model's internals.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fss.lightning.optim import lightning_optimizers
from fss.lightning.sync import log_reduced, log_step_and_epoch
from fss.metrics import FewShotIoU
from fss.models.inputs import empty_support_kwargs

EVAL_RESOLUTIONS = ("network", "original")


class FewShotModule(L.LightningModule):
    """Trains with the model's ``training_loss``; validates/tests with ``predict`` + FewShotIoU.

    Args:
        model: a few-shot model following the contract (forward / predict / training_loss).
        optimizer: a factory ``params -> Optimizer`` (Hydra ``_partial_: true``).
        scheduler: optional factory ``optimizer[, total_steps] -> LRScheduler``, stepped
            every optimizer step.
        eval_class_ids: 0-based classes scored in val/test (the fold's novel classes).
        base_class_ids: the fold's base classes, in order. Models whose ``training_loss``
            takes ``class_ids`` (HDMNet's base-learner ensemble) receive each training
            episode's index in this list.
        eval_resolution: ``"network"`` scores the prediction at the input size against
            ``query_mask``; ``"original"`` upsamples the logits of each episode to its
            original label size (bilinear, align_corners=True) and scores against
            ``query_mask_orig`` (batches without it are scored at the network size: the
            synthetic benchmark's labels are made at that size). Models with
            ``per_shot_logits`` combine their K shots at the original size with their own
            ``combine_shots`` (HSNet: the vote).
        val_class_ids: classes of validation episodes (default ``eval_class_ids``; FSS-1000
            validates on its own class split).
        run_info: the run's description (``fss.checkpoints.describe_run``: model config,
            backbone, data protocol, fold, shots, fss version), written into every
            checkpoint under ``"fss"`` so that it can be tested and used without its config.
        compile: ``torch.compile`` every trainable child of ``model`` in place
            (:func:`compile_trainable_children`; config ``model.compile``).
        seed: when set, every training step starts from random states that are a function
            of ``(seed, global step)`` alone (dropout, any sampling inside the model), so a
            run resumed from a checkpoint draws what the uninterrupted run drew.
        episodes_csv: where every test pass writes its per-episode record
            (``fss.metrics.episodes``); the first pass of this module writes the file, later
            ones (further test seeds) append to it. None: no file.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        eval_class_ids: Sequence[int] = (),
        base_class_ids: Sequence[int] = (),
        eval_resolution: str = "network",
        val_class_ids: Sequence[int] | None = None,
        run_info: dict[str, Any] | None = None,
        compile: bool = False,
        seed: int | None = None,
        episodes_csv: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.eval_class_ids = [int(c) for c in eval_class_ids]
        if not self.eval_class_ids:
            raise ValueError("eval_class_ids is empty: pass the fold's novel classes")
        self.base_class_ids = [int(c) for c in base_class_ids]
        lookup = torch.full((max(self.base_class_ids, default=0) + 1,), -1, dtype=torch.long)
        lookup[self.base_class_ids] = torch.arange(len(self.base_class_ids))
        self.register_buffer("_base_index", lookup, persistent=False)
        self._loss_takes_class_ids = "class_ids" in inspect.signature(model.training_loss).parameters \
            if hasattr(model, "training_loss") else False
        if eval_resolution not in EVAL_RESOLUTIONS:
            raise ValueError(f"eval_resolution must be one of {', '.join(EVAL_RESOLUTIONS)}, "
                             f"got {eval_resolution!r}")
        self.eval_resolution = eval_resolution
        self.val_class_ids = (self.eval_class_ids if val_class_ids is None
                              else [int(c) for c in val_class_ids])
        self.val_iou = FewShotIoU(self.val_class_ids)
        self.test_iou = FewShotIoU(self.eval_class_ids)
        self.run_info = run_info
        self.seed = None if seed is None else int(seed)
        self.episodes_csv = None if episodes_csv is None else Path(episodes_csv)
        self._episode_rows: list[dict[str, Any]] = []
        self._episodes_written = False
        if compile:
            compile_trainable_children(self.model)

    # -- training ---------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.seed is not None:
            seed_step(self.seed, self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        extra = {}
        if self._loss_takes_class_ids:
            class_ids = batch["class_id"].clamp(max=self._base_index.numel() - 1)
            extra["class_ids"] = self._base_index[class_ids]
        # Dataset episodes: a support can lose its whole object when resized.
        extra.update(empty_support_kwargs(self.model.training_loss))
        out = self.model.training_loss(
            batch["query_img"], batch["support_imgs"], batch["support_masks"], batch["query_mask"],
            **extra,
        )
        batch_size = batch["query_img"].shape[0]
        for name, value in out.items():
            if name != "logits" and torch.is_tensor(value) and value.dim() == 0:
                log_step_and_epoch(self, f"train/{name}", value.detach(), batch_size,
                                   prog_bar=name == "loss")
        return out["loss"]

    # -- evaluation -------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, torch.Tensor], metric: FewShotIoU
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores the batch into ``metric``; returns what it added per episode:
        (B, 2) intersections and unions, columns (background, foreground)."""
        if self.eval_resolution == "original" and "query_mask_orig" in batch:
            preds = self.predict_original_size(batch)
            counts = []
            for pred, target, size, class_id in zip(
                preds, batch["query_mask_orig"], batch["query_size_orig"].tolist(),
                batch["class_id"], strict=True,
            ):
                height, width = size
                metric.update(pred[None], target[None, :height, :width], class_id[None])
                counts.append(metric.last_counts)
            return torch.cat([i for i, _ in counts]), torch.cat([u for _, u in counts])
        preds = self.model.predict(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                   **empty_support_kwargs(self.model.predict))
        metric.update(preds, batch["query_mask"], batch["class_id"])
        return metric.last_counts

    @torch.no_grad()
    def predict_original_size(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per episode, the (H0, W0) int64 {0, 1} prediction at its original label size
        ``query_size_orig``: logits upsampled per sample (so any batch size gives the same
        result), then argmax, or the model's own K-shot rule (``combine_shots``) over the
        upsampled per-shot logits."""
        logits, combine = shot_logits(
            self.model, batch["query_img"], batch["support_imgs"], batch["support_masks"])
        return [combine(upsample_logits(sample_logits, (height, width))[None])[0]
                for sample_logits, (height, width)
                in zip(logits, batch["query_size_orig"].tolist(), strict=True)]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_iou)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        intersection, union = self._evaluate(batch, self.test_iou)
        if self.episodes_csv is not None:
            self._episode_rows.extend(episode_rows(batch, intersection, union,
                                                   self._test_dataset()))

    def _test_dataset(self) -> Any:
        loaders = self.trainer.test_dataloaders
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        return getattr(loaders, "dataset", None)

    def on_test_epoch_start(self) -> None:
        self._episode_rows = []
        record = self.protocol_record()
        if record is not None:
            for logger in self.loggers:
                logger.log_hyperparams({"protocol": record})

    def protocol_record(self) -> dict[str, Any] | None:
        """The test data's protocol and its settings (``fss.data.protocols``), or None."""
        from fss.data.protocols import protocol_record

        datamodule = getattr(self.trainer, "datamodule", None)
        return protocol_record(getattr(datamodule, "source", None), self.eval_resolution)

    def _write_episodes(self) -> None:
        from fss.metrics import episodes

        rows = gather_rows(self._episode_rows)
        self._episode_rows = []
        if not self.trainer.is_global_zero:
            return
        seed = getattr(getattr(self.trainer, "datamodule", None), "test_seed", None)
        for row in rows:
            row["test_seed"] = "" if seed is None else int(seed)
        rows.sort(key=lambda row: row["index"])
        episodes.write(self.episodes_csv, rows, append=self._episodes_written)
        self._episodes_written = True

    def _log_metric(self, stage: str, metric: FewShotIoU) -> None:
        values = metric.compute()  # summed over all ranks: the same values on each of them
        log_reduced(self, f"{stage}/miou", values["miou"], prog_bar=True)
        log_reduced(self, f"{stage}/fbiou", values["fbiou"], prog_bar=True)
        log_reduced(self, f"{stage}/episodes", values["episodes"].float())
        for class_id, iou in zip(metric.class_ids, values["class_iou"].tolist(), strict=True):
            if iou == iou:  # skip NaN (class not seen); the same classes on every rank
                log_reduced(self, f"{stage}/iou_class{class_id}", iou)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val", self.val_iou)

    def on_test_epoch_end(self) -> None:
        self._log_metric("test", self.test_iou)
        if self.episodes_csv is not None:
            self._write_episodes()

    # -- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_info is not None:
            from fss.checkpoints import CHECKPOINT_KEY

            checkpoint[CHECKPOINT_KEY] = self.run_info

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        return lightning_optimizers(self.optimizer_factory, self.scheduler_factory, self.model,
                                    int(self.trainer.estimated_stepping_batches))


def compile_trainable_children(model: nn.Module, **options: Any) -> list[str]:
    """``torch.compile`` in place (``nn.Module.compile``: state-dict keys unchanged) every
    direct child of ``model`` that has trainable parameters: HSNet's learner, HDMNet's
    transformer and merge layers. Frozen backbones stay eager: they run as folded copies
    and feed data-dependent (mask-pruned) products that would only break graphs.
    Returns the compiled children's names."""
    names = []
    for name, child in model.named_children():
        if any(parameter.requires_grad for parameter in child.parameters()):
            child.compile(**options)
            names.append(name)
    return names


def seed_step(seed: int, step: int) -> None:
    """Seeds torch (every device), numpy and ``random`` from ``(seed, step)``."""
    import random

    import numpy as np

    state = np.random.SeedSequence([seed, step]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


@torch.no_grad()
def shot_logits(
    model: nn.Module,
    query_img: torch.Tensor,
    support_imgs: torch.Tensor,
    support_masks: torch.Tensor,
    *,
    allow_empty_support: bool = True,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The logits that evaluation at the original size upsamples, and the rule that turns
    upsampled logits into a mask (shared with :mod:`fss.predict`).

    Models with ``per_shot_logits`` (HSNet): (B, K, 2, H, W) and the model's
    ``combine_shots`` (HSNet's K-shot vote);
    others: the forward logits as (B, 1, 2, H, W) and the argmax. The rule maps
    (B, K, 2, H0, W0) logits to (B, H0, W0) int64 {0, 1}. ``allow_empty_support`` is passed
    to every model that takes it (benchmark episodes can lose a support's object).
    """
    inputs = (query_img, support_imgs, support_masks)
    per_shot = getattr(model, "per_shot_logits", None)
    if per_shot is not None:
        # A model that scores each shot on its own combines them by its own K-shot rule
        # (``combine_shots``; HSNet: the vote).
        options = empty_support_kwargs(per_shot) if allow_empty_support else {}
        return per_shot(*inputs, **options), model.combine_shots
    options = empty_support_kwargs(model) if allow_empty_support else {}
    return model(*inputs, **options).unsqueeze(1), _argmax_of_single_shot


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 2, H, W) logits -> (N, 2, *size): bilinear, align_corners=True (the models'
    own upsampling)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def episode_rows(batch: dict[str, Any], intersection: torch.Tensor, union: torch.Tensor,
                 dataset: Any = None) -> list[dict[str, Any]]:
    """episodes.csv rows (``test_seed`` added later) of a scored batch; image ids from
    ``dataset.episode_ids`` (empty when the dataset has none)."""
    from fss.data.episodes import ID_SEPARATOR

    rows = []
    for index, class_id, inter, uni in zip(
        batch["episode_index"].tolist(), batch["class_id"].tolist(),
        intersection.long().tolist(), union.long().tolist(), strict=True,
    ):
        ids = getattr(dataset, "episode_ids", None)
        query, supports = ids(int(index)) if ids is not None else ("", [])
        rows.append({"index": int(index), "class": int(class_id), "query": query,
                     "supports": ID_SEPARATOR.join(supports),
                     "fg_intersection": inter[1], "fg_union": uni[1],
                     "bg_intersection": inter[0], "bg_union": uni[0]})
    return rows


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows on every rank (one process: ``rows``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(rows)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _argmax_of_single_shot(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, 2, H, W) logits -> (B, H, W) int64 {0, 1}."""
    return logits[:, 0].argmax(dim=1)
