"""The training-free max-cosine prior (PFENet-style, as HDMNet uses it).

Implementations of :func:`max_cosine_prior` (``impl``, default after
:func:`fss.ops.use_fast_paths`):

- ``reference`` (:func:`max_cosine_prior_reference`): one dense product per shot.
- ``fast_accelerator``: the K shots share one dense (B, K·Ls, C) @ (B, C, Lq) product (no
  host synchronisation).
- ``fast_cpu``: the same product over the support positions whose masked feature vector is
  non-zero only (the others have a cosine of exactly 0, entering the max as one 0), as a
  oneDNN 1x1 convolution: (1 - foreground fraction) fewer FLOPs in the largest matmul of
  the pass, at the price of one host read per sample.
- ``fast``: ``fast_cpu`` on a CPU, else ``fast_accelerator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fss.ops.config import DEVICE_IMPLS, FAST_CPU, REFERENCE, choose_impl, device_impl
from fss.ops.matmul import matmul_as_conv

COSINE_EPS = 1e-7
IMPLS = DEVICE_IMPLS


def max_cosine_prior(
    query_features: torch.Tensor, support_features: torch.Tensor, support_masks: torch.Tensor,
    *, impl: str | None = None,
) -> torch.Tensor:
    """Prior of each query position: max cosine similarity to the support foreground.

    query_features (B, C, h, w); support_features (B, K, C, hs, ws); support_masks
    (B, K, 1, H, W) binary → (B, 1, h, w), the mean over the K shots.

    As in the official code the support features are multiplied by the (nearest-resized)
    mask, so background positions enter the max with a cosine of 0, and there is NO
    min-max normalisation (unlike PFENet / BAM).
    """
    impl = choose_impl(impl, IMPLS)
    if impl == REFERENCE:
        return max_cosine_prior_reference(query_features, support_features, support_masks)
    impl = device_impl(impl, query_features.device.type == "cpu")
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
    if impl == FAST_CPU:
        prior = _pruned_prior(query, query_norm, masked, norms, shots)
    else:
        prior = _dense_prior(query, query_norm, masked, norms, shots)
    return prior.reshape(batch, 1, *query_features.shape[-2:])


def _dense_prior(
    query: torch.Tensor,
    query_norm: torch.Tensor,
    masked: torch.Tensor,
    norms: torch.Tensor,
    shots: int,
) -> torch.Tensor:
    """Mean over shots of the max cosine, the K shots in one dense product:
    (B, C, Lq), (B, 1, Lq), (B, K·Ls, C), (B, K·Ls, 1) → (B, Lq)."""
    cosine = (masked @ query) / (norms @ query_norm + COSINE_EPS)  # (B, K·Ls, Lq)
    return cosine.unflatten(1, (shots, -1)).max(dim=2).values.mean(dim=1)


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
        # (Lq, kept), the product as a oneDNN 1x1 convolution (fss.ops.matmul: about
        # twice torch.mm's rate on the CPU measured).
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


def max_cosine_prior_reference(query_features: torch.Tensor, support_features: torch.Tensor,
                               support_masks: torch.Tensor) -> torch.Tensor:
    """:func:`max_cosine_prior` as stated: per shot, the dense cosine of every masked
    support position with every query position, max over the support, mean over shots."""
    query = query_features.flatten(2)
    query_norm = query.norm(dim=1, keepdim=True)
    priors = []
    for shot in range(support_features.shape[1]):
        support = support_features[:, shot]
        mask = F.interpolate(support_masks[:, shot], size=support.shape[-2:], mode="nearest")
        support = (support * mask).flatten(2).transpose(1, 2)
        support_norm = support.norm(dim=2, keepdim=True)
        cosine = (support @ query) / (support_norm @ query_norm + COSINE_EPS)
        priors.append(cosine.max(dim=1).values)
    prior = torch.stack(priors, dim=1).mean(dim=1)
    return prior.reshape(query_features.shape[0], 1, *query_features.shape[-2:])
