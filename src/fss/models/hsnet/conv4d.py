"""Center-pivot 4D convolution (HSNet, Sec. 3.3).

A 4D kernel over (query h, query w, support h, support w) that is zero everywhere except on
the two 2D slices through its centre: the query slice (support offset 0) and the support
slice (query offset 0). Convolving with it is the sum of two 2D convolutions, one over the
query dims at every support position, one over the support dims at every query position.
"""

from __future__ import annotations

from torch import Tensor, nn


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

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, Ha, Wa, Hb, Wb) -> (N, C_out, Ha, Wa, ceil(Hb/s), ceil(Wb/s))."""
        n, channels, ha, wa, hb, wb = x.shape
        stride = self.support_stride
        # The query slice only contributes at the support positions where the strided
        # support conv places its outputs: 0, s, 2s, ... (with padding k//2 there are exactly
        # ceil(Hb/s) of them). A strided view selects them without building an index.
        pivots = x[..., ::stride, ::stride] if stride > 1 else x
        hb_out, wb_out = pivots.shape[-2:]

        query = pivots.permute(0, 4, 5, 1, 2, 3).reshape(n * hb_out * wb_out, channels, ha, wa)
        query = self.conv1(query)
        out_channels = query.shape[1]
        query = query.view(n, hb_out, wb_out, out_channels, ha, wa).permute(0, 3, 4, 5, 1, 2)

        support = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)
        support = self.conv2(support)
        if support.shape[-2:] != (hb_out, wb_out):  # impossible with odd k and padding k//2
            raise RuntimeError(f"support grid {tuple(support.shape[-2:])} != {(hb_out, wb_out)}")
        support = support.view(n, ha, wa, out_channels, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)
        # One contiguous result so GroupNorm and the next permute see a plain layout.
        return (query + support).contiguous()
