"""Bounding boxes of the non-zero part of a map (for work pruned to a support's mask)."""

from __future__ import annotations

from torch import Tensor

Box = tuple[int, int, int, int]  # (top, bottom, left, right), ends exclusive
# Work is pruned to a box only below this fraction of the map: above it, cropping and
# per-support bookkeeping cost more than the few skipped positions save.
PRUNE_BELOW = 0.9


def nonzero_box(values: Tensor) -> Box:
    """The box bounding the non-zero entries of a 2D map; (0, 0, 0, 0) if there are none."""
    rows = values.amax(dim=1).nonzero()
    if rows.numel() == 0:
        return 0, 0, 0, 0
    columns = values.amax(dim=0).nonzero()
    return int(rows[0, 0]), int(rows[-1, 0]) + 1, int(columns[0, 0]), int(columns[-1, 0]) + 1


def box_area(box: Box) -> int:
    top, bottom, left, right = box
    return (bottom - top) * (right - left)


def worth_pruning(box: Box, height: int, width: int) -> bool:
    """Whether a box covers less than :data:`PRUNE_BELOW` of a height x width map."""
    return box_area(box) < PRUNE_BELOW * height * width
