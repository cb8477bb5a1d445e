"""Class-wise accumulated IoU for few-shot segmentation (mIoU and FB-IoU).

The standard FSS protocol does not average per-episode IoUs: it sums foreground and
background intersection and union per class over ALL episodes, then

    mIoU   = mean over the fold's classes c of  ΣI_fg(c) / ΣU_fg(c)
    FB-IoU = mean over {bg, fg} of  Σ_c ΣI(c) / Σ_c ΣU(c)

Every state is a sum (``dist_reduce_fx="sum"``), so DDP gives the same number as one
process seeing all episodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from fss.data.transforms import IGNORE_INDEX


def episode_counts(
    preds: torch.Tensor, target: torch.Tensor, ignore_index: int | None = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode (background, foreground) intersection and union, each (B, 2) int64.

    preds (B, H, W) in {0, 1}; target (B, H, W) in {0, 1, ignore}: pixels equal to
    ``ignore_index`` are not counted (``None``: every pixel is)."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None \
        else target != ignore_index
    preds = preds.long()
    target = target.long()
    fg_pred = (preds == 1) & valid
    fg_true = (target == 1) & valid
    bg_pred = (preds == 0) & valid
    bg_true = (target == 0) & valid
    dims = (1, 2)
    inter = torch.stack([(bg_pred & bg_true).sum(dims), (fg_pred & fg_true).sum(dims)], 1)
    union = torch.stack([(bg_pred | bg_true).sum(dims), (fg_pred | fg_true).sum(dims)], 1)
    return inter, union


class FewShotIoU(Metric):
    """Accumulates per-class (background, foreground) intersection and union.

    Args:
        class_ids: the 0-based dataset class ids of the fold being evaluated (e.g. the
            five novel classes). Episodes of other classes are rejected with an error.
        ignore_index: label value excluded from scoring (PASCAL boundaries, padding).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, class_ids: Sequence[int], ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        class_ids = [int(c) for c in class_ids]
        if not class_ids or len(set(class_ids)) != len(class_ids):
            raise ValueError(f"class_ids must be non-empty and distinct, got {class_ids}")
        self.class_ids = class_ids
        self.ignore_index = ignore_index
        lookup = torch.full((max(class_ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(class_ids)] = torch.arange(len(class_ids))
        self.register_buffer("_slot_of_class", lookup, persistent=False)
        num = len(class_ids)
        # (num_classes, 2): column 0 = background, column 1 = foreground.
        self.add_state("intersection", torch.zeros(num, 2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num, 2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.zeros(num, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, class_ids: torch.Tensor) -> None:
        """preds (B, H, W) in {0, 1}; target (B, H, W) in {0, 1, ignore}; class_ids (B,)."""
        if preds.shape != target.shape or preds.dim() != 3:
            raise ValueError(
                f"preds and target must both be (B, H, W); got {tuple(preds.shape)} and "
                f"{tuple(target.shape)} (upsample predictions to the label size first)"
            )
        class_ids = torch.as_tensor(class_ids, device=preds.device).long().reshape(-1)
        if class_ids.numel() != preds.shape[0]:
            raise ValueError(f"{class_ids.numel()} class ids for a batch of {preds.shape[0]}")
        lookup = self._slot_of_class.to(preds.device)
        known = (class_ids >= 0) & (class_ids < lookup.numel())
        slots = torch.where(known, lookup[class_ids.clamp(0, lookup.numel() - 1)], -1)
        if (slots < 0).any():
            bad = sorted(set(class_ids[slots < 0].tolist()))
            raise ValueError(f"episodes of classes {bad} are not among the evaluated {self.class_ids}")

        inter, union = episode_counts(preds, target, self.ignore_index)
        # What this call added, per episode (episodes.csv records it).
        self.last_counts = (inter, union)
        self.intersection.index_add_(0, slots, inter.to(self.intersection.dtype))
        self.union.index_add_(0, slots, union.to(self.union.dtype))
        self.episodes.index_add_(0, slots, torch.ones_like(slots))

    def compute(self) -> dict[str, torch.Tensor]:
        """``miou`` and ``fbiou`` in percent, plus per-class IoU (NaN for unseen classes).

        mIoU averages over the classes that received at least one episode (with the
        standard 1000 test episodes, all of a fold's classes do).
        """
        seen = self.episodes > 0
        per_class = torch.full((len(self.class_ids),), float("nan"), dtype=torch.float64,
                               device=self.union.device)
        union_fg = self.union[:, 1].clamp(min=1)
        per_class[seen] = (self.intersection[seen, 1] / union_fg[seen]) * 100
        miou = per_class[seen].mean() if seen.any() else torch.tensor(float("nan"))
        total_i = self.intersection.sum(0)
        total_u = self.union.sum(0).clamp(min=1)
        fbiou = (total_i / total_u).mean() * 100 if seen.any() else torch.tensor(float("nan"))
        return {
            "miou": miou.float(),
            "fbiou": fbiou.float(),
            "class_iou": per_class.float(),
            "episodes": self.episodes.sum(),
        }
