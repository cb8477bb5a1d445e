"""Support prototypes and training-free prior maps (PFENet-style, as HDMNet uses them).

The max-cosine prior is an op (:func:`fss.ops.priors.max_cosine_prior`).
"""

from __future__ import annotations

import torch

from fss.ops.priors import max_cosine_prior

__all__ = ["AREA_EPS", "masked_average_pool", "max_cosine_prior"]

AREA_EPS = 5e-4


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features (N, C, h, w), mask (N, 1, h, w) in [0, 1] → prototype (N, C, 1, 1):
    Σ mask·feature / (Σ mask + 5e-4)."""
    area = mask.sum(dim=(2, 3), keepdim=True) + AREA_EPS
    return (features * mask).sum(dim=(2, 3), keepdim=True) / area
