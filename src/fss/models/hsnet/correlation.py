"""Support masking and multi-layer 4D correlation (the hypercorrelation pyramid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Added to the L2 norm before dividing, as the official code, so all-zero (masked-out)
# support vectors give a zero correlation instead of NaN.
NORM_EPS = 1e-5
# Below this fraction of the support positions, only the box holding the non-zero ones is
# multiplied.
_PRUNE_BELOW = 0.9


def mask_features(features: list[Tensor], masks: Tensor) -> list[Tensor]:
    """Multiply every feature map by its bilinearly resized (soft) mask.

    Args:
        features: maps (N, C_i, h_i, w_i).
        masks: (N, H, W) float in [0, 1].
    Returns:
        masked maps, same shapes.
    """
    masks = masks.unsqueeze(1)
    masked = []
    for feature in features:
        resized = F.interpolate(masks, size=feature.shape[-2:], mode="bilinear", align_corners=True)
        masked.append(feature * resized.to(feature.dtype))  # bf16 maps stay bf16 under autocast
    return masked


def hypercorrelation_pyramid(
    query_features: list[Tensor], support_features: list[Tensor], tap_groups: list[int]
) -> list[Tensor]:
    """Per-layer cosine correlations, clamped at 0 and stacked per pyramid level.

    Each query is correlated with its K supports without copying the query features K times
    (the query was encoded once).

    Args:
        query_features: taps (B, C_i, ha_i, wa_i), shallow -> deep.
        support_features: taps (B*K, C_i, hb_i, wb_i), support index ``b*K + k``.
        tap_groups: pyramid level of each tap.
    Returns:
        one tensor per level, DEEPEST first: (B*K, n_level, ha, wa, hb, wb), channels in
        depth order within the level. On a CPU without autograd the tensors are stored
        support-last (memory order B*K, ha, wa, n_level, hb, wb), the layout the learner's
        first 4D conv reads without a copy; otherwise they are contiguous.
    """
    if not (len(query_features) == len(support_features) == len(tap_groups)):
        raise ValueError("query taps, support taps and tap_groups must have the same length")
    batch = query_features[0].shape[0]
    shots = support_features[0].shape[0] // batch
    levels: dict[int, list[int]] = {}
    for index, level in enumerate(tap_groups):
        levels.setdefault(level, []).append(index)
    needs_grad = torch.is_grad_enabled() and any(
        f.requires_grad for f in (*query_features, *support_features)
    )
    # The in-place path issues one small GEMM per (layer, shot) and reads the pruned column
    # count on the host: right for a CPU, not for an accelerator (one launch and one sync
    # each), where the plain batched ops are used.
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
    on_cpu = device_type == "cpu"
    build = _level_in_place if on_cpu and not needs_grad else _level_plain
    return [
        build([query_features[i] for i in levels[level]],
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
    query_taps: list[Tensor], support_taps: list[Tensor], batch: int, shots: int
) -> Tensor:
    """One level without autograd: every (layer, shot) product is one GEMM written into
    its slot of the support-last output and clamped there.

    Support positions whose feature vector is exactly zero (masked out: the mask is 0
    there) have a correlation of exactly 0. When they are many, only the bounding box of
    the non-zero positions is multiplied and the rest of the output stays 0: for an object
    covering a quarter of the support image, a quarter of the FLOPs.
    """
    ha, wa = query_taps[0].shape[-2:]
    hb, wb = support_taps[0].shape[-2:]
    layers = len(query_taps)
    pairs = batch * shots
    normalised = [(_normalised(q)[0].transpose(1, 2), *_normalised(s))
                  for q, s in zip(query_taps, support_taps, strict=True)]
    boxes = [[_nonzero_box(norms[pair, 0].view(hb, wb)) for pair in range(pairs)]
             for _, _, norms in normalised]
    full = (0, hb, 0, wb)
    boxes = [[box if _area(box) < _PRUNE_BELOW * hb * wb else full for box in layer_boxes]
             for layer_boxes in boxes]
    pruned = any(box != full for layer_boxes in boxes for box in layer_boxes)
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
                torch.mm(query[pair // shots], support[pair][:, top * wb : bottom * wb],
                         out=span)
                span.clamp_(min=0)  # only what was written: the zeros are already >= 0
                continue
            box = support[pair].view(-1, hb, wb)[:, top:bottom, left:right].flatten(1)
            product = (query[pair // shots] @ box).clamp_(min=0)
            target.view(-1, hb, wb)[:, top:bottom, left:right] = product.view(
                -1, bottom - top, right - left)
    return out.view(pairs, ha, wa, layers, hb, wb).permute(0, 3, 1, 2, 4, 5)


def _nonzero_box(norms: Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounding the non-zero entries of a 2D map, ends
    exclusive; (0, 0, 0, 0) if there are none."""
    rows = norms.amax(dim=1).nonzero()
    if rows.numel() == 0:
        return 0, 0, 0, 0
    columns = norms.amax(dim=0).nonzero()
    return int(rows[0, 0]), int(rows[-1, 0]) + 1, int(columns[0, 0]), int(columns[-1, 0]) + 1


def _area(box: tuple[int, int, int, int]) -> int:
    top, bottom, left, right = box
    return (bottom - top) * (right - left)


def _level_plain(
    query_taps: list[Tensor], support_taps: list[Tensor], batch: int, shots: int
) -> Tensor:
    """One level with plain batched ops (autograd, e.g. a fine-tuned backbone, or an
    accelerator): one matmul per layer, contiguous output."""
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
