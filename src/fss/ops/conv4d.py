"""Center-pivot 4D convolution (HSNet, Sec. 3.3), GroupNorm and resizing over 6D tensors.

A center-pivot 4D kernel over (query h, query w, support h, support w) is zero everywhere
except on the two 2D slices through its centre: the query slice (support offset 0) and the
support slice (query offset 0). Convolving with it is the sum of two 2D convolutions, one
over the query dims at every support position, one over the support dims at every query
position. Padding is ``k // 2`` on all four dims; the stride applies to the support dims.

Implementations (``impl``, default after :func:`fss.ops.use_fast_paths`):

- ``reference``: :func:`center_pivot_conv4d_reference`, :func:`group_norm_6d_reference`,
  the permute-based resizes: contiguous tensors, one permute + copy per branch, the
  official data flow.
- ``fast``: the channels-last 6D pipeline below.

Memory layouts of the fast path. Tensors are always (N, C, Ha, Wa, Hb, Wb) in shape; only
their strides change. The fast path works in the *channels-last 6D* layout, memory order
(N, Ha, Wa, Hb, Wb, C): both branches run channels-last 2D convolutions, the support
branch's input (N·Ha·Wa, C, Hb, Wb) is a view of it, the two branch outputs add with
contiguous channel vectors, and :func:`group_norm_6d` normalises it without changing the
layout. The hypercorrelation pyramid arrives *support-last* (N, Ha, Wa, C, Hb, Wb), where the
support branch's NCHW input is a view too; any other layout is copied once into
channels-last 6D. Only the query branch copies its input: the support positions it needs
(1/stride² of them) are gathered into a channels-last batch. Two more branches are chosen
by the input, both exact: a :class:`~fss.ops.correlation.BoxedCorrelation` (inference and training) is
convolved only where its support boxes reach; support maps that every kernel window covers
whole (2x2 maps under a 3x3 kernel) run the support branch as one matrix product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fss.ops.calibration import SUPPORT_MATRIX, use_conv
from fss.ops.config import FAST, REFERENCE, choose_impl
from fss.ops.correlation import BoxedCorrelation
from fss.ops.folding import tensors_key
from fss.ops.matmul import matmul_as_conv

IMPLS = (FAST, REFERENCE)
# Positions per chunk of group_norm_6d's statistics without autograd (16 channels: 512 KiB).
_STATISTICS_CHUNK = 8192


# ----------------------------------------------------------------------------- layouts
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


# ---------------------------------------------------------------- center-pivot 4D conv
def center_pivot_conv4d(
    x: Tensor | BoxedCorrelation,
    query_weight: Tensor,
    query_bias: Tensor,
    support_weight: Tensor,
    support_bias: Tensor,
    support_stride: int = 1,
    *,
    impl: str | None = None,
    matrix_cache: SupportMatrixCache | None = None,
) -> Tensor:
    """Center-pivot 4D conv: x (N, C, Ha, Wa, Hb, Wb) -> (N, C_out, Ha, Wa, ceil(Hb/s),
    ceil(Wb/s)).

    query_weight (C_out, C, k, k) / query_bias: the kernel's query slice (stride 1);
    support_weight / support_bias: its support slice (stride ``support_stride``); k odd.
    ``x`` may be in any memory layout, or a :class:`BoxedCorrelation`.
    ``fast`` returns channels-last 6D; ``matrix_cache`` keeps the support branch's matrix
    between inference calls (see :class:`SupportMatrixCache`). ``reference`` returns a
    contiguous tensor.
    """
    if choose_impl(impl, IMPLS) == REFERENCE:
        if isinstance(x, BoxedCorrelation):
            x = x.to_dense()
        return center_pivot_conv4d_reference(x, query_weight, query_bias, support_weight,
                                             support_bias, support_stride)
    if isinstance(x, BoxedCorrelation):
        return _boxed_conv(x, query_weight, query_bias, support_weight, support_bias,
                           support_stride)
    # The support-last level (the correlation) is read as it is without autograd. With
    # it, it is copied to channels-last 6D once: oneDNN's weight gradient of the support
    # branch on the support-last (NCHW, 4 channels) view took 3.3x the channels-last one
    # (HSNet R50 400², batch 2, level 2's first squeeze conv, forward + backward:
    # 550 -> 350 ms with the copy).
    trains = torch.is_grad_enabled() and support_weight.requires_grad
    if not is_channels_last_6d(x) and (trains or not is_support_last_6d(x)):
        x = channels_last_6d(x)
    if _one_backward_node(x, support_weight, support_stride):
        support, maps = _SupportBranchAndPivots.apply(x, support_weight, support_bias,
                                                      support_stride)
    else:
        support = _support_branch(x, support_weight, support_bias, support_stride,
                                  matrix_cache)
        maps = _pivot_maps(x, support_stride)
    query = _query_branch(x, maps, query_weight, query_bias, support_stride)
    if support.shape != query.shape:  # impossible with odd k and padding k//2
        raise RuntimeError(f"support branch {tuple(support.shape)} != query branch "
                           f"{tuple(query.shape)}")
    autograd = torch.is_grad_enabled() and (support.requires_grad or query.requires_grad)
    if autograd or torch.compiler.is_compiling():  # dynamo takes no strided ``out=``
        # Out of place: an in-place add into the support branch (a permuted view of its
        # conv's output) would make autograd copy the whole gradient back through the view
        # (CopySlices) in every backward pass. Both branches are channels-last 6D, so the
        # sum is too.
        return channels_last_6d(support + query)
    if is_channels_last_6d(support):
        return support.add_(query)
    # Support-last support branch (first layer): the sum is written channels-last.
    n, channels, ha, wa, hb, wb = query.shape
    out = query.new_empty(n, ha, wa, hb, wb, channels).permute(0, 5, 1, 2, 3, 4)
    return torch.add(support, query, out=out)


def center_pivot_conv4d_reference(
    x: Tensor,
    query_weight: Tensor,
    query_bias: Tensor,
    support_weight: Tensor,
    support_bias: Tensor,
    support_stride: int = 1,
) -> Tensor:
    """The two 2D convolutions of :func:`center_pivot_conv4d` as the paper states them, on
    contiguous copies: the query slice at every kept support position (0, s, 2s, ...), the
    support slice at every query position, summed."""
    x = x.contiguous()
    n, channels, ha, wa, hb, wb = x.shape
    padding = query_weight.shape[-1] // 2
    pivots = x[..., ::support_stride, ::support_stride] if support_stride > 1 else x
    hb_out, wb_out = pivots.shape[-2:]
    query = pivots.permute(0, 4, 5, 1, 2, 3).reshape(n * hb_out * wb_out, channels, ha, wa)
    query = F.conv2d(query, query_weight, query_bias, 1, padding)
    out_channels = query.shape[1]
    query = query.view(n, hb_out, wb_out, out_channels, ha, wa).permute(0, 3, 4, 5, 1, 2)
    support = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)
    support = F.conv2d(support, support_weight, support_bias, support_stride, padding)
    support = support.view(n, ha, wa, out_channels, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)
    return (query + support).contiguous()


def _conv2d(maps: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
    """``F.conv2d`` with an odd kernel and padding ``k // 2``.

    Where the stride exceeds the map (the deepest level once the support side is strided
    down to 1x1 or 2x2), the convolution has one output along that dimension, the same as
    with stride = map size, which is used instead. PyTorch's CPU bf16 convolution
    (torch 2.14 / oneDNN) returns NaN, inf or wrong weight gradients in 20-100 % of calls
    when the stride exceeds the input; fp32 is unaffected (tests/ops/test_conv4d.py).
    """
    return F.conv2d(maps, weight, bias, _strides(stride, maps), padding)


def _strides(stride, maps: Tensor) -> tuple[int, int]:
    """:func:`_conv2d`'s strides: at most the map's size along each dimension."""
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    return tuple(min(s, size) for s, size in zip(strides, maps.shape[-2:], strict=True))


def _conv2d_backward(grad: Tensor, maps: Tensor, weight: Tensor, stride, padding: int,
                     needed: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of :func:`_conv2d`'s input, weight and bias for output gradient
    ``grad``, each where ``needed`` says so (else None)."""
    return torch.ops.aten.convolution_backward(
        grad, maps, weight, [weight.shape[0]], list(_strides(stride, maps)),
        [padding, padding], [1, 1], False, [0, 0], 1, needed)


def _weight_gradient(grad: Tensor, maps: Tensor, weight: Tensor, stride, padding: int
                     ) -> Tensor:
    """The gradient of :func:`_conv2d`'s weight alone, for output gradient ``grad``."""
    return _conv2d_backward(grad, maps, weight, stride, padding, [False, True, False])[1]


def _windows_reaching(
    start: int, end: int, kernel: int, padding: int, stride: int, outputs: int
) -> tuple[int, int]:
    """Output indices [first, last) of a strided 1D convolution (``padding`` zeros each
    side) whose window [stride·i - padding, stride·i - padding + kernel) overlaps the input
    span [start, end)."""
    first = max(0, -(-(start + padding - kernel + 1) // stride))  # ceil division
    last = min(outputs, (end - 1 + padding) // stride + 1)
    return first, last


def _boxed_conv(level: BoxedCorrelation, query_weight: Tensor, query_bias: Tensor,
                support_weight: Tensor, support_bias: Tensor, stride: int) -> Tensor:
    """The conv of a level that is 0 outside each pair's support box, convolving only
    where the box reaches; channels-last 6D output.

    Outside the box both branches see only zeros and give their bias: the support
    branch at every output position whose window misses the box, the query branch at
    every pivot (support position s·i, s·j) outside it. So the output is filled with
    ``query_bias + support_bias`` and the two branches' bias-free convolutions are added
    where the box reaches: the support branch over the box padded with zeros to whole
    windows, the query branch at the pivots inside the box.

    Under autograd (training the learner; the correlation itself needs no gradient) the
    weights' gradients come from the same boxes (:class:`_BoxedConv`), so training reads
    the level as boxes too.
    """
    if torch.is_grad_enabled() and any(
            p.requires_grad for p in (query_weight, query_bias, support_weight, support_bias)):
        return _BoxedConv.apply(level, query_weight, query_bias, support_weight,
                                support_bias, stride)
    return _boxed_conv_forward(level, query_weight, query_bias, support_weight,
                               support_bias, stride, None)


def _boxed_conv_forward(level: BoxedCorrelation, query_weight: Tensor, query_bias: Tensor,
                        support_weight: Tensor, support_bias: Tensor, stride: int,
                        saved: list | None) -> Tensor:
    """:func:`_boxed_conv`'s values. With ``saved`` (a list), each branch's conv input and
    output region are appended to it for the weights' gradients, and the support branch
    runs channels-last (oneDNN's weight gradient on the few-channel NCHW maps took 3.3x
    as long)."""
    n, channels, ha, wa, hb, wb = level.shape
    kernel = support_weight.shape[-1]
    padding = kernel // 2
    hb_out, wb_out = math.ceil(hb / stride), math.ceil(wb / stride)
    dtype = level.dtype
    if torch.is_autocast_enabled(level.device.type):
        dtype = torch.get_autocast_dtype(level.device.type)
    with torch.no_grad():
        support_weight = support_weight.to(dtype)
        query_weight = query_weight.to(dtype).contiguous(memory_format=torch.channels_last)
        if saved is not None:
            support_weight = support_weight.contiguous(memory_format=torch.channels_last)
        out_channels = query_weight.shape[0]
        out = torch.empty(n, ha, wa, hb_out, wb_out, out_channels, dtype=dtype,
                          device=level.device)
        out.copy_((query_bias + support_bias).to(dtype).expand_as(out))
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
                if saved is not None:
                    maps = maps.contiguous(memory_format=torch.channels_last)
                    saved.append(("support", pair, rows, columns, maps))
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
                if saved is not None:
                    saved.append(("query", pair, pivot_rows, pivot_cols, maps))
                query = _conv2d(maps, query_weight, None, 1, padding)
                query = query.permute(0, 2, 3, 1).view(count_rows, count_cols, ha, wa, -1)
                region = out[pair, :, :, pivot_rows[0] : pivot_rows[1],
                             pivot_cols[0] : pivot_cols[1]]
                region += query.permute(2, 3, 0, 1, 4)
    return out.permute(0, 5, 1, 2, 3, 4)


class _BoxedConv(torch.autograd.Function):
    """:func:`_boxed_conv` with the weights' and biases' gradients (the level has none).

    Each bias reaches every output position: its gradient is the output gradient summed
    over positions. Each weight's gradient is the sum over pairs of its branch's weight
    gradient, from the output gradient inside the region that branch wrote and the conv
    input kept in the forward pass (the box-sized maps, not the dense level).
    """

    @staticmethod
    def forward(ctx, level: BoxedCorrelation, query_weight: Tensor, query_bias: Tensor,
                support_weight: Tensor, support_bias: Tensor, stride: int) -> Tensor:
        saved: list = []
        out = _boxed_conv_forward(level, query_weight, query_bias, support_weight,
                                  support_bias, stride, saved)
        ctx.inputs = saved
        ctx.stride = stride
        ctx.save_for_backward(query_weight, support_weight)
        ctx.bias_dtypes = (query_bias.dtype, support_bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        query_weight, support_weight = ctx.saved_tensors
        grad = grad.permute(0, 2, 3, 4, 5, 1)  # (N, Ha, Wa, Hb', Wb', C_out)
        n, ha, wa, _, _, out_channels = grad.shape
        kernel = support_weight.shape[-1]
        grads = {"query": None, "support": None}
        weights = {"query": query_weight.to(grad.dtype).contiguous(
                       memory_format=torch.channels_last),
                   "support": support_weight.to(grad.dtype).contiguous(
                       memory_format=torch.channels_last)}
        for branch, pair, rows, columns, maps in ctx.inputs:
            region = grad[pair, :, :, rows[0] : rows[1], columns[0] : columns[1]]
            if branch == "support":  # conv output (Ha·Wa, C_out, rows, cols), channels-last
                region = region.reshape(ha * wa, rows[1] - rows[0], columns[1] - columns[0],
                                        out_channels)
                stride, padding = ctx.stride, 0
            else:  # conv output (rows·cols, C_out, Ha, Wa), channels-last
                region = region.permute(2, 3, 0, 1, 4).reshape(-1, ha, wa, out_channels)
                stride, padding = 1, kernel // 2
            gradient = _weight_gradient(region.permute(0, 3, 1, 2), maps, weights[branch],
                                        stride, padding)
            grads[branch] = gradient if grads[branch] is None else grads[branch] + gradient
        query_dtype, support_dtype = ctx.bias_dtypes
        bias_gradient = torch.sum(grad, dim=(0, 1, 2, 3, 4), dtype=query_dtype)
        outputs = [None,
                   _or_zeros(grads["query"], query_weight),
                   bias_gradient.to(query_dtype),
                   _or_zeros(grads["support"], support_weight),
                   bias_gradient.to(support_dtype),
                   None]
        return tuple(g if needed else None
                     for g, needed in zip(outputs, ctx.needs_input_grad, strict=True))


def _or_zeros(gradient: Tensor | None, weight: Tensor) -> Tensor:
    """A weight's gradient in its dtype and layout; zeros where no pair reached it."""
    if gradient is None:
        return torch.zeros_like(weight)
    return gradient.to(weight.dtype).contiguous()


def _support_branch(x: Tensor, weight: Tensor, bias: Tensor, stride: int,
                    matrix_cache: SupportMatrixCache | None) -> Tensor:
    """The support slice over (Hb, Wb) at every query position, in the input's layout.

    Channels-last input: channels-last convolution, channels-last 6D output; for maps
    that every kernel window covers whole (:func:`windows_cover`: 2x2 maps under a 3x3
    kernel, the mixing blocks at 400²; 1x1 maps at small sizes), one matrix product instead
    (:func:`support_matrix`; a oneDNN 1x1 convolution or ``torch.mm``, whichever
    :mod:`fss.ops.calibration` measured faster on this machine).
    Support-last input (the correlation, few channels): NCHW convolution on the free
    view; converting that large tensor to channels-last first costs more than it saves.
    """
    n, channels, ha, wa, hb, wb = x.shape
    padding = weight.shape[-1] // 2
    if is_channels_last_6d(x) and windows_cover(hb, wb, weight.shape[-1], stride):
        # (N·Ha·Wa, Hb·Wb·C) rows, a view; the product is (N, Ha, Wa, Hb', Wb', C_out).
        cache = matrix_cache if matrix_cache is not None else SupportMatrixCache()
        matrix, repeated_bias = cache.get(weight, bias, hb, wb, stride, x.dtype)
        rows = x.permute(0, 2, 3, 4, 5, 1).reshape(n * ha * wa, hb * wb * channels)
        # The product path measured faster on this machine (fss.ops.calibration).
        if use_conv(SUPPORT_MATRIX, rows, matrix):
            out = matmul_as_conv(rows, matrix, repeated_bias)
        else:
            out = torch.addmm(repeated_bias, rows, matrix)
        hb_out, wb_out = math.ceil(hb / stride), math.ceil(wb / stride)
        return out.view(n, ha, wa, hb_out, wb_out, -1).permute(0, 5, 1, 2, 3, 4)
    maps = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)  # a view
    if is_channels_last_6d(x):
        weight = weight.contiguous(memory_format=torch.channels_last)
    out = _conv2d(maps, weight, bias, stride, padding)
    hb_out, wb_out = out.shape[-2:]
    if is_channels_last_6d(x):
        out = out.permute(0, 2, 3, 1).reshape(n, ha, wa, hb_out, wb_out, -1)
        return out.permute(0, 5, 1, 2, 3, 4)
    return out.view(n, ha, wa, -1, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)


def _one_backward_node(x: Tensor, support_weight: Tensor, stride: int) -> bool:
    """Whether the support branch and the query branch's gather run as one autograd node
    (:class:`_SupportBranchAndPivots`): a channels-last level that needs its gradient, on
    the support branch's convolution path, in the weights' dtype (no autocast)."""
    hb, wb = x.shape[-2:]
    return (torch.is_grad_enabled() and x.requires_grad and is_channels_last_6d(x)
            and x.dtype == support_weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not windows_cover(hb, wb, support_weight.shape[-1], stride))


class _SupportBranchAndPivots(torch.autograd.Function):
    """:func:`_support_branch` (convolution path) and :func:`_pivot_maps` of one level, as
    one autograd node.

    As two nodes, autograd builds the level's gradient from the gather's side as a
    zero-filled level-sized tensor with the pivot maps' gradient copied in, then adds it
    to the support branch's input gradient: two passes over the level (at R50 400², level
    2's second layer: 43 MB each) for a gradient that is non-zero at 1/stride² of the
    positions. Here the support branch's input gradient is taken as it comes from the
    convolution's backward, and the pivot maps' gradient is added in place at the pivots
    only. Each sum has the same two terms as before, so the gradient is bit for bit the
    same.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, stride: int
                ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return _support_branch(x, weight, bias, stride, None), _pivot_maps(x, stride)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_support: Tensor, grad_maps: Tensor):
        # Both outputs are used; autograd passes zeros for one that got no gradient.
        x, weight = ctx.saved_tensors
        stride = ctx.stride
        n, channels, ha, wa, hb, wb = x.shape
        needs_x = ctx.needs_input_grad[0]
        # The convolution's output gradient (N·Ha·Wa, C_out, Hb', Wb'), channels-last.
        hb_out, wb_out = grad_support.shape[-2:]
        rows = grad_support.permute(0, 2, 3, 4, 5, 1).reshape(
            n * ha * wa, hb_out, wb_out, -1).permute(0, 3, 1, 2)
        maps = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)
        grad_x, grad_weight, grad_bias = _conv2d_backward(
            rows, maps, weight.contiguous(memory_format=torch.channels_last), stride,
            weight.shape[-1] // 2, list(ctx.needs_input_grad[:3]))
        if grad_weight is not None:
            grad_weight = grad_weight.contiguous()
        if needs_x:
            grad_x = grad_x.permute(0, 2, 3, 1).reshape(n, ha, wa, hb, wb, channels)
            # (N·Hb'·Wb', C, Ha, Wa) -> (N, Ha, Wa, Hb', Wb', C), added at the pivots.
            pivots = grad_maps.permute(0, 2, 3, 1).reshape(n, hb_out, wb_out, ha, wa, channels)
            grad_x[:, :, :, ::stride, ::stride].add_(pivots.permute(0, 3, 4, 1, 2, 5))
            grad_x = grad_x.permute(0, 5, 1, 2, 3, 4)
        return grad_x, grad_weight, grad_bias, None


def windows_cover(hb: int, wb: int, kernel: int, stride: int) -> bool:
    """Whether every output window of a (kernel, stride, padding kernel // 2) conv covers
    the whole (hb, wb) map: then its dense matrix has no entry the convolution would skip,
    and costs it no extra FLOPs."""
    padding = kernel // 2
    return all(
        stride * (math.ceil(size / stride) - 1) - padding <= 0
        and kernel - 1 - padding >= size - 1
        for size in (hb, wb)
    )


def support_matrix(weight: Tensor, bias: Tensor, hb: int, wb: int, stride: int,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A (kernel, stride, padding kernel // 2) conv on (hb, wb) maps as a
    (hb·wb·C_in, hb'·wb'·C_out) matrix over flattened channels-last maps, and the bias
    repeated per output position.

    Block (input position, output position) of the matrix is the transposed kernel tap
    that connects them, or zeros where the window misses the input position
    (:func:`_tap_table`). Built by indexing the weight, so it is exact for any kernel,
    stride and padding, and differentiable: its backward sums the matrix gradient's
    blocks per tap (building it as the convolution of the one-hot basis maps cost a
    convolution and its backward per training step).
    """
    out_channels, channels, kernel, _ = weight.shape
    taps = weight.to(dtype).permute(2, 3, 1, 0).reshape(kernel * kernel, channels, out_channels)
    taps = torch.cat([taps, taps.new_zeros(1, channels, out_channels)])  # last: no tap
    table = _tap_table(hb, wb, kernel, stride, weight.device)  # (P_in, P_out)
    blocks = taps[table]  # (P_in, P_out, C_in, C_out)
    matrix = blocks.permute(0, 2, 1, 3).reshape(hb * wb * channels, -1)
    return matrix, bias.to(dtype).repeat(table.shape[1])


def _tap_table(hb: int, wb: int, kernel: int, stride: int, device: torch.device) -> Tensor:
    """(hb·wb, hb'·wb') index of the kernel tap (ky·k + kx) through which each input
    position reaches each output position of a (kernel, stride, padding kernel // 2) conv;
    k² where it does not."""
    padding = kernel // 2

    def offsets(size: int) -> Tensor:  # (size, outputs): tap index along one dim, or -1
        outputs = math.ceil(size / stride)
        offset = (torch.arange(size).view(-1, 1) - (torch.arange(outputs) * stride - padding))
        return torch.where((offset >= 0) & (offset < kernel), offset, -1)

    rows, columns = offsets(hb), offsets(wb)
    ty = rows.view(hb, 1, -1, 1)
    tx = columns.view(1, wb, 1, -1)
    table = torch.where((ty >= 0) & (tx >= 0), ty * kernel + tx, kernel * kernel)
    return table.reshape(hb * wb, -1).to(device)


class SupportMatrixCache:
    """The last :func:`support_matrix` built without autograd, reused until the weights,
    map size or dtype change (a module keeps one per conv; not a submodule, no state)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.entry: tuple[Tensor, Tensor] | None = None

    def get(self, weight: Tensor, bias: Tensor, hb: int, wb: int, stride: int,
            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # With autograd the matrix is part of this step's graph: built anew every call.
        # Under torch.compile too: the graph computes it from the weights (dynamo cannot
        # compare the key's data pointers).
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
            return support_matrix(weight, bias, hb, wb, stride, dtype)
        key = (hb, wb, stride, dtype, tensors_key((weight, bias)))
        if self.entry is not None and self.key == key:
            return self.entry
        self.key, self.entry = key, support_matrix(weight, bias, hb, wb, stride, dtype)
        return self.entry


def _pivot_maps(x: Tensor, stride: int) -> Tensor:
    """The query branch's input: the (Ha, Wa) maps at the support positions the support
    branch keeps (0, s, 2s, ...; with padding k//2 there are exactly ceil(Hb/s)), gathered
    by one copy into a channels-last batch (N·Hb'·Wb', C, Ha, Wa)."""
    pivots = x[..., ::stride, ::stride] if stride > 1 else x
    n, channels, ha, wa, hb_out, wb_out = pivots.shape
    maps = pivots.permute(0, 4, 5, 2, 3, 1).contiguous()
    return maps.view(n * hb_out * wb_out, ha, wa, channels).permute(0, 3, 1, 2)


def _query_branch(x: Tensor, maps: Tensor, weight: Tensor, bias: Tensor, stride: int
                  ) -> Tensor:
    """The query slice over (Ha, Wa) on ``x``'s :func:`_pivot_maps`, channels-last;
    returned as (N, C_out, Ha, Wa, Hb', Wb') stored (N, Hb', Wb', Ha, Wa, C_out)."""
    n, _, ha, wa, hb, wb = x.shape
    hb_out, wb_out = math.ceil(hb / stride), math.ceil(wb / stride)
    out = _conv2d(maps, weight.contiguous(memory_format=torch.channels_last), bias, 1,
                  weight.shape[-1] // 2)
    out = out.permute(0, 2, 3, 1).reshape(n, hb_out, wb_out, ha, wa, -1)
    return out.permute(0, 5, 3, 4, 1, 2)


# ------------------------------------------------------------------------- GroupNorm
def group_norm_6d(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                  eps: float = 1e-5, *, inplace: bool = False, impl: str | None = None
                  ) -> Tensor:
    """``F.group_norm`` of x (N, C, Ha, Wa, Hb, Wb) that keeps a channels-last 6D layout.

    ``fast``: a channels-last 6D input is normalised without a layout copy (PyTorch's own
    channels-last GroupNorm kernel was measured 7e-4 off fp64 on these sizes, so the
    statistics are computed here), in cache-sized chunks; without autograd ``inplace``
    writes the result over the input (R50 5-shot 400², the first squeeze layer's norm +
    ReLU: 35 -> 19 ms); with autograd the backward is hand-written (:class:`_GroupNormRows`).
    Other layouts go to ``F.group_norm``.
    ``reference``: ``F.group_norm``.
    """
    if choose_impl(impl, IMPLS) == REFERENCE or not is_channels_last_6d(x):
        return group_norm_6d_reference(x, num_groups, weight, bias, eps)
    return _group_norm_channels_last(x, num_groups, weight, bias, eps, inplace)


def _group_norm_channels_last(x: Tensor, groups: int, weight: Tensor | None,
                              bias: Tensor | None, eps: float, inplace: bool) -> Tensor:
    """:func:`group_norm_6d`'s fast path on a channels-last 6D ``x``."""
    n, channels = x.shape[:2]
    flat = x.permute(0, 2, 3, 4, 5, 1).reshape(n, -1, channels)  # a view
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (flat, weight, bias)):
        out = _GroupNormRows.apply(flat, weight, bias, groups, eps)
    else:
        out = flat if inplace else torch.empty_like(flat)
        _group_norm_rows(flat, groups, weight, bias, eps, out)
    return out.view(n, *x.shape[2:], channels).permute(0, 5, 1, 2, 3, 4)


def _group_norm_rows(flat: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                     eps: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """GroupNorm of (N, P, C) rows written into ``out`` (``flat`` itself for in place);
    returns the per-group (mean, rstd)."""
    mean, rstd = _group_statistics(flat, groups, eps)
    scale, shift = _affine(mean, rstd, weight, bias, flat.shape[2])
    # Per-sample 2D addcmul: the 3D broadcast form was several times slower on CPU.
    for i in range(flat.shape[0]):
        torch.addcmul(shift[i], flat[i], scale[i], out=out[i])
    return mean, rstd


def _channel_sums(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample and channel, the sums of ``a`` and of ``a * b`` over the positions of
    (N, P, C) rows, in chunks that stay in cache (no full-size temporary)."""
    sums = a.new_zeros(a.shape[0], a.shape[2])
    products = a.new_zeros(a.shape[0], a.shape[2])
    for chunk_a, chunk_b in zip(a.split(_STATISTICS_CHUNK, dim=1),
                                b.split(_STATISTICS_CHUNK, dim=1), strict=True):
        sums += chunk_a.sum(dim=1)
        products += (chunk_a * chunk_b).sum(dim=1)
    return sums, products


def _group_statistics(flat: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and 1 / sqrt(var + eps) per sample and group, (N, G), of (N, P, C) rows.

    Per-channel sums over all positions (fast column reductions), then per group.
    E[x²] - E[x]² in fp32 is within ~1e-6 relative of fp64 here (activations whose mean is
    not orders of magnitude above their spread); torch.var_mean over these strided dims
    was 4-60x slower.
    """
    n, positions, channels = flat.shape
    count = positions * (channels // groups)
    sums, square_sums = _channel_sums(flat, flat)
    mean = sums.view(n, groups, -1).sum(dim=2) / count
    mean_square = square_sums.view(n, groups, -1).sum(dim=2) / count
    var = (mean_square - mean * mean).clamp(min=0)
    return mean, (var + eps).rsqrt()


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """(N, G) -> (N, C), each group's value repeated over its channels."""
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1)


def _affine(mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
            channels: int) -> tuple[Tensor, Tensor]:
    """Per sample and channel, (scale, shift) with norm(x) = x * scale + shift."""
    scale = _per_channel(rstd, channels)
    shift = -_per_channel(mean, channels) * scale
    if weight is not None:
        shift = shift * weight + bias
        scale = scale * weight
    return scale, shift


class _GroupNormRows(torch.autograd.Function):
    """GroupNorm of (N, P, C) rows (the channels-last 6D tensor's storage) with a
    hand-written backward.

    Autograd through the forward's pieces (sums, per-sample ``addcmul``, ``stack``)
    made about ten passes over the activation in the backward. The gradient here needs
    two chunked reductions (sums of g and g * x per channel) and one pass writing
    dx = alpha * g + beta * x + gamma with per-sample, per-channel coefficients:
    with xhat = (x - mean) * rstd and M the elements of a group,
    dx = rstd * (w g - mean_M(w g) - xhat * mean_M(w g xhat)).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor | None, bias: Tensor | None,
                groups: int, eps: float) -> Tensor:
        out = torch.empty_like(flat)
        mean, rstd = _group_norm_rows(flat, groups, weight, bias, eps, out)
        ctx.groups = groups
        ctx.affine = weight is not None
        ctx.save_for_backward(flat, weight, mean, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        flat, weight, mean, rstd = ctx.saved_tensors
        n, positions, channels = flat.shape
        groups = ctx.groups
        count = positions * (channels // groups)
        grad = grad.contiguous()
        grad_sums, grad_x_sums = _channel_sums(grad, flat)
        mean_c, rstd_c = _per_channel(mean, channels), _per_channel(rstd, channels)
        # Per channel: sum of g * xhat.
        grad_xhat_sums = (grad_x_sums - mean_c * grad_sums) * rstd_c
        w = weight if ctx.affine else torch.ones_like(grad_sums[0])
        a = (w * grad_sums).view(n, groups, -1).sum(dim=2) / count  # mean_M(w g)
        b = (w * grad_xhat_sums).view(n, groups, -1).sum(dim=2) / count  # mean_M(w g xhat)
        alpha = rstd_c * w
        beta = _per_channel(-rstd * rstd * b, channels)
        gamma = _per_channel(rstd * (rstd * b * mean - a), channels)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.empty_like(flat)
            for i in range(n):
                torch.addcmul(gamma[i], flat[i], beta[i], out=grad_input[i])
                grad_input[i].addcmul_(grad[i], alpha[i])
        grad_weight = grad_xhat_sums.sum(dim=0) if ctx.affine else None
        grad_bias = grad_sums.sum(dim=0) if ctx.affine else None
        return grad_input, grad_weight, grad_bias, None, None


def group_norm_6d_reference(x: Tensor, num_groups: int, weight: Tensor | None,
                            bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` over channel groups and all trailing dims."""
    return F.group_norm(x, num_groups, weight, bias, eps)


# -------------------------------------------------------------------------- resizing
def resize_query_dims(x: Tensor, size: tuple[int, int], *, impl: str | None = None) -> Tensor:
    """Bilinear (align_corners=True) resize of the query dims: (N, C, ha, wa, hb, wb) ->
    (N, C, *size, hb, wb).

    ``fast``: a channels-last 6D input is resized as a channels-last image of hb·wb·C
    channels, in and out without a copy, and stays channels-last 6D (the layout the next
    4D conv reads). ``reference`` (and other layouts): one image per support position.
    """
    n, channels, ha, wa, hb, wb = x.shape
    if (ha, wa) == tuple(size):
        return x
    if choose_impl(impl, IMPLS) == FAST and is_channels_last_6d(x):
        return _resize_query_dims_channels_last(x, size)
    x = x.permute(0, 4, 5, 1, 2, 3).reshape(n * hb * wb, channels, ha, wa)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, hb, wb, channels, *size).permute(0, 3, 4, 5, 1, 2)


def _resize_query_dims_channels_last(x: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`resize_query_dims`'s fast path on a channels-last 6D ``x``."""
    n, channels, ha, wa, hb, wb = x.shape
    maps = x.permute(0, 2, 3, 4, 5, 1).reshape(n, ha, wa, -1).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
    maps = maps.permute(0, 2, 3, 1).reshape(n, *size, hb, wb, channels)
    return maps.permute(0, 5, 1, 2, 3, 4)


def resize_support_dims(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of the support dims: (N, C, ha, wa, hb, wb) ->
    (N, C, ha, wa, *size) (one implementation)."""
    n, channels, ha, wa, hb, wb = x.shape
    if (hb, wb) == tuple(size):
        return x
    x = x.reshape(n, channels * ha * wa, hb, wb)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, channels, ha, wa, *size)
