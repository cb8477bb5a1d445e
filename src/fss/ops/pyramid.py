"""A convolution over a map concatenated with upsampled pyramid-pooling bins (PSPNet's head).

PSPNet's classifier convolves ``cat([x, up(p_1), up(p_2), ...])``, where each ``p_b`` is a
pooled bin map (6x6 at most) upsampled bilinearly (``align_corners=True``) to x's size. A
convolution is linear in its input channels, so it splits into the convolution of ``x``
with its own weight slice plus one term per bin. Bilinear upsampling is a fixed matrix on
each axis (``U = A p Bᵀ``), so a bin's term is, per kernel tap, the tap's weights applied
to the small map (a product over channels at 6x6 positions) followed by the two small
interpolation matrices shifted by the tap's offset, zero rows standing for the padding.
The result is the same convolution up to float rounding, for the price of the ``x`` part:
HDMNet's 3x3 conv over 4096 channels (2048 of ``x``, 4 x 512 of bins) costs half.

- :func:`conv2d_over_pyramid` (fast) and :func:`conv2d_over_pyramid_reference` (the maps
  upsampled, concatenated and convolved) take the same arguments;
- ``boxes`` evaluates the output inside each image's box only, 0 elsewhere, as
  :func:`fss.ops.boxes.conv2d_in_boxes` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fss.ops.boxes import Box, conv2d_in_boxes, conv2d_in_boxes_reference
from fss.ops.config import FAST, REFERENCE, choose_impl

IMPLS = (FAST, REFERENCE)


def upsampled(pyramid: Sequence[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Each bin map upsampled to ``size`` (bilinear, ``align_corners=True``)."""
    return [F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in pyramid]


def interpolation_matrix(out_size: int, in_size: int, *, dtype: torch.dtype,
                         device: torch.device) -> Tensor:
    """(out_size, in_size) weights of 1D linear interpolation with ``align_corners=True``:
    output i reads input position ``i (in - 1) / (out - 1)``."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    position = torch.arange(out_size, dtype=torch.float64) * scale
    low = position.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    weight = position - low
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def _shifted(matrix: Tensor, kernel: int) -> Tensor:
    """(kernel, out, in): tap t's rows read output row ``i + t - kernel // 2`` of
    ``matrix``, zero where that falls in the padding."""
    halo = kernel // 2
    padded = F.pad(matrix, (0, 0, halo, halo))
    size = matrix.shape[0]
    return torch.stack([padded[t : t + size] for t in range(kernel)])


def pyramid_term(pyramid: Sequence[Tensor], weights: Sequence[Tensor],
                 size: tuple[int, int]) -> Tensor:
    """Σ_b conv2d(up(p_b), W_b) (stride 1, zero padding k // 2, no bias) at ``size``
    without upsampling: ``pyramid`` maps (N, C_b, h_b, w_b), ``weights`` (O, C_b, k, k)."""
    height, width = size
    total = None
    for small, weight in zip(pyramid, weights, strict=True):
        batch, channels, rows, cols = small.shape
        out_channels, _, kernel, _ = weight.shape
        # taps[n, o, dy, dx, i, j] = Σ_c W[o, c, dy, dx] p[n, c, i, j]
        taps = torch.matmul(weight.permute(2, 3, 0, 1).reshape(kernel * kernel * out_channels,
                                                                channels),
                            small.reshape(batch, channels, rows * cols))
        taps = taps.view(batch, kernel, kernel, out_channels, rows, cols)
        vertical = _shifted(interpolation_matrix(height, rows, dtype=small.dtype,
                                                 device=small.device), kernel)
        horizontal = _shifted(interpolation_matrix(width, cols, dtype=small.dtype,
                                                   device=small.device), kernel)
        # Σ_dx, j: (n, dy, o, i, dx·j) @ (dx·j, x)
        across = taps.permute(0, 1, 3, 4, 2, 5).reshape(batch, kernel, out_channels, rows,
                                                         kernel * cols)
        across = across @ horizontal.permute(0, 2, 1).reshape(kernel * cols, width)
        # Σ_dy, i: (y, dy·i) @ (n, o, dy·i, x)
        across = across.permute(0, 2, 1, 3, 4).reshape(batch, out_channels, kernel * rows, width)
        term = vertical.permute(1, 0, 2).reshape(height, kernel * rows) @ across
        total = term if total is None else total + term
    return total


def conv2d_over_pyramid(x: Tensor, pyramid: Sequence[Tensor], weight: Tensor,
                        bias: Tensor | None, boxes: Sequence[Box] | None = None,
                        after: Callable[[Tensor], Tensor] | None = None, *,
                        impl: str | None = None) -> Tensor:
    """``after(conv2d(cat([x, *upsampled(pyramid)]), weight, bias))`` (stride 1, padding
    k // 2) with each bin's share computed on its small map (module docstring).

    x (N, C_x, H, W); pyramid: bin maps (N, C_b, h_b, w_b); weight (O, C_x + ΣC_b, k, k).
    ``boxes``: one (top, bottom, left, right) per image; the output is evaluated inside it
    and is 0 elsewhere. ``after`` (a per-position map, e.g. an eval-mode BatchNorm) is
    applied to the evaluated values only. ``reference``:
    :func:`conv2d_over_pyramid_reference`.
    """
    if choose_impl(impl, IMPLS) == REFERENCE:
        return conv2d_over_pyramid_reference(x, pyramid, weight, bias, boxes, after)
    return _conv2d_split(x, pyramid, weight, bias, boxes, after)


def _conv2d_split(x: Tensor, pyramid: Sequence[Tensor], weight: Tensor, bias: Tensor | None,
                  boxes: Sequence[Box] | None, after: Callable[[Tensor], Tensor] | None
                  ) -> Tensor:
    """The fast form: x's own convolution plus each bin's term on its small map."""
    size = x.shape[-2:]
    split = [x.shape[1], *(p.shape[1] for p in pyramid)]
    if sum(split) != weight.shape[1]:
        raise ValueError(f"weight reads {weight.shape[1]} channels; x and the bins give "
                         f"{' + '.join(map(str, split))}")
    own, *bin_weights = weight.split(split, dim=1)
    extra = pyramid_term(pyramid, bin_weights, size) if pyramid else None
    # The bias rides with the bins' share, added after x's convolution. Passing it to the
    # convolution instead rounds differently, enough to move the synthetic HDMNet job's
    # score (43.61 -> 44.12 mIoU, docs/results.md).
    if bias is not None:
        bias_map = bias.view(1, -1, 1, 1)
        extra = bias_map if extra is None else extra + bias_map
    if boxes is None:
        out = F.conv2d(x, own, None, padding=weight.shape[-1] // 2)
        if extra is not None:
            out = out + extra
        return out if after is None else after(out)
    # The bins' share exists at every position: added inside each box, before ``after``.
    if extra is not None:
        extra = extra.expand(-1, -1, *size)
    return conv2d_in_boxes([x], own, None, boxes, after=after, add=extra)


def conv2d_over_pyramid_reference(x: Tensor, pyramid: Sequence[Tensor], weight: Tensor,
                                  bias: Tensor | None, boxes: Sequence[Box] | None = None,
                                  after: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The bins upsampled to x's size, concatenated after it and convolved (the whole map,
    zeroed outside ``boxes`` when given)."""
    inputs = [x, *upsampled(pyramid, x.shape[-2:])]
    if boxes is not None:
        return conv2d_in_boxes_reference(inputs, weight, bias, boxes, after=after)
    out = F.conv2d(torch.cat(inputs, dim=1), weight, bias, padding=weight.shape[-1] // 2)
    return out if after is None else after(out)
