"""Training-free reference models: the prototype baseline and all-foreground.

The prototype baseline is the classic masked-average-pooling matcher: cosine similarity of
each query feature to the mean support feature under the mask, thresholded. Its threshold
is chosen on BASE-class episodes (never on the test classes), so it is a fair, training-free
yardstick for what a learned few-shot head adds on top of the same frozen features. The
model only sweeps the thresholds (:meth:`PrototypeBaseline.calibrate`); the episodes and
the score come from the caller (:func:`fss.metrics.calibration.calibrate_on_base_episodes`),
so this module needs neither the data package nor the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fss.models.backbones import build_backbone
from fss.models.inputs import check_episode

log = logging.getLogger(__name__)


class PrototypeBaseline(nn.Module):
    """cos(query feature, masked-average support prototype) > threshold → foreground.

    Args:
        backbone: backbone name (see ``fss.models.build_backbone``).
        weights: backbone weights (``none``, ``imagenet`` or a torchvision-format file).
        level: pyramid level whose post-ReLU output is matched (2 = stride 8).
        threshold: decision threshold on the cosine map (set by :meth:`calibrate`).

    ``similarity``, ``forward`` and ``predict`` take and check the episode as HSNet and
    HDMNet do (:func:`fss.models.inputs.check_episode`): {0, 1} support masks, non-empty
    unless ``allow_empty_support=True`` (an empty support's prototype is then zero).
    """

    def __init__(self, backbone: str = "resnet18", weights: str | None = None, level: int = 2,
                 threshold: float = 0.5) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, weights)
        if level not in self.backbone.levels:
            raise ValueError(f"level={level} not in the backbone's levels {self.backbone.levels}")
        self.level_index = self.backbone.levels.index(level)
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.level_outputs(self.backbone(images))[self.level_index]

    @torch.no_grad()
    def similarity(self, query_img: torch.Tensor, support_imgs: torch.Tensor,
                   support_masks: torch.Tensor, *,
                   allow_empty_support: bool = False) -> torch.Tensor:
        """(B,3,H,W), (B,K,3,H,W), (B,K,H,W) -> cosine map (B,H,W) in [-1, 1]."""
        support_masks = check_episode(query_img, support_imgs, support_masks,
                                      allow_empty_support=allow_empty_support)
        batch, shots = support_imgs.shape[:2]
        query = self._features(query_img)
        support = self._features(support_imgs.flatten(0, 1))
        masks = F.interpolate(support_masks.flatten(0, 1).unsqueeze(1),
                              size=support.shape[-2:], mode="bilinear", align_corners=True)
        prototypes = (support * masks).sum((2, 3)) / (masks.sum((2, 3)) + 1e-5)
        prototype = prototypes.view(batch, shots, -1).mean(1)
        cosine = F.cosine_similarity(query, prototype[:, :, None, None], dim=1)
        return F.interpolate(cosine.unsqueeze(1), size=query_img.shape[-2:], mode="bilinear",
                             align_corners=True).squeeze(1)

    def forward(self, query_img, support_imgs, support_masks, *,
                allow_empty_support: bool = False) -> torch.Tensor:
        """2-class scores (B,2,H,W) whose argmax is the thresholded prediction."""
        margin = self.similarity(query_img, support_imgs, support_masks,
                                 allow_empty_support=allow_empty_support) - self.threshold
        return torch.stack([-margin, margin], dim=1)

    def predict(self, query_img, support_imgs, support_masks, *,
                allow_empty_support: bool = False) -> torch.Tensor:
        cosine = self.similarity(query_img, support_imgs, support_masks,
                                 allow_empty_support=allow_empty_support)
        return (cosine > self.threshold).long()

    def calibrate(self, batches: Iterable[dict[str, torch.Tensor]], meter: Callable[[], Meter],
                  thresholds: int = 41) -> float:
        """Picks the threshold in [0, 1] with the best score over the given (base) episodes
        (dataset episodes: an empty support mask is accepted). ``meter()`` makes one score
        accumulator per candidate threshold (:class:`Meter`; the pipeline passes the
        base-class mIoU of :mod:`fss.metrics.calibration`)."""
        candidates = np.linspace(0.0, 1.0, thresholds)
        meters = [meter() for _ in candidates]
        seen = False
        for batch in batches:
            seen = True
            cosine = self.similarity(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                     allow_empty_support=True)
            for accumulator, threshold in zip(meters, candidates, strict=True):
                accumulator.update((cosine > threshold).long(), batch["query_mask"], batch["class_id"])
        if not seen:
            raise ValueError("no calibration episodes were given")
        scores = [m.miou() for m in meters]
        best = int(np.argmax(scores))
        self.threshold.fill_(float(candidates[best]))
        log.info("Prototype threshold %.3f (base-class mIoU %.2f)", candidates[best], scores[best])
        return float(candidates[best])


class Meter(Protocol):
    """A score accumulated over episodes: ``update(preds, target, class_ids)``, ``miou()``."""

    def update(self, preds: torch.Tensor, target: torch.Tensor,
               class_ids: torch.Tensor) -> None: ...

    def miou(self) -> float: ...


class AllForeground(nn.Module):
    """Predicts foreground everywhere: the floor any few-shot model must clear. It checks
    its inputs like every model (:func:`fss.models.inputs.check_episode`) but ignores them."""

    def forward(self, query_img, support_imgs, support_masks, *,
                allow_empty_support: bool = False) -> torch.Tensor:
        check_episode(query_img, support_imgs, support_masks,
                      allow_empty_support=allow_empty_support)
        batch, _, height, width = query_img.shape
        logits = torch.zeros(batch, 2, height, width, device=query_img.device)
        logits[:, 1] = 1.0
        return logits

    def predict(self, query_img, support_imgs, support_masks, *,
                allow_empty_support: bool = False) -> torch.Tensor:
        return self.forward(query_img, support_imgs, support_masks,
                            allow_empty_support=allow_empty_support).argmax(1)
