"""Frozen straightforward HDMNet pieces: the reference every fast path is compared against.

Copies of this project's first (unoptimised) implementations of the attention scores, the
multi-head attention forward and the max-cosine prior: dense (Lq x Lk) score matrices with
masked columns, one prior matmul per shot, the unfolded PSPNet. :func:`reference_mode`
swaps them into the live model classes, so a whole HDMNet forward can be run both ways on
the same weights. Do not optimise this file: ``tests/test_speed_equivalence.py`` relies on
it staying the definition.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import fss.models.folding
import fss.models.hdmnet.attention
import fss.models.hdmnet.model

COSINE_EPS = 1e-7


def cross_attention_weights(q, k, support_mask, mode="cosine", temperature=0.1):
    """q (B, heads, Lq, d), k (B, heads, Lk, d), support_mask (B, Lk) -> attention
    (B, heads, Lq, Lk), correlation (B, Lq)."""
    columns = support_mask[:, None, None, :].to(q.dtype)
    if mode == "cosine":
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / temperature
        attention = scores.softmax(dim=-2) * columns
    elif mode == "dot":
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        attention = scores.masked_fill(columns == 0, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    else:
        raise ValueError(mode)
    correlation = (scores * columns).sum(-1) / (columns.sum(-1) + 1e-9)
    return attention, correlation.mean(dim=1)


def multi_head_attention_forward(self, query, key_value, support_mask=None):
    """MultiHeadAttention.forward as first written."""
    q = self._split_heads(self.linear_q(query))
    k = self._split_heads(self.linear_k(key_value))
    v = self._split_heads(self.linear_v(key_value))
    correlation = None
    if self.mode == "self":
        scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) + 1e-9)
        attention = scores.softmax(dim=-1)
    else:
        attention, correlation = cross_attention_weights(
            q, k, support_mask, self.mode, self.temperature
        )
    out = (attention @ v).transpose(1, 2).flatten(2)
    return self.linear_o(out), correlation


def max_cosine_prior(query_features, support_features, support_masks):
    """query (B, C, h, w), support (B, K, C, hs, ws), masks (B, K, 1, H, W) -> (B, 1, h, w)."""
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


@contextlib.contextmanager
def reference_mode():
    """Run HDMNet with the reference pieces: dense attention, per-shot dense priors and the
    unfolded PSPNet (``FoldedCache.get`` returns the source module itself), whose head
    computes the supports' feat5 over the whole map."""
    patches = [
        (fss.models.hdmnet.attention.MultiHeadAttention, "forward", multi_head_attention_forward),
        (fss.models.hdmnet.model, "max_cosine_prior", max_cosine_prior),
        (fss.models.hdmnet.model, "_support_feat5",
         lambda pspnet, layer4, masks: pspnet.feat5(layer4)),
        (fss.models.folding.FoldedCache, "get", lambda self, source: source),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
