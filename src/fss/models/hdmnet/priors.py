"""Support prototypes and training-free prior maps (PFENet-style, as HDMNet uses them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AREA_EPS = 5e-4
COSINE_EPS = 1e-7


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features (N, C, h, w), mask (N, 1, h, w) in [0, 1] → prototype (N, C, 1, 1):
    Σ mask·feature / (Σ mask + 5e-4)."""
    area = mask.sum(dim=(2, 3), keepdim=True) + AREA_EPS
    return (features * mask).sum(dim=(2, 3), keepdim=True) / area


def max_cosine_prior(
    query_features: torch.Tensor, support_features: torch.Tensor, support_masks: torch.Tensor
) -> torch.Tensor:
    """Prior of each query position: max cosine similarity to the support foreground.

    query_features (B, C, h, w); support_features (B, K, C, hs, ws); support_masks
    (B, K, 1, H, W) binary → (B, 1, h, w), the mean over the K shots.

    As in the official code the support features are multiplied by the (nearest-resized)
    mask, so background positions enter the max with a cosine of 0, and there is NO
    min-max normalisation (unlike PFENet / BAM)."""
    query = query_features.flatten(2)  # (B, C, Lq)
    query_norm = query.norm(dim=1, keepdim=True)  # (B, 1, Lq)
    priors = []
    for shot in range(support_features.shape[1]):
        support = support_features[:, shot]
        mask = F.interpolate(support_masks[:, shot], size=support.shape[-2:], mode="nearest")
        support = (support * mask).flatten(2).transpose(1, 2)  # (B, Ls, C)
        support_norm = support.norm(dim=2, keepdim=True)  # (B, Ls, 1)
        cosine = (support @ query) / (support_norm @ query_norm + COSINE_EPS)  # (B, Ls, Lq)
        priors.append(cosine.max(dim=1).values)
    prior = torch.stack(priors, dim=1).mean(dim=1)
    return prior.reshape(query_features.shape[0], 1, *query_features.shape[-2:])
