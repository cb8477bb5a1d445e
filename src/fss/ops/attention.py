"""HDMNet's attention: scaled dot-product self-attention and masked cross-attention.

Shapes: q (B, heads, Lq, d), k and v (B, heads, Lk, d), support_mask (B, Lk) in {0, 1}.

Implementations (``impl``, default after :func:`fss.ops.use_fast_paths`):

- :func:`self_attention`: ``fast`` = ``F.scaled_dot_product_attention`` (no (Lq x Lk)
  matrix kept); ``reference`` = softmax(q·kᵀ / (√d + 1e-9)) @ v written out.
- :func:`cross_attention`: ``reference`` = the dense masked attention of
  :func:`cross_attention_weights` times v; ``fast_cpu`` = :func:`pruned_cross_attention`
  over the foreground support tokens only; ``fast_accelerator`` = the dense form (a
  per-sample foreground gather would synchronise with the host: a few large kernels run
  instead); ``fast`` picks ``fast_cpu`` on a CPU, else ``fast_accelerator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fss.ops.config import DEVICE_IMPLS, FAST, FAST_CPU, REFERENCE, choose_impl, device_impl

CROSS_IMPLS = DEVICE_IMPLS
SELF_IMPLS = (FAST, REFERENCE)
# The official self-attention scale is 1 / (√d + SCALE_EPS).
SCALE_EPS = 1e-9


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   impl: str | None = None) -> torch.Tensor:
    """softmax(q·kᵀ / (√d + 1e-9), over the keys) @ v → (B, heads, Lq, d)."""
    if choose_impl(impl, SELF_IMPLS) == FAST:
        return _fused_self_attention(q, k, v)
    return self_attention_reference(q, k, v)


def _fused_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`self_attention` as one fused kernel."""
    scale = 1.0 / (math.sqrt(q.shape[-1]) + SCALE_EPS)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def self_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                             ) -> torch.Tensor:
    """:func:`self_attention` with the (Lq x Lk) score matrix written out."""
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) + SCALE_EPS)
    return scores.softmax(dim=-1) @ v


def cross_attention_scores(q: torch.Tensor, k: torch.Tensor, mode: str,
                           temperature: float) -> torch.Tensor:
    """Matching scores (..., Lq, Lk): ``cosine`` cos(q, k)/τ, ``dot`` q·k/√d."""
    if mode == "cosine":
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / temperature
    if mode == "dot":
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    raise ValueError(f"unknown cross-attention mode {mode!r}; accepted: cosine, dot")


def cross_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    support_mask: torch.Tensor,
    mode: str = "cosine",
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query tokens over support tokens, per head.

    q (B, heads, Lq, d), k (B, heads, Lk, d), support_mask (B, Lk) {0,1} →
    attention (B, heads, Lq, Lk), correlation C' (B, Lq).

    ``cosine``: scores = cos(q, k)/τ, softmax over the QUERY axis (dim −2), background
    columns zeroed: every foreground column sums to 1 over the queries.
    ``dot``: scores = q·k/√d, softmax over the foreground keys (dim −1).
    C' is the mean score over the foreground keys, averaged over heads."""
    columns = support_mask[:, None, None, :].to(q.dtype)  # (B, 1, 1, Lk)
    scores = cross_attention_scores(q, k, mode, temperature)
    if mode == "cosine":
        attention = scores.softmax(dim=-2) * columns
    else:
        attention = scores.masked_fill(columns == 0, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    correlation = (scores * columns).sum(-1) / (columns.sum(-1) + 1e-9)  # (B, heads, Lq)
    return attention, correlation.mean(dim=1)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support_mask: torch.Tensor,
    mode: str = "cosine",
    temperature: float = 0.1,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_attention_weights(...)[0] @ v`` (B, heads, Lq, d) and the correlation
    (B, Lq); ``impl`` as in the module docstring."""
    impl = device_impl(choose_impl(impl, CROSS_IMPLS), q.device.type == "cpu")
    if impl == FAST_CPU:
        return pruned_cross_attention(q, k, v, support_mask, mode, temperature)
    attention, correlation = cross_attention_weights(q, k, support_mask, mode, temperature)
    return attention @ v, correlation


def pruned_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support_mask: torch.Tensor,
    mode: str = "cosine",
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_attention_weights(...)[0] @ v`` and the correlation, computed over the
    foreground support tokens only.

    q (B, heads, Lq, d), k and v (B, heads, Lk, d), support_mask (B, Lk) ≥ 0 → output
    (B, heads, Lq, d), correlation (B, Lq).

    Exact, because a zero-mask support token contributes nothing in either mode: in
    ``cosine`` the softmax runs over the query axis, one column per support token, and the
    background columns are then multiplied by 0; in ``dot`` they are excluded from the
    softmax; in both the correlation averages over the foreground only. Dropping those
    columns before the products saves their (Lq x Lk) scores, which dominate at stage 0
    (60² x K·60² at 473²). One loop step per sample (the foreground count differs).
    """
    outputs, correlations = [], []
    for sample in range(q.shape[0]):
        weights = support_mask[sample].to(q.dtype)
        kept = weights.nonzero().squeeze(1)
        query = q[sample]
        if kept.numel() == 0:  # no foreground token: zero output, zero correlation
            outputs.append(torch.zeros_like(query))
            correlations.append(query.new_zeros(query.shape[1]))
            continue
        key, value, weights = k[sample][:, kept], v[sample][:, kept], weights[kept]
        scores = cross_attention_scores(query, key, mode, temperature)
        if mode == "cosine":
            attention = scores.softmax(dim=-2) * weights
        else:
            attention = scores.softmax(dim=-1)
        outputs.append(attention @ value)
        correlation = (scores * weights).sum(-1) / (weights.sum() + 1e-9)  # (heads, Lq)
        correlations.append(correlation.mean(dim=0))
    return torch.stack(outputs), torch.stack(correlations)
