"""Matrix products run as oneDNN 1x1 convolutions (CPU speed, same values).

Fast: :func:`matmul_as_conv`; reference: :func:`matmul_reference` (``rows @ matrix``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fss.ops.config import FAST, REFERENCE, choose_impl

IMPLS = (FAST, REFERENCE)


def matmul(rows: Tensor, matrix: Tensor, bias: Tensor | None = None, *,
           impl: str | None = None) -> Tensor:
    """rows (P, C) @ matrix (C, S) (+ bias (S,)) -> (P, S) contiguous; ``impl`` ``fast``
    (:func:`matmul_as_conv`) or ``reference``, default after the switch."""
    if choose_impl(impl, IMPLS) == REFERENCE:
        return matmul_reference(rows, matrix, bias)
    return matmul_as_conv(rows, matrix, bias)


def matmul_reference(rows: Tensor, matrix: Tensor, bias: Tensor | None = None) -> Tensor:
    """rows (P, C) @ matrix (C, S) (+ bias (S,)), as ``torch.mm``."""
    out = rows @ matrix
    return out if bias is None else out + bias


def matmul_as_conv(rows: Tensor, matrix: Tensor, bias: Tensor | None = None) -> Tensor:
    """rows (P, C) @ matrix (C, S) (+ bias (S,)) -> (P, S) contiguous, as a 1x1 convolution.

    The rows become a channels-last (1, C, P, 1) map (a view when ``rows`` is contiguous)
    and the matrix's columns S filters. On the AVX-512 AMD CPU measured (2 threads)
    oneDNN's convolution ran 2.1-2.7x the GFLOP/s of ``torch.mm`` (MKL): 395-431 vs 162-186
    for (2500 ... 12500) x 512 x (512 ... 2880) products. Fewer than a few hundred rows it
    can be slower (169 x 2048 x 845: 127 vs 167), and on the AVX2 CPU measured ``torch.mm``
    was faster at most shapes, so the kernels that use it choose per machine
    (:mod:`fss.ops.calibration`). The result equals the matmul up to float rounding;
    autocast applies as to any convolution.
    """
    positions, channels = rows.shape
    if 0 in (positions, channels, matrix.shape[1]):  # a convolution needs filters and input
        return matmul_reference(rows, matrix, bias)
    maps = rows.contiguous().view(1, positions, 1, channels).permute(0, 3, 1, 2)
    filters = matrix.t().reshape(matrix.shape[1], channels, 1, 1)
    return F.conv2d(maps, filters, bias).permute(0, 2, 3, 1).reshape(positions, -1)
