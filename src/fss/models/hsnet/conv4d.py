"""Center-pivot 4D convolution (HSNet, Sec. 3.3) and the GroupNorm that follows it.

A 4D kernel over (query h, query w, support h, support w) that is zero everywhere except on
the two 2D slices through its centre: the query slice (support offset 0) and the support
slice (query offset 0). Convolving with it is the sum of two 2D convolutions, one over the
query dims at every support position, one over the support dims at every query position
(the op and its layouts: :mod:`fss.ops.conv4d`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.ops.conv4d import (
    SupportMatrixCache,
    center_pivot_conv4d,
    channels_last_6d,
    group_norm_6d,
    is_channels_last_6d,
)
from fss.ops.correlation import BoxedCorrelation

__all__ = ["CenterPivotConv4d", "GroupNorm6d", "ReLU6d", "channels_last_6d", "is_channels_last_6d"]


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution on (N, C, Ha, Wa, Hb, Wb) tensors.

    Padding is ``kernel_size // 2`` on all four dims; the stride applies to the support dims
    (Hb, Wb) only, as in HSNet's squeezing blocks.

    Attributes (names match the official checkpoints' keys):
        conv1: 2D conv over the query dims (the kernel's query slice), stride 1, with bias.
        conv2: 2D conv over the support dims (the kernel's support slice), stride
            ``support_stride``, with bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int = 1
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to have a centre, got {kernel_size}")
        padding = kernel_size // 2
        self.support_stride = support_stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding, bias=True)
        self.conv2 = nn.Conv2d(
            in_channels, out_channels, kernel_size, support_stride, padding, bias=True
        )
        self.support_matrices = SupportMatrixCache()  # not a submodule: no state-dict keys

    def forward(self, x: Tensor | BoxedCorrelation) -> Tensor:
        """x (N, C, Ha, Wa, Hb, Wb), or its :class:`BoxedCorrelation` ->
        (N, C_out, Ha, Wa, ceil(Hb/s), ceil(Wb/s))."""
        return center_pivot_conv4d(
            x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
            self.support_stride, matrix_cache=self.support_matrices)


class GroupNorm6d(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) over (N, C, Ha, Wa, Hb, Wb)
    tensors that keeps a channels-last 6D layout (:func:`fss.ops.conv4d.group_norm_6d`).

    ``inplace``: without autograd, write the result over the input (as ``nn.ReLU``'s
    flag; the learner's blocks set it, where the input is the conv's fresh output).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, inplace: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_6d(x, self.num_groups, self.weight, self.bias, self.eps,
                             inplace=self.inplace)


class ReLU6d(nn.ReLU):
    """``nn.ReLU`` for the 6D layouts: in place without autograd (inference), out of place
    with it.

    A channels-last 6D tensor is a permuted view of its storage. An in-place op on such a
    view makes autograd route the whole gradient through the view's base in the backward
    pass (one copy of the full gradient and one of the slice per layer: HSNet R50 400²,
    batch 2, 15 of the learner's ReLUs); out of place the backward is one threshold pass.
    """

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))
