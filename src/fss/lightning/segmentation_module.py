"""LightningModule for ordinary semantic segmentation on a fold's base classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    """Cross-entropy (ignore 255) training; validation mIoU over all base classes + background.

    ``low_resolution`` (``{"size": S, "epochs": E}``) trains the first E epochs on images and
    labels downsampled to a longer side of S (progressive resizing): a step then costs about
    (S/H)² of a full-size one. Later epochs, every validation, and images no larger than S
    run at the data's own size.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        low_resolution: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.low_resolution = check_low_resolution(low_resolution)
        self.val_iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.low_resolution is not None and self.current_epoch < self.low_resolution[1]:
            images, labels = downsample(images, labels, self.low_resolution[0])
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        log_step_and_epoch(self, "pretrain/loss", loss.detach(), images.shape[0],
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


def check_low_resolution(value: Mapping[str, int] | None) -> tuple[int, int] | None:
    """``{"size": S, "epochs": E}`` -> ``(S, E)``; None (or E = 0) -> None. Anything else is
    a ValueError naming the key."""
    if value is None:
        return None
    if set(value) != {"size", "epochs"}:
        raise ValueError(f"pretrain.low_resolution={dict(value)}: expected exactly the keys "
                         "size and epochs, e.g. {size: 80, epochs: 4}, or null")
    size, epochs = value["size"], value["epochs"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 32:
        raise ValueError(f"pretrain.low_resolution.size={size!r}: expected an integer >= 32")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"pretrain.low_resolution.epochs={epochs!r}: expected an integer >= 0")
    return None if epochs == 0 else (size, epochs)


def downsample(images: torch.Tensor, labels: torch.Tensor, size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,3,H,W) images (antialiased bilinear) and (B,H,W) labels (nearest, ignore kept) with
    their longer side scaled to ``size``; unchanged when it is ``size`` or less already."""
    height, width = images.shape[-2:]
    if max(height, width) <= size:
        return images, labels
    scale = size / max(height, width)
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    images = F.interpolate(images, size=target, mode="bilinear", align_corners=False,
                           antialias=True)
    labels = F.interpolate(labels[:, None].float(), size=target, mode="nearest")
    return images, labels[:, 0].long()
