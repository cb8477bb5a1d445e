"""BAM's base-learner ensemble, as used by HDMNet.

The meta learner (HDMNet's decoder) is corrected by the frozen base-class learner:

1. Scene difference ``est`` between query and support: ‖G_q − G_s‖_F / C, with G the
   channel-cosine Gram matrix (C × C) of the layer2 features (C = 512 for ResNet-50).
   For K shots, the per-shot values are weighted by ``softmax(kshot_rw(sorted values))``.
2. ``gram_merge`` (1×1 conv 2→1, no bias, initialised to [1, 0]) mixes each meta
   probability map with ``est``: bg' = gram_merge([p_bg, est]), fg' = gram_merge([p_fg, est]).
3. ``cls_merge`` (same shape and init) mixes bg' with ``base_map``, the base learner's
   probability of "any base class": final = [cls_merge([bg', base_map]), fg'].
   In training, BAM removes the episode's own class from ``base_map`` (it is a base class
   there, and the target must not be suppressed as "base"); at test every base class
   counts.

K-shot reweighting, done right: ``kshot_rw`` (conv K→2, ReLU, conv 2→K) maps the est
values sorted in increasing order to one weight per *rank*; the weights are then put
back in shot order with the inverse permutation before the softmax. Two quirks of the
official HDMNet code are NOT reproduced: (a) its un-permute gathers with
``idx1.gather(1, idx2)``, which is the identity permutation, so each weight stays attached
to its rank instead of its shot (BAM itself gathers with ``idx2``, correctly); (b)
``kshot_rw`` is missing from its optimizer, so it keeps its random init. Here the layer
is trainable and sits in the 10× learning-rate group with the other merge layers (as in
BAM's optimizer). This makes the 5-shot model 27 parameters larger than the 1-shot one.
"""

from __future__ import annotations

import torch
from torch import nn

GRAM_EPS = 1e-7


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """features (N, C, h, w) → channel-cosine Gram matrix (N, C, C)."""
    flat = features.flatten(2)
    norms = flat.norm(dim=2, keepdim=True)
    return (flat @ flat.transpose(1, 2)) / (norms @ norms.transpose(1, 2) + GRAM_EPS)


def gram_distance(query_features: torch.Tensor, support_features: torch.Tensor) -> torch.Tensor:
    """query (B, C, h, w), support (B, K, C, h, w) → est (B, K) = ‖G_q − G_s‖_F / C.

    (‖ones(C, C)‖_F = C, the official normaliser.)"""
    batch, shots = support_features.shape[:2]
    query_gram = gram_matrix(query_features)  # (B, C, C)
    support_gram = gram_matrix(support_features.flatten(0, 1)).unflatten(0, (batch, shots))
    channels = query_gram.shape[-1]
    return (query_gram.unsqueeze(1) - support_gram).flatten(2).norm(dim=2) / channels


def _merge_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).reshape_as(conv.weight))
    return conv


class BaseLearnerEnsemble(nn.Module):
    """``gram_merge``, ``cls_merge`` and (K > 1) ``kshot_rw``; see the module docstring."""

    def __init__(self, shot: int = 1, kshot_hidden: int = 2) -> None:
        super().__init__()
        self.shot = shot
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()
        self.kshot_rw: nn.Module | None = None
        if shot > 1:
            self.kshot_rw = nn.Sequential(
                nn.Conv2d(shot, kshot_hidden, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(kshot_hidden, shot, kernel_size=1),
            )

    def shot_weights(self, distances: torch.Tensor) -> torch.Tensor:
        """distances (B, K) → softmax weights (B, K) in shot order.

        K = 1 gives 1. A K different from the trained ``shot`` (e.g. a 1-shot model run
        at 5 shots) has no trained reweighting: the shots are averaged."""
        shots = distances.shape[1]
        if shots == 1:
            return torch.ones_like(distances)
        if self.kshot_rw is None or shots != self.shot:
            return torch.full_like(distances, 1.0 / shots)
        sorted_distances, order = distances.sort(dim=1)
        rank = order.argsort(dim=1)  # inverse permutation: rank[b, k] = position of shot k
        weights_by_rank = self.kshot_rw(sorted_distances[:, :, None, None]).flatten(1)
        return weights_by_rank.gather(1, rank).softmax(dim=1)

    def forward(
        self,
        meta_logits: torch.Tensor,
        base_logits: torch.Tensor,
        distances: torch.Tensor,
        exclude_base_class: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """meta_logits (B, 2, h, w); base_logits (B, 1 + N_base, h, w); distances (B, K);
        exclude_base_class (B,) 0-based base-class index removed from ``base_map``
        (channel index + 1), negative = none → final scores (B, 2, h, w)."""
        est = (self.shot_weights(distances) * distances).sum(dim=1)  # (B,)
        meta = meta_logits.softmax(dim=1)
        base = base_logits.softmax(dim=1)
        keep = torch.ones(base.shape[:2], dtype=base.dtype, device=base.device)
        keep[:, 0] = 0  # background
        if exclude_base_class is not None:
            exclude = exclude_base_class.to(device=base.device, dtype=torch.long)
            if bool((exclude >= base.shape[1] - 1).any()):
                raise ValueError(
                    f"base-class index out of range: {exclude.tolist()} with {base.shape[1] - 1} base classes"
                )
            rows = torch.nonzero(exclude >= 0).flatten()
            keep[rows, exclude[rows] + 1] = 0
        base_map = (base * keep[:, :, None, None]).sum(dim=1, keepdim=True)
        est_map = est[:, None, None, None].expand_as(meta[:, :1])
        background = self.gram_merge(torch.cat([meta[:, :1], est_map], dim=1))
        foreground = self.gram_merge(torch.cat([meta[:, 1:], est_map], dim=1))
        background = self.cls_merge(torch.cat([background, base_map], dim=1))
        return torch.cat([background, foreground], dim=1)
