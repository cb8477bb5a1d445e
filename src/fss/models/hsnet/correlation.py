"""Support masking and the hypercorrelation pyramid (HSNet, Sec. 3.1-3.2).

The pyramid itself is an op (:func:`fss.ops.correlation.hypercorrelation_pyramid`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fss.ops.correlation import NORM_EPS, BoxedCorrelation, hypercorrelation_pyramid

__all__ = ["NORM_EPS", "BoxedCorrelation", "hypercorrelation_pyramid", "mask_features"]


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
