"""The 4D kernels of HSNet's kernel ablation (paper Sec. 5, comparison of 4D kernels).

All three act on (N, C, Ha, Wa, Hb, Wb) correlation tensors with padding ``k // 2`` on
every dim and the stride on the support dims (Hb, Wb) only, so they are interchangeable in
the learner's blocks:

- ``center_pivot`` (HSNet's own, :class:`~fss.models.hsnet.conv4d.CenterPivotConv4d`): the
  4D kernel restricted to the two 2D slices through its centre.
- ``dense``: the original 4D convolution (Rocco et al., NC-Net), a full k⁴ kernel.
- ``separable``: the spatially separable 4D convolution of Yang & Ramanan (VCN, NeurIPS
  2019): a 2D convolution over the query dims (a k×k×1×1 kernel) followed by one over the
  support dims (1×1×k×k), with no non-linearity between them, so it is a 4D convolution
  whose kernel is a sum of outer products of two 2D kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.hsnet.conv4d import CenterPivotConv4d
from fss.utils.errors import ConfigError

KERNELS = ("center_pivot", "dense", "separable")


def _check_kernel_size(kernel_size: int) -> int:
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd to have a centre, got {kernel_size}")
    return kernel_size


class DenseConv4d(nn.Module):
    """A full 4D convolution on (N, C, Ha, Wa, Hb, Wb) tensors.

    ``weight`` is (C_out, C_in, k, k, k, k), ordered like the input dims (query h, query w,
    support h, support w); one bias per output channel. Output (N, C_out, Ha, Wa,
    ceil(Hb/s), ceil(Wb/s)).

    Computed as one 3D convolution over (Wa, Hb, Wb) of every query row, with the k slices
    of the kernel along the query-row dim stacked as output channels; output row ``i`` is
    then the sum over ``a`` of slice ``a`` applied to input row ``i + a - k//2``. Exact (no
    approximation) and one cuDNN/oneDNN call per layer; the intermediate is k times the
    output, not k⁴ times the input as an unfold would be.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int = 1
    ) -> None:
        super().__init__()
        self.kernel_size = _check_kernel_size(kernel_size)
        self.support_stride = support_stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(kernel_size,) * 4))
        self.bias = nn.Parameter(torch.empty(out_channels))
        # The initialisation torch uses for ConvNd layers, with the 4D fan-in.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_channels * kernel_size**4)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, Ha, Wa, Hb, Wb) -> (N, C_out, Ha, Wa, ceil(Hb/s), ceil(Wb/s))."""
        n, channels, ha, wa, hb, wb = x.shape
        k, pad, stride = self.kernel_size, self.kernel_size // 2, self.support_stride
        out_channels = self.weight.shape[0]
        rows = x.transpose(1, 2).reshape(n * ha, channels, wa, hb, wb)
        slices = self.weight.transpose(0, 2).transpose(1, 2)  # (k, C_out, C_in, k, k, k)
        slices = slices.reshape(k * out_channels, channels, k, k, k)
        per_slice = F.conv3d(rows, slices, stride=(1, stride, stride), padding=pad)
        hb_out, wb_out = per_slice.shape[-2:]
        per_slice = per_slice.view(n, ha, k, out_channels, wa, hb_out, wb_out)
        out = per_slice.new_zeros(n, ha, out_channels, wa, hb_out, wb_out)
        for offset in range(k):
            shift = offset - pad  # output row i reads input row i + shift
            first, last = max(0, -shift), min(ha, ha - shift)
            if first < last:
                out[:, first:last] += per_slice[:, first + shift : last + shift, offset]
        return out.transpose(1, 2) + self.bias.view(1, -1, 1, 1, 1, 1)


class SeparableConv4d(nn.Module):
    """Spatially separable 4D convolution (VCN): query-dims conv, then support-dims conv.

    Attributes:
        query_conv: k×k Conv2d over (Ha, Wa), C_in -> C_out, stride 1, applied at every
            support position.
        support_conv: k×k Conv2d over (Hb, Wb), C_out -> C_out, stride ``support_stride``,
            applied at every query position.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int = 1
    ) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        padding = kernel_size // 2
        self.support_stride = support_stride
        self.query_conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding)
        self.support_conv = nn.Conv2d(
            out_channels, out_channels, kernel_size, support_stride, padding
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, Ha, Wa, Hb, Wb) -> (N, C_out, Ha, Wa, ceil(Hb/s), ceil(Wb/s))."""
        n, channels, ha, wa, hb, wb = x.shape
        query = x.permute(0, 4, 5, 1, 2, 3).reshape(n * hb * wb, channels, ha, wa)
        query = self.query_conv(query)
        out_channels = query.shape[1]
        support = query.view(n, hb, wb, out_channels, ha, wa).permute(0, 4, 5, 3, 1, 2)
        support = self.support_conv(support.reshape(n * ha * wa, out_channels, hb, wb))
        hb_out, wb_out = support.shape[-2:]
        return support.view(n, ha, wa, out_channels, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)


def build_conv4d(
    kernel: str, in_channels: int, out_channels: int, kernel_size: int, support_stride: int = 1
) -> nn.Module:
    """The 4D convolution of type ``kernel`` (one of :data:`KERNELS`)."""
    classes = {
        "center_pivot": CenterPivotConv4d,
        "dense": DenseConv4d,
        "separable": SeparableConv4d,
    }
    if kernel not in classes:
        raise ConfigError(f"model.net.kernel={kernel!r} is not a 4D kernel; accepted: "
                          f"{', '.join(KERNELS)}")
    return classes[kernel](in_channels, out_channels, kernel_size, support_stride)
