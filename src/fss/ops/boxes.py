"""Work pruned to the bounding box of a support mask.

Masked-out support positions hold exactly zero features, so work whose result the mask
zeroes anyway can be skipped outside the box of the non-zero positions.

- :func:`mask_boxes` decides whether a batch of masks is worth pruning (the dispatch);
- :func:`conv2d_in_boxes` is a convolution evaluated inside each box only (fast), with
  :func:`conv2d_in_boxes_reference` (the whole map, zeroed outside the boxes) beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fss.ops.config import DEVICE_IMPLS, FAST_ACCELERATOR, REFERENCE, choose_impl, device_impl

Box = tuple[int, int, int, int]  # (top, bottom, left, right), ends exclusive
# Work is pruned to a box only below this fraction of the map: above it, cropping and
# per-support bookkeeping cost more than the few skipped positions save.
PRUNE_BELOW = 0.9
IMPLS = DEVICE_IMPLS


def nonzero_box(values: Tensor) -> Box:
    """The box bounding the non-zero entries of a non-negative 2D map (norms, masks);
    (0, 0, 0, 0) if there are none."""
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


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every non-empty box of ``boxes``; empty if all are."""
    boxes = [box for box in boxes if box[0] != box[1]]
    if not boxes:
        return 0, 0, 0, 0
    return (min(b[0] for b in boxes), max(b[1] for b in boxes),
            min(b[2] for b in boxes), max(b[3] for b in boxes))


def mask_boxes(masks: Tensor, size: tuple[int, int], *, impl: str | None = None
               ) -> list[Box] | None:
    """The boxes of masks (N, 1, H, W) nearest-resized to ``size``, or ``None`` where the
    whole map should be computed.

    ``fast`` returns boxes on a CPU when at least one covers less than
    :data:`PRUNE_BELOW` of the map; ``None`` on accelerators, where reading the boxes
    would synchronise with the host (forced: ``fast_cpu`` computes them on any device,
    ``fast_accelerator`` never). ``reference``: ``None``.
    """
    impl = device_impl(choose_impl(impl, IMPLS), masks.device.type == "cpu")
    if impl in (REFERENCE, FAST_ACCELERATOR):
        return None
    height, width = size
    small = F.interpolate(masks, size=(height, width), mode="nearest")[:, 0]
    boxes = [nonzero_box(mask) for mask in small]
    if not any(worth_pruning(box, height, width) for box in boxes):
        return None
    return boxes


def conv2d_in_boxes(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None,
                    boxes: Sequence[Box],
                    after: Callable[[Tensor], Tensor] | None = None,
                    add: Tensor | None = None) -> Tensor:
    """``after(conv2d(cat(inputs, dim=1)) + add)`` (stride 1, padding k // 2) inside each image's
    box (top, bottom, left, right; ends exclusive), 0 elsewhere: the values the whole-map
    convolution gives there, for the price of the box.

    inputs: maps (N, C_i, H, W) concatenated along channels (only inside the box plus a
    k // 2 halo, zero-padded at the map's border as the full conv pads it); weight
    (C_out, ΣC_i, k, k); ``add``: a map (N or 1, C_out, H, W) added to the
    convolution's values; ``after``: a per-position map (e.g. an eval-mode BatchNorm)
    applied to each box's values. Returns (N, C_out, H, W).
    """
    batch, _, height, width = inputs[0].shape
    halo = weight.shape[-1] // 2
    out = inputs[0].new_zeros(batch, weight.shape[0], height, width)
    for index, (top, bottom, left, right) in enumerate(boxes):
        if top == bottom or left == right:
            continue
        rows = slice(max(top - halo, 0), min(bottom + halo, height))
        cols = slice(max(left - halo, 0), min(right + halo, width))
        region = torch.cat([m[index : index + 1, :, rows, cols] for m in inputs], dim=1)
        region = F.pad(region, (cols.start - left + halo, right + halo - cols.stop,
                                rows.start - top + halo, bottom + halo - rows.stop))
        region = region.contiguous(memory_format=torch.channels_last)
        values = F.conv2d(region, weight, bias)
        if add is not None:
            row = index if add.shape[0] > 1 else 0
            values = values + add[row : row + 1, :, top:bottom, left:right]
        out[index, :, top:bottom, left:right] = (values if after is None else after(values))[0]
    return out


def conv2d_in_boxes_reference(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor | None,
                              boxes: Sequence[Box],
                              after: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """:func:`conv2d_in_boxes` as the whole-map convolution, zeroed outside the boxes."""
    full = F.conv2d(torch.cat(list(inputs), dim=1), weight, bias, padding=weight.shape[-1] // 2)
    if after is not None:
        full = after(full)
    inside = torch.zeros(full.shape[0], 1, *full.shape[-2:], dtype=torch.bool,
                         device=full.device)
    for index, (top, bottom, left, right) in enumerate(boxes):
        inside[index, :, top:bottom, left:right] = True
    return full * inside
