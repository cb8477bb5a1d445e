"""Support prototypes and training-free prior maps (PFENet-style, as HDMNet uses them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fss.models.matmul import matmul_as_conv

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
    min-max normalisation (unlike PFENet / BAM).

    The K shots share one (B, K·Ls, C) @ (B, C, Lq) product. On a CPU, only the support
    positions whose masked feature vector is non-zero are multiplied: the others have a
    cosine of exactly 0 (0 / (0 + eps)), so they enter as one 0 in the max. Same result,
    (1 - foreground fraction) fewer FLOPs in the largest matmul of the pass.
    """
    batch, shots = support_features.shape[:2]
    query = query_features.flatten(2)  # (B, C, Lq)
    query_norm = query.norm(dim=1, keepdim=True)  # (B, 1, Lq)
    flat_supports = support_features.flatten(0, 1)  # (B·K, C, hs, ws)
    masks = F.interpolate(
        support_masks.flatten(0, 1), size=flat_supports.shape[-2:], mode="nearest"
    )
    masked = (flat_supports * masks).flatten(2).transpose(1, 2)  # (B·K, Ls, C)
    masked = masked.reshape(batch, -1, masked.shape[-1])  # (B, K·Ls, C)
    norms = masked.norm(dim=2, keepdim=True)  # (B, K·Ls, 1)
    if query.device.type == "cpu":
        prior = _pruned_prior(query, query_norm, masked, norms, shots)
    else:  # no host sync on an accelerator: one dense product
        cosine = (masked @ query) / (norms @ query_norm + COSINE_EPS)  # (B, K·Ls, Lq)
        prior = cosine.unflatten(1, (shots, -1)).max(dim=2).values.mean(dim=1)
    return prior.reshape(batch, 1, *query_features.shape[-2:])


def _pruned_prior(
    query: torch.Tensor,
    query_norm: torch.Tensor,
    masked: torch.Tensor,
    norms: torch.Tensor,
    shots: int,
) -> torch.Tensor:
    """Mean over shots of the max cosine, multiplying the non-zero support rows only:
    (B, C, Lq), (B, 1, Lq), (B, K·Ls, C), (B, K·Ls, 1) → (B, Lq)."""
    batch, length = masked.shape[0], masked.shape[1] // shots
    priors = []
    for sample in range(batch):
        kept_rows = (norms[sample, :, 0] > 0).nonzero().squeeze(1)  # sorted, over K·Ls
        rows = masked[sample, kept_rows]  # (kept, C)
        # (Lq, kept), the product as a oneDNN 1x1 convolution (fss.models.matmul: about
        # twice torch.mm's rate on the CPU measured here).
        products = matmul_as_conv(query[sample].t(), rows.t())
        cosine = products / (query_norm[sample].t() @ norms[sample, kept_rows].t()
                             + COSINE_EPS)
        # kept_rows is sorted, so each shot's rows are one run of columns.
        counts = torch.bincount(kept_rows // length, minlength=shots).tolist()
        per_shot = []
        start = 0
        for count in counts:
            if count < length:  # some rows are zero vectors: a cosine of 0
                best = query.new_zeros(query.shape[-1])
                if count:
                    best = torch.maximum(best, cosine[:, start : start + count].amax(dim=1))
            else:
                best = cosine[:, start : start + count].amax(dim=1)
            per_shot.append(best)
            start += count
        priors.append(torch.stack(per_shot).mean(dim=0))
    return torch.stack(priors)
