"""Center-pivot 4D convolution (HSNet, Sec. 3.3) and the GroupNorm that follows it.

A 4D kernel over (query h, query w, support h, support w) that is zero everywhere except on
the two 2D slices through its centre: the query slice (support offset 0) and the support
slice (query offset 0). Convolving with it is the sum of two 2D convolutions, one over the
query dims at every support position, one over the support dims at every query position.

Memory layouts. Tensors are always (N, C, Ha, Wa, Hb, Wb) in shape; only their strides
change. The fast path works in the *channels-last 6D* layout, memory order
(N, Ha, Wa, Hb, Wb, C): both branches run channels-last 2D convolutions, the support
branch's input (N·Ha·Wa, C, Hb, Wb) is a view of it, the two branch outputs add with
contiguous channel vectors, and :class:`GroupNorm6d` normalises it without changing the
layout. The hypercorrelation pyramid arrives *support-last* (N, Ha, Wa, C, Hb, Wb), where the
support branch's NCHW input is a view too; any other layout is copied once into
channels-last 6D. Only the query branch copies its input: the support positions it needs
(1/stride² of them) are gathered into a channels-last batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.folding import tensors_key
from fss.models.hsnet.correlation import BoxedCorrelation
from fss.models.matmul import matmul_as_conv


def is_channels_last_6d(x: Tensor) -> bool:
    """True when (N, C, Ha, Wa, Hb, Wb) is stored in memory order (N, Ha, Wa, Hb, Wb, C)."""
    return x.dim() == 6 and x.permute(0, 2, 3, 4, 5, 1).is_contiguous()


def is_support_last_6d(x: Tensor) -> bool:
    """True when (N, C, Ha, Wa, Hb, Wb) is stored in memory order (N, Ha, Wa, C, Hb, Wb)."""
    return x.dim() == 6 and x.permute(0, 2, 3, 1, 4, 5).is_contiguous()


def channels_last_6d(x: Tensor) -> Tensor:
    """The same values in the channels-last 6D layout (no copy if already there)."""
    if is_channels_last_6d(x):
        return x
    return x.permute(0, 2, 3, 4, 5, 1).contiguous().permute(0, 5, 1, 2, 3, 4)


def _conv2d(maps: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
    """``F.conv2d`` with an odd kernel and padding ``k // 2``.

    Where the stride exceeds the map (the deepest level once the support side is strided
    down to 1x1 or 2x2), the convolution has one output along that dimension, the same as
    with stride = map size, which is used instead. PyTorch's CPU bf16 convolution
    (torch 2.14 / oneDNN) returns NaN, inf or wrong weight gradients in 20-100 % of calls
    when the stride exceeds the input; fp32 is unaffected (tests/test_speed_equivalence.py).
    """
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    strides = tuple(min(s, size) for s, size in zip(strides, maps.shape[-2:], strict=True))
    return F.conv2d(maps, weight, bias, strides, padding)


def _windows_reaching(
    start: int, end: int, kernel: int, padding: int, stride: int, outputs: int
) -> tuple[int, int]:
    """Output indices [first, last) of a strided 1D convolution (``padding`` zeros each
    side) whose window [stride·i - padding, stride·i - padding + kernel) overlaps the input
    span [start, end)."""
    first = max(0, -(-(start + padding - kernel + 1) // stride))  # ceil division
    last = min(outputs, (end - 1 + padding) // stride + 1)
    return first, last


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution on (N, C, Ha, Wa, Hb, Wb) tensors.

    Padding is ``kernel_size // 2`` on all four dims; the stride applies to the support dims
    (Hb, Wb) only, as in HSNet's squeezing blocks. Any memory layout is accepted; the output
    is channels-last 6D (see the module docstring).

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
        self._support_matrix_cache: tuple | None = None  # see _support_matrix

    def forward(self, x: Tensor | BoxedCorrelation) -> Tensor:
        """x (N, C, Ha, Wa, Hb, Wb) -> (N, C_out, Ha, Wa, ceil(Hb/s), ceil(Wb/s)).

        ``x`` may also be a :class:`BoxedCorrelation` (inference only), see
        :meth:`_forward_boxed`.
        """
        if isinstance(x, BoxedCorrelation):
            return self._forward_boxed(x)
        if not (is_channels_last_6d(x) or is_support_last_6d(x)):
            x = channels_last_6d(x)
        support = self._support_branch(x)
        query = self._query_branch(x)
        if support.shape != query.shape:  # impossible with odd k and padding k//2
            raise RuntimeError(f"support branch {tuple(support.shape)} != query branch "
                               f"{tuple(query.shape)}")
        if is_channels_last_6d(support):
            # In place is safe for autograd: neither branch's backward reads its output.
            return support.add_(query)
        if torch.is_grad_enabled() and (support.requires_grad or query.requires_grad):
            return channels_last_6d(support + query)
        # Support-last support branch (first layer): the sum is written channels-last.
        n, channels, ha, wa, hb, wb = query.shape
        out = query.new_empty(n, ha, wa, hb, wb, channels).permute(0, 5, 1, 2, 3, 4)
        return torch.add(support, query, out=out)

    def _forward_boxed(self, level: BoxedCorrelation) -> Tensor:
        """The conv of a level that is 0 outside each pair's support box, convolving only
        where the box reaches; channels-last 6D output.

        Outside the box both branches see only zeros and give their bias: the support
        branch at every output position whose window misses the box, the query branch at
        every pivot (support position s·i, s·j) outside it. So the output is filled with
        ``conv1.bias + conv2.bias`` and the two branches' bias-free convolutions are added
        where the box reaches: the support branch over the box padded with zeros to whole
        windows, the query branch at the pivots inside the box.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("a BoxedCorrelation is for inference: build the dense "
                               "correlation (hypercorrelation_pyramid(boxed=False)) to train")
        n, channels, ha, wa, hb, wb = level.shape
        kernel = self.conv2.kernel_size[0]
        padding = kernel // 2
        stride = self.support_stride
        hb_out, wb_out = math.ceil(hb / stride), math.ceil(wb / stride)
        dtype = level.dtype
        if torch.is_autocast_enabled(level.device.type):
            dtype = torch.get_autocast_dtype(level.device.type)
        support_weight = self.conv2.weight.to(dtype)
        query_weight = self.conv1.weight.to(dtype).contiguous(memory_format=torch.channels_last)
        out_channels = query_weight.shape[0]
        out = torch.empty(n, ha, wa, hb_out, wb_out, out_channels, dtype=dtype,
                          device=level.device)
        out.copy_((self.conv1.bias + self.conv2.bias).to(dtype).expand_as(out))
        for pair, (box, values) in enumerate(zip(level.boxes, level.values, strict=True)):
            if values is None:
                continue
            values = values.to(dtype)
            top, bottom, left, right = box
            # Support branch: the output rows / columns whose windows reach the box.
            rows = _windows_reaching(top, bottom, kernel, padding, stride, hb_out)
            columns = _windows_reaching(left, right, kernel, padding, stride, wb_out)
            if rows[1] > rows[0] and columns[1] > columns[0]:
                # The box inside zeros that span exactly those windows (negative padding
                # crops box rows no window covers).
                first_row = stride * rows[0] - padding
                last_row = stride * (rows[1] - 1) - padding + kernel  # exclusive
                first_col = stride * columns[0] - padding
                last_col = stride * (columns[1] - 1) - padding + kernel
                maps = values.view(ha * wa, channels, bottom - top, right - left)
                maps = F.pad(maps, (left - first_col, last_col - right,
                                    top - first_row, last_row - bottom))
                support = _conv2d(maps, support_weight, None, stride, 0)
                region = out[pair, :, :, rows[0] : rows[1], columns[0] : columns[1]]
                region += support.view(ha, wa, out_channels, *support.shape[-2:]).permute(
                    0, 1, 3, 4, 2)
            # Query branch: the pivots inside the box.
            pivot_rows = (math.ceil(top / stride), math.ceil(bottom / stride))
            pivot_cols = (math.ceil(left / stride), math.ceil(right / stride))
            count_rows = pivot_rows[1] - pivot_rows[0]
            count_cols = pivot_cols[1] - pivot_cols[0]
            if count_rows > 0 and count_cols > 0:
                pivots = values[..., stride * pivot_rows[0] - top :: stride,
                                stride * pivot_cols[0] - left :: stride]
                maps = pivots.permute(3, 4, 0, 1, 2).contiguous()  # (rows, cols, ha, wa, C)
                maps = maps.view(-1, ha, wa, channels).permute(0, 3, 1, 2)
                query = _conv2d(maps, query_weight, None, 1, padding)
                query = query.permute(0, 2, 3, 1).view(count_rows, count_cols, ha, wa, -1)
                region = out[pair, :, :, pivot_rows[0] : pivot_rows[1],
                             pivot_cols[0] : pivot_cols[1]]
                region += query.permute(2, 3, 0, 1, 4)
        return out.permute(0, 5, 1, 2, 3, 4)

    def _support_branch(self, x: Tensor) -> Tensor:
        """conv2 over (Hb, Wb) at every query position, in the input's layout.

        Channels-last input: channels-last convolution, channels-last 6D output; for maps
        that every kernel window covers whole (2x2 maps under a 3x3 kernel: the mixing
        blocks at 400²; 1x1 maps at small sizes), one matrix product instead
        (:meth:`_support_matrix`).
        Support-last input (the correlation, few channels): NCHW convolution on the free
        view; converting that large tensor to channels-last first costs more than it saves.
        """
        n, channels, ha, wa, hb, wb = x.shape
        conv = self.conv2
        if is_channels_last_6d(x) and self._windows_cover(hb, wb):
            # (N·Ha·Wa, Hb·Wb·C) rows, a view; the product is (N, Ha, Wa, Hb', Wb', C_out).
            matrix, bias = self._support_matrix(hb, wb, x.dtype)
            rows = x.permute(0, 2, 3, 4, 5, 1).reshape(n * ha * wa, hb * wb * channels)
            out = matmul_as_conv(rows, matrix, bias)
            hb_out, wb_out = math.ceil(hb / self.support_stride), math.ceil(wb / self.support_stride)
            return out.view(n, ha, wa, hb_out, wb_out, -1).permute(0, 5, 1, 2, 3, 4)
        maps = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)  # a view
        weight = conv.weight
        if is_channels_last_6d(x):
            weight = weight.contiguous(memory_format=torch.channels_last)
        out = _conv2d(maps, weight, conv.bias, conv.stride, conv.padding)
        hb_out, wb_out = out.shape[-2:]
        if is_channels_last_6d(x):
            out = out.permute(0, 2, 3, 1).reshape(n, ha, wa, hb_out, wb_out, -1)
            return out.permute(0, 5, 1, 2, 3, 4)
        return out.view(n, ha, wa, -1, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)

    def _windows_cover(self, hb: int, wb: int) -> bool:
        """Whether every output window of conv2 covers the whole (hb, wb) map: then its
        dense matrix has no entry the convolution would skip, and costs it no extra FLOPs."""
        kernel = self.conv2.kernel_size[0]
        padding, stride = kernel // 2, self.support_stride
        return all(
            stride * (math.ceil(size / stride) - 1) - padding <= 0
            and kernel - 1 - padding >= size - 1
            for size in (hb, wb)
        )

    def _support_matrix(self, hb: int, wb: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """conv2 on (hb, wb) maps as a (hb·wb·C_in, hb'·wb'·C_out) matrix over flattened
        channels-last maps, and the bias repeated per output position.

        The matrix is the convolution of the one-hot basis maps, so it is exact for any
        kernel, stride and padding, and differentiable. Without autograd it is cached until
        the weights change.
        """
        weight, bias = self.conv2.weight, self.conv2.bias
        # With autograd the matrix is part of this step's graph: built anew every call.
        cacheable = not (torch.is_grad_enabled() and weight.requires_grad)
        key = (hb, wb, dtype, tensors_key((weight, bias)))
        cached = self._support_matrix_cache
        if cacheable and cached is not None and cached[0] == key:
            return cached[1]
        channels = weight.shape[1]
        size = hb * wb * channels
        basis = torch.eye(size, dtype=dtype, device=weight.device)
        basis = basis.view(size, hb, wb, channels).permute(0, 3, 1, 2)
        images = _conv2d(basis, weight.to(dtype), None, self.conv2.stride, self.conv2.padding)
        positions = images.shape[-2] * images.shape[-1]
        matrix = images.permute(0, 2, 3, 1).reshape(size, -1)
        entry = (matrix, bias.to(dtype).repeat(positions))
        self._support_matrix_cache = (key, entry) if cacheable else None
        return entry

    def _query_branch(self, x: Tensor) -> Tensor:
        """conv1 over (Ha, Wa) at the support positions conv2 keeps, channels-last;
        returned as (N, C_out, Ha, Wa, Hb', Wb') stored (N, Hb', Wb', Ha, Wa, C_out).

        The query slice only contributes where the strided support conv places its outputs:
        support positions 0, s, 2s, ... (with padding k//2 there are exactly ceil(Hb/s)).
        """
        stride = self.support_stride
        pivots = x[..., ::stride, ::stride] if stride > 1 else x
        n, channels, ha, wa, hb_out, wb_out = pivots.shape
        # One gather copy into a channels-last batch of (Ha, Wa) maps.
        maps = pivots.permute(0, 4, 5, 2, 3, 1).contiguous()
        maps = maps.view(n * hb_out * wb_out, ha, wa, channels).permute(0, 3, 1, 2)
        out = _conv2d(
            maps,
            self.conv1.weight.contiguous(memory_format=torch.channels_last),
            self.conv1.bias,
            1,
            self.conv1.padding,
        )
        out = out.permute(0, 2, 3, 1).reshape(n, hb_out, wb_out, ha, wa, -1)
        return out.permute(0, 5, 3, 4, 1, 2)


# Positions per chunk of GroupNorm6d's statistics without autograd (16 channels: 512 KiB).
_STATISTICS_CHUNK = 8192


class GroupNorm6d(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that normalises channels-last
    6D tensors without a layout copy and keeps their layout. Other inputs go to
    ``nn.GroupNorm``.

    PyTorch's own channels-last GroupNorm kernel was measured 7e-4 off fp64 on these
    sizes, so the statistics are computed here (see ``forward``).

    ``inplace``: without autograd, write the result over the input (as ``nn.ReLU``'s
    flag; the learner's blocks set it, where the input is the conv's fresh output).
    R50 5-shot 400², the first squeeze layer's norm + ReLU: 35 -> 19 ms with the chunked
    statistics.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, inplace: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if not is_channels_last_6d(x):
            return super().forward(x)
        n, channels = x.shape[:2]
        groups = self.num_groups
        flat = x.permute(0, 2, 3, 4, 5, 1).reshape(n, -1, channels)  # a view
        # Per-channel sums over all positions (fast column reductions), then per group.
        # E[x²] - E[x]² in fp32 is within ~1e-6 relative of fp64 here (activations whose
        # mean is not orders of magnitude above their spread); torch.var_mean over these
        # strided dims was 4-60x slower.
        autograd = torch.is_grad_enabled() and flat.requires_grad
        count = flat.shape[1] * (channels // groups)
        if autograd:
            sums, square_sums = flat.sum(dim=1), (flat * flat).sum(dim=1)
        else:  # in chunks that stay in cache: no full-size temporary for the squares
            sums = flat.new_zeros(n, channels)
            square_sums = flat.new_zeros(n, channels)
            for chunk in flat.split(_STATISTICS_CHUNK, dim=1):
                sums += chunk.sum(dim=1)
                square_sums += (chunk * chunk).sum(dim=1)
        mean = sums.view(n, groups, -1).sum(dim=2) / count  # (N, G)
        mean_square = square_sums.view(n, groups, -1).sum(dim=2) / count
        var = (mean_square - mean * mean).clamp(min=0)
        scale = (var + self.eps).rsqrt().repeat_interleave(channels // groups, dim=1)
        shift = -mean.repeat_interleave(channels // groups, dim=1) * scale  # (N, C)
        if self.affine:
            shift = shift * self.weight + self.bias
            scale = scale * self.weight
        # Per-sample 2D addcmul: the 3D broadcast form was several times slower on CPU.
        if autograd:
            out = torch.stack([torch.addcmul(shift[i], flat[i], scale[i]) for i in range(n)])
        else:
            out = flat if self.inplace else torch.empty_like(flat)
            for i in range(n):
                torch.addcmul(shift[i], flat[i], scale[i], out=out[i])
        return out.view(n, *x.shape[2:], channels).permute(0, 5, 1, 2, 3, 4)
