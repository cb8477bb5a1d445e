"""Multi-layer 4D correlation: HSNet's hypercorrelation pyramid.

Each tapped layer's query and support features are L2-normalised along channels, every
(query position, support position) pair gets their cosine, clamped at 0, and the layers of
one backbone level are stacked as the channels of a (N, layers, ha, wa, hb, wb) tensor.

Implementations (:func:`hypercorrelation_pyramid`'s ``impl``):

- ``reference`` (:func:`hypercorrelation_pyramid_reference`): one matmul per layer, clamp,
  stack; contiguous levels.
- ``fast_cpu``: without autograd, every (layer, shot) product is one GEMM (a oneDNN 1x1
  convolution or ``torch.mm``, as measured per machine: :mod:`fss.ops.calibration`) clamped into its slot of a support-last level;
  only the bounding box of a support's non-zero (unmasked) positions is multiplied, and
  with ``boxed=True`` a partly masked level of ``BOXED_MIN_POSITIONS`` or more positions
  is returned as a :class:`BoxedCorrelation`.
- ``fast_accelerator``: one batched matmul per layer, each query against its K supports
  without copying the query; no host synchronisation.
- ``fast`` (the switch's default): ``fast_cpu`` on a CPU without autograd, else
  ``fast_accelerator`` (the in-place GEMMs issue one launch and read the pruned column
  count on the host each, right for a CPU, not for an accelerator; and they cannot be
  differentiated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fss.ops.boxes import box_area, nonzero_box, union_box, worth_pruning
from fss.ops.calibration import COARSE_BELOW, CORRELATION_COARSE, CORRELATION_FINE, use_conv
from fss.ops.config import DEVICE_IMPLS, FAST_CPU, REFERENCE, choose_impl, device_impl
from fss.ops.matmul import matmul_as_conv

# Added to the L2 norm before dividing, as the official code, so all-zero (masked-out)
# support vectors give a zero correlation instead of NaN.
NORM_EPS = 1e-5
IMPLS = DEVICE_IMPLS
# Smallest level (query positions x support positions, ha·wa·hb·wb) kept as support boxes
# with ``boxed=True``. Below it the per-pair convolutions of the boxed first 4D conv cost
# more than the dense level they save. Measured on the AVX2 machine, alternated in one
# process: HSNet R50 400², boxes at level 2 (50⁴ = 6.25M): 1-shot inference 0.93, training
# step 0.90 of the dense time; level 3 (25⁴ = 390k): 1.01 inference, 1.00 training,
# 1.00 5-shot; resnet18 112² (level 2: 14⁴ = 38k): inference (batch 16) 1.02, training
# (batch 8) 1.04, i.e. slower.
BOXED_MIN_POSITIONS = 1 << 20


@dataclass(frozen=True)
class BoxedCorrelation:
    """One pyramid level's correlation stored only inside each pair's support box.

    Masked-out support positions (feature vector exactly 0) correlate to exactly 0, so a
    pair's correlation is 0 outside the bounding box of its non-zero support positions and
    keeping the box loses nothing. The learner's first center-pivot 4D conv reads this form
    directly (``CenterPivotConv4d``): it convolves only where the box reaches and writes
    the bias elsewhere, and the level's dense tensor is never built.

    Attributes:
        shape: the dense tensor's shape (N, layers, ha, wa, hb, wb).
        boxes: per pair, (top, bottom, left, right) in support positions, ends exclusive;
            the union over the level's layers.
        values: per pair, the correlation inside its box, (ha, wa, layers, bottom - top,
            right - left) (a view, its last two dims contiguous); ``None`` for a support
            with no non-zero position.
        dtype, device: of the dense tensor.
    """

    shape: tuple[int, int, int, int, int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    values: tuple[Tensor | None, ...]
    dtype: torch.dtype
    device: torch.device

    def to_dense(self) -> Tensor:
        """The dense (N, layers, ha, wa, hb, wb) tensor, stored support-last."""
        n, layers, ha, wa, hb, wb = self.shape
        out = torch.zeros(n, ha, wa, layers, hb, wb, dtype=self.dtype, device=self.device)
        for pair, ((top, bottom, left, right), values) in enumerate(
                zip(self.boxes, self.values, strict=True)):
            if values is not None:
                out[pair, :, :, :, top:bottom, left:right] = values
        return out.permute(0, 3, 1, 2, 4, 5)


def hypercorrelation_pyramid(
    query_features: list[Tensor],
    support_features: list[Tensor],
    tap_groups: list[int],
    boxed: bool = False,
    *,
    impl: str | None = None,
) -> list[Tensor | BoxedCorrelation]:
    """Per-layer cosine correlations, clamped at 0 and stacked per pyramid level.

    Each query is correlated with its K supports without copying the query features K times
    (the query was encoded once).

    Args:
        query_features: taps (B, C_i, ha_i, wa_i), shallow -> deep.
        support_features: taps (B*K, C_i, hb_i, wb_i), support index ``b*K + k``.
        tap_groups: pyramid level of each tap.
        boxed: on the in-place CPU path, return a level whose supports are partly masked
            out as a :class:`BoxedCorrelation` (for the learner's center-pivot conv, which
            reads it directly) instead of a dense tensor that is mostly zeros, when the
            level has at least ``BOXED_MIN_POSITIONS`` positions per layer.
        impl: ``fast``, ``fast_cpu``, ``fast_accelerator`` or ``reference`` (see the
            module docstring); default after :func:`fss.ops.use_fast_paths`.
    Returns:
        one tensor per level, DEEPEST first: (B*K, n_level, ha, wa, hb, wb), channels in
        depth order within the level. On the ``fast_cpu`` path the tensors are stored
        support-last (memory order B*K, ha, wa, n_level, hb, wb), the layout the learner's
        first 4D conv reads without a copy; otherwise they are contiguous. With ``boxed``,
        pruned levels of that path are :class:`BoxedCorrelation` instead.
    """
    if not (len(query_features) == len(support_features) == len(tap_groups)):
        raise ValueError("query taps, support taps and tap_groups must have the same length")
    impl = choose_impl(impl, IMPLS)
    if impl == REFERENCE:
        return hypercorrelation_pyramid_reference(query_features, support_features, tap_groups)
    batch = query_features[0].shape[0]
    shots = support_features[0].shape[0] // batch
    levels: dict[int, list[int]] = {}
    for index, level in enumerate(tap_groups):
        levels.setdefault(level, []).append(index)
    needs_grad = torch.is_grad_enabled() and any(
        f.requires_grad for f in (*query_features, *support_features)
    )
    device_type = query_features[0].device.type
    # One dtype for every product (the in-place GEMMs write into one output and autocast
    # does not cover `out=`): autocast's when it is on (bf16-mixed training or inference),
    # else the common type of the taps.
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = query_features[0].dtype
        for feature in (*query_features, *support_features):
            dtype = torch.promote_types(dtype, feature.dtype)
    query_features = [f.to(dtype) for f in query_features]
    support_features = [f.to(dtype) for f in support_features]
    impl = device_impl(impl, device_type == "cpu" and not needs_grad)
    if impl == FAST_CPU and needs_grad:
        raise ValueError("impl='fast_cpu' writes the correlations in place and cannot be "
                         "differentiated: use 'fast_accelerator' or 'reference' with autograd")
    in_place = impl == FAST_CPU
    return [
        _level_in_place([query_features[i] for i in levels[level]],
                        [support_features[i] for i in levels[level]], batch, shots, boxed)
        if in_place else
        _level_plain([query_features[i] for i in levels[level]],
                     [support_features[i] for i in levels[level]], batch, shots)
        for level in sorted(levels, reverse=True)
    ]


def _normalised(features: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, h, w) -> unit vectors along C (N, C, h·w) and the norms (N, 1, h·w).

    Channels-last maps stay channels-last (a view, no copy): the GEMMs take either layout.
    """
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        n, channels = features.shape[:2]
        flat = features.permute(0, 2, 3, 1).reshape(n, -1, channels).transpose(1, 2)
    else:
        flat = features.flatten(2)
    norms = flat.norm(dim=1, keepdim=True)
    return flat / (norms + NORM_EPS), norms


def _level_in_place(
    query_taps: list[Tensor], support_taps: list[Tensor], batch: int, shots: int,
    boxed: bool = False,
) -> Tensor | BoxedCorrelation:
    """One level without autograd: every (layer, shot) product is one GEMM (see
    :func:`correlation_product`) clamped into its slot of the support-last output.

    Support positions whose feature vector is exactly zero (masked out: the mask is 0
    there) have a correlation of exactly 0. When they are many, only the bounding box of
    the non-zero positions is multiplied and the rest of the output stays 0: for an object
    covering a quarter of the support image, a quarter of the FLOPs. With ``boxed`` the
    level is then returned as a :class:`BoxedCorrelation` and the zeros are never written.
    """
    ha, wa = query_taps[0].shape[-2:]
    hb, wb = support_taps[0].shape[-2:]
    layers = len(query_taps)
    pairs = batch * shots
    normalised = [(_normalised(q)[0].transpose(1, 2), *_normalised(s))
                  for q, s in zip(query_taps, support_taps, strict=True)]
    boxes = [[nonzero_box(norms[pair, 0].view(hb, wb)) for pair in range(pairs)]
             for _, _, norms in normalised]
    full = (0, hb, 0, wb)
    boxes = [[box if worth_pruning(box, hb, wb) else full for box in layer_boxes]
             for layer_boxes in boxes]
    pruned = any(box != full for layer_boxes in boxes for box in layer_boxes)
    if boxed and pruned and ha * wa * hb * wb >= BOXED_MIN_POSITIONS:
        pair_boxes = [union_box(of_pair) for of_pair in zip(*boxes, strict=True)]
        return _boxed_level(normalised, pair_boxes, (pairs, layers, ha, wa, hb, wb), shots)
    out = (query_taps[0].new_zeros if pruned else query_taps[0].new_empty)(
        pairs, ha * wa, layers, hb * wb)
    for slot, (query, support, _) in enumerate(normalised):
        # query (B, ha·wa, C), support (B·K, C, hb·wb)
        for pair in range(pairs):
            top, bottom, left, right = boxes[slot][pair]
            if top == bottom:
                continue  # an all-zero support: all correlations 0
            target = out[pair, :, slot]  # (ha·wa, hb·wb), rows layers·hb·wb apart
            if (left, right) == (0, wb):  # whole rows: a contiguous span, GEMM in place
                span = target[:, top * wb : bottom * wb]
                rows = support[pair][:, top * wb : bottom * wb]
                product = correlation_product(query[pair // shots], rows)
                torch.clamp(product, min=0, out=span)
                continue
            box = support[pair].view(-1, hb, wb)[:, top:bottom, left:right].flatten(1)
            product = correlation_product(query[pair // shots], box).clamp_(min=0)
            target.view(-1, hb, wb)[:, top:bottom, left:right] = product.view(
                -1, bottom - top, right - left)
    return out.view(pairs, ha, wa, layers, hb, wb).permute(0, 3, 1, 2, 4, 5)


def _boxed_level(
    normalised: list[tuple[Tensor, Tensor, Tensor]],
    boxes: list[tuple[int, int, int, int]],
    shape: tuple[int, int, int, int, int, int],
    shots: int,
) -> BoxedCorrelation:
    """The level's correlation inside each pair's box.

    Per query and layer, ONE GEMM multiplies the query by its K supports' boxes side by
    side (a K times wider product runs closer to the machine's peak than K narrow ones),
    writing into the query's (ha·wa, layers, total box area) buffer; each pair's values
    are a view of its columns.
    """
    pairs, layers, ha, wa, hb, wb = shape
    values: list[Tensor | None] = [None] * pairs  # None: an all-zero support, all 0
    for first in range(0, pairs, shots):
        members = [pair for pair in range(first, first + shots) if boxes[pair][0] != boxes[pair][1]]
        if not members:
            continue
        areas = [box_area(boxes[pair]) for pair in members]
        buffer = normalised[0][0].new_empty(ha * wa, layers, sum(areas))
        for slot, (query, support, _) in enumerate(normalised):
            columns = torch.cat([
                support[pair].view(-1, hb, wb)[:, top:bottom, left:right].flatten(1)
                for pair, (top, bottom, left, right) in ((p, boxes[p]) for p in members)
            ], dim=1)
            product = correlation_product(query[first // shots], columns)
            torch.clamp(product, min=0, out=buffer[:, slot])
        offset = 0
        for pair, area in zip(members, areas, strict=True):
            top, bottom, left, right = boxes[pair]
            values[pair] = buffer[:, :, offset : offset + area].view(
                ha, wa, layers, bottom - top, right - left)
            offset += area
    reference = normalised[0][0]
    return BoxedCorrelation(shape, tuple(boxes), tuple(values), reference.dtype,
                            reference.device)


def correlation_product(query: Tensor, support: Tensor) -> Tensor:
    """query (P, C) @ support (C, S) -> (P, S) contiguous.

    As a oneDNN 1x1 convolution (:func:`fss.ops.matmul.matmul_as_conv`) or ``torch.mm``,
    whichever :mod:`fss.ops.calibration` measured faster on this machine for the shape
    class: from ``COARSE_BELOW`` query positions on ``correlation_fine`` (levels 2 and 3;
    on the AVX-512 CPU measured the convolution, level 2 of a ResNet-50 5-shot episode at
    400² 197 -> 106 ms), below ``correlation_coarse`` (the deepest level, 13 x 13 at 400²;
    ``torch.mm`` there). On the AVX2 CPU measured ``torch.mm`` won both.
    """
    shape_class = CORRELATION_FINE if query.shape[0] >= COARSE_BELOW else CORRELATION_COARSE
    if use_conv(shape_class, query, support):
        return matmul_as_conv(query, support)
    return query @ support


def _level_plain(
    query_taps: list[Tensor], support_taps: list[Tensor], batch: int, shots: int
) -> Tensor:
    """One level with plain batched ops (``fast_accelerator``; on a CPU with autograd, e.g.
    a fine-tuned backbone): one matmul per layer, contiguous output."""
    correlations = []
    for query, support in zip(query_taps, support_taps, strict=True):
        ha, wa = query.shape[-2:]
        hb, wb = support.shape[-2:]
        query, _ = _normalised(query)
        support, _ = _normalised(support)
        # (B, 1, ha*wa, C) @ (B, K, C, hb*wb) -> (B, K, ha*wa, hb*wb)
        corr = torch.matmul(
            query.transpose(1, 2).unsqueeze(1), support.view(batch, shots, *support.shape[1:])
        )
        correlations.append(corr.clamp(min=0).view(batch * shots, ha, wa, hb, wb))
    return torch.stack(correlations, dim=1)


def hypercorrelation_pyramid_reference(
    query_features: list[Tensor], support_features: list[Tensor], tap_groups: list[int]
) -> list[Tensor]:
    """The pyramid as the paper states it, one op at a time: normalise, one matmul per
    layer, clamp, stack per level; levels deepest first, contiguous. Same arguments as
    :func:`hypercorrelation_pyramid`."""
    batch = query_features[0].shape[0]
    shots = support_features[0].shape[0] // batch
    per_level: dict[int, list[Tensor]] = {}
    for query, support, level in zip(query_features, support_features, tap_groups, strict=True):
        _, channels, ha, wa = query.shape
        hb, wb = support.shape[-2:]
        query = query.flatten(2)
        query = query / (query.norm(dim=1, keepdim=True) + NORM_EPS)
        support = support.flatten(2)
        support = support / (support.norm(dim=1, keepdim=True) + NORM_EPS)
        corr = torch.matmul(
            query.transpose(1, 2).unsqueeze(1), support.view(batch, shots, channels, -1)
        )
        corr = corr.clamp(min=0).view(batch * shots, ha, wa, hb, wb)
        per_level.setdefault(level, []).append(corr)
    return [torch.stack(per_level[level], dim=1) for level in sorted(per_level, reverse=True)]
