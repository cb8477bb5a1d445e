"""LightningModule for ordinary semantic segmentation on a fold's base classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from fss.data.transforms import IGNORE_INDEX
from fss.lightning.optim import lightning_optimizers
from fss.lightning.sync import log_reduced, log_step_and_epoch


class SegmentationModule(L.LightningModule):
    """Cross-entropy (ignore 255) training; validation mIoU over all base classes + background."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], ignore_index=IGNORE_INDEX)
        log_step_and_epoch(self, "pretrain/loss", loss.detach(), batch["image"].shape[0],
                           prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["image"])
        self.val_iou.update(logits.argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        # compute() sums the confusion matrix over all ranks: the same value on each of them
        log_reduced(self, "pretrain/val_miou", self.val_iou.compute() * 100, prog_bar=True)
        self.val_iou.reset()

    def configure_optimizers(self):
        return lightning_optimizers(self.optimizer_factory, self.scheduler_factory, self.model,
                                    int(self.trainer.estimated_stepping_batches))
