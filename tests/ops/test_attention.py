"""fss.ops.attention: self- and cross-attention, every implementation against the
reference (fp32 to float rounding)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fss.models.hdmnet.attention import MultiHeadAttention
from fss.ops import fast_paths
from fss.ops.attention import (
    cross_attention,
    cross_attention_weights,
    pruned_cross_attention,
    self_attention,
    self_attention_reference,
)

CROSS_IMPLS = ("fast", "fast_cpu", "fast_accelerator", "reference")


def _masked_episode():
    torch.manual_seed(7)
    q, k, v = torch.randn(3, 2, 20, 8), torch.randn(3, 2, 30, 8), torch.randn(3, 2, 30, 8)
    mask = (torch.rand(3, 30) > 0.6).float()
    mask[1] = 0  # no foreground token at all
    mask[2] = 1
    return q, k, v, mask


@pytest.mark.parametrize("impl", CROSS_IMPLS)
@pytest.mark.parametrize("mode", ["cosine", "dot"])
def test_cross_attention_matches_dense(impl, mode) -> None:
    q, k, v, mask = _masked_episode()
    attention, correlation = cross_attention_weights(q, k, mask, mode)
    out, got_correlation = cross_attention(q, k, v, mask, mode, impl=impl)
    torch.testing.assert_close(out, attention @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_correlation, correlation, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["cosine", "dot"])
def test_dense_weights_are_the_definition(mode) -> None:
    """The reference weights, written out once more: cosine = softmax over the queries,
    background columns zeroed; dot = softmax over the foreground keys."""
    q, k, _, mask = _masked_episode()
    columns = mask[:, None, None, :]
    if mode == "cosine":
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / 0.1
        expected = scores.softmax(dim=-2) * columns
    else:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        expected = scores.masked_fill(columns == 0, float("-inf")).softmax(-1).nan_to_num(0.0)
    correlation = ((scores * columns).sum(-1) / (columns.sum(-1) + 1e-9)).mean(dim=1)
    attention, got_correlation = cross_attention_weights(q, k, mask, mode)
    torch.testing.assert_close(attention, expected)
    torch.testing.assert_close(got_correlation, correlation)


def test_pruned_cross_attention_gradients_match_dense() -> None:
    q, k, v, mask = _masked_episode()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, correlation = pruned_cross_attention(*leaves, mask)
    got = torch.autograd.grad(out.sum() + correlation.sum(), leaves)
    reference_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, correlation = cross_attention(*reference_leaves, mask, impl="reference")
    want = torch.autograd.grad(out.sum() + correlation.sum(), reference_leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_self_attention_matches_reference(impl) -> None:
    torch.manual_seed(8)
    q, k, v = torch.randn(2, 2, 25, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    expected = self_attention_reference(q, k, v)
    scores = q @ k.transpose(-2, -1) / (math.sqrt(8) + 1e-9)
    torch.testing.assert_close(expected, scores.softmax(-1) @ v)
    torch.testing.assert_close(self_attention(q, k, v, impl=impl), expected,
                               rtol=1e-5, atol=1e-6)


def test_attention_layer_follows_the_switch() -> None:
    torch.manual_seed(9)
    layer = MultiHeadAttention(16, 2, mode="self")
    tokens, keys = torch.randn(2, 25, 16), torch.randn(2, 9, 16)
    fast, _ = layer(tokens, keys)
    with fast_paths(False):
        reference, _ = layer(tokens, keys)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
