"""Support masking and multi-layer 4D correlation (the hypercorrelation pyramid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Added to the L2 norm before dividing, as the official code, so all-zero (masked-out)
# support vectors give a zero correlation instead of NaN.
NORM_EPS = 1e-5


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
        masked.append(feature * resized)
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
        depth order within the level.
    """
    if not (len(query_features) == len(support_features) == len(tap_groups)):
        raise ValueError("query taps, support taps and tap_groups must have the same length")
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
        # (B, 1, ha*wa, C) @ (B, K, C, hb*wb) -> (B, K, ha*wa, hb*wb)
        corr = torch.matmul(
            query.transpose(1, 2).unsqueeze(1), support.view(batch, shots, channels, -1)
        )
        corr = corr.clamp(min=0).view(batch * shots, ha, wa, hb, wb)
        per_level.setdefault(level, []).append(corr)
    return [torch.stack(per_level[level], dim=1) for level in sorted(per_level, reverse=True)]
