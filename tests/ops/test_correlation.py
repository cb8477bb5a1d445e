"""fss.ops.correlation: the hypercorrelation pyramid over every implementation, against
the reference (fp32 to float rounding)."""

from __future__ import annotations

import pytest
import torch

from fss.models.hsnet.correlation import mask_features
from fss.ops.correlation import (
    BoxedCorrelation,
    correlation_product,
    hypercorrelation_pyramid,
    hypercorrelation_pyramid_reference,
)

IMPLS = ("fast", "fast_cpu", "fast_accelerator", "reference")
# 21 x 20 = 420 query positions at level 2: its fast products run as 1x1 convolutions.
SHAPES = [(8, 21, 20), (8, 21, 20), (16, 6, 6), (16, 6, 6), (16, 6, 6), (32, 3, 3)]
GROUPS = [2, 2, 3, 3, 3, 4]


def _box_masks(pairs: int, size: int) -> torch.Tensor:
    masks = torch.zeros(pairs, size, size)
    masks[..., size // 4 : size // 2, size // 5 : 3 * size // 4] = 1
    return masks


def test_reference_is_the_clamped_cosine() -> None:
    torch.manual_seed(0)
    query, support = torch.randn(1, 5, 3, 4), torch.randn(2, 5, 2, 3)
    level = hypercorrelation_pyramid_reference([query], [support], [4])[0]
    assert level.shape == (2, 1, 3, 4, 2, 3)
    for shot in range(2):
        for (i, j, p, q) in ((0, 0, 0, 0), (2, 3, 1, 2), (1, 2, 0, 1)):
            a, b = query[0, :, i, j], support[shot, :, p, q]
            cosine = (a / (a.norm() + 1e-5)) @ (b / (b.norm() + 1e-5))
            torch.testing.assert_close(level[shot, 0, i, j, p, q], cosine.clamp(min=0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["box", "rows", "full", "empty_shot"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hypercorrelation_pyramid_matches_reference(impl, mask, channels_last) -> None:
    torch.manual_seed(3)
    batch, shots = 2, 3
    query = [torch.randn(batch, *shape) for shape in SHAPES]
    support = [torch.randn(batch * shots, *shape) for shape in SHAPES]
    masks = torch.ones(batch * shots, 48, 48)
    if mask in ("box", "empty_shot"):
        masks = _box_masks(batch * shots, 48)
    if mask == "rows":  # whole rows: the in-place span of the pruned GEMM
        masks = torch.zeros(batch * shots, 48, 48)
        masks[:, 8:30] = 1
    if mask == "empty_shot":
        masks[1] = 0
    support = mask_features(support, masks)
    if channels_last:
        query = [q.contiguous(memory_format=torch.channels_last) for q in query]
        support = [s.contiguous(memory_format=torch.channels_last) for s in support]
    pruned = sum(int((s.flatten(2).norm(dim=1) == 0).sum()) for s in support)
    assert (pruned > 0) == (mask != "full")  # the pruned GEMMs are exercised

    expected = hypercorrelation_pyramid_reference(query, support, GROUPS)
    with torch.no_grad():
        fast = hypercorrelation_pyramid(query, support, GROUPS, impl=impl)
    assert [tuple(f.shape) for f in fast] == [tuple(e.shape) for e in expected]
    for got, want in zip(fast, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if impl == "fast_cpu":
        return  # in place: no autograd (see test_fast_cpu_refuses_autograd)
    # With autograd (fine-tuned backbone) the differentiable path gives the same values.
    leaves = [s.detach().requires_grad_(True) for s in support]
    differentiable = hypercorrelation_pyramid(query, leaves, GROUPS, impl=impl)
    for got, want in zip(differentiable, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(sum(level.sum() for level in differentiable), leaves)
    reference_leaves = [s.detach().requires_grad_(True) for s in support]
    reference = hypercorrelation_pyramid_reference(query, reference_leaves, GROUPS)
    want = torch.autograd.grad(sum(level.sum() for level in reference), reference_leaves)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fast_cpu_refuses_autograd() -> None:
    query, support = [torch.randn(1, 4, 5, 5)], [torch.randn(1, 4, 5, 5).requires_grad_(True)]
    with pytest.raises(ValueError, match="cannot be differentiated"):
        hypercorrelation_pyramid(query, support, [2], impl="fast_cpu")


def test_fast_picks_the_cpu_branch_only_without_autograd() -> None:
    """On a CPU without autograd the fast levels are support-last (the in-place branch);
    with autograd they are contiguous (the batched branch)."""
    query = [torch.randn(1, 4, 5, 5) for _ in range(2)]  # two layers of one level
    support = [torch.randn(2, 4, 5, 5) for _ in range(2)]
    with torch.no_grad():
        level = hypercorrelation_pyramid(query, support, [2, 2])[0]
    assert level.permute(0, 2, 3, 1, 4, 5).is_contiguous() and not level.is_contiguous()
    leaves = [s.requires_grad_(True) for s in support]
    assert hypercorrelation_pyramid(query, leaves, [2, 2])[0].is_contiguous()


@pytest.mark.parametrize("positions", [120, 2500])
def test_correlation_product_matches_matmul(positions) -> None:
    """Products of >= 400 query positions run as oneDNN 1x1 convolutions; fewer, as mm."""
    torch.manual_seed(positions)
    query = torch.randn(48, positions).t()  # (P, C), not contiguous: as the taps arrive
    support = torch.randn(48, 70)
    got = correlation_product(query, support)
    assert got.shape == (positions, 70) and got.is_contiguous()
    torch.testing.assert_close(got, query @ support, rtol=1e-5, atol=1e-4)


def test_boxed_levels_only_where_supports_are_masked(monkeypatch) -> None:
    monkeypatch.setattr("fss.ops.correlation.BOXED_MIN_POSITIONS", 0)
    query = [torch.randn(1, 4, 6, 6)]
    full = [torch.randn(2, 4, 6, 6)]
    with torch.no_grad():
        assert isinstance(hypercorrelation_pyramid(query, full, [2], boxed=True)[0], torch.Tensor)
        masked = [full[0] * (torch.arange(6) < 3).float().view(1, 1, 6, 1)]
        assert isinstance(hypercorrelation_pyramid(query, masked, [2], boxed=True)[0],
                          BoxedCorrelation)
        assert isinstance(hypercorrelation_pyramid(query, masked, [2])[0], torch.Tensor)
        for impl in ("reference", "fast_accelerator"):  # boxes on the CPU branch only
            level = hypercorrelation_pyramid(query, masked, [2], boxed=True, impl=impl)[0]
            assert isinstance(level, torch.Tensor)


def test_small_levels_stay_dense_large_ones_become_boxes() -> None:
    """The default size rule: a partly masked level of fewer than BOXED_MIN_POSITIONS
    (query x support positions) stays a dense tensor, where the boxed conv's per-pair work
    costs more than it saves; from that size on it is kept as boxes."""
    from fss.ops.correlation import BOXED_MIN_POSITIONS

    side = round(BOXED_MIN_POSITIONS ** 0.25)
    assert side**4 == BOXED_MIN_POSITIONS
    keep = (torch.arange(side) < side // 2).float().view(1, 1, side, 1)
    with torch.no_grad():
        large = hypercorrelation_pyramid([torch.randn(1, 2, side, side)],
                                         [torch.randn(1, 2, side, side) * keep], [2], boxed=True)
        small = hypercorrelation_pyramid([torch.randn(1, 2, side, side - 1)],
                                         [torch.randn(1, 2, side, side) * keep], [2], boxed=True)
    assert isinstance(large[0], BoxedCorrelation)
    assert isinstance(small[0], torch.Tensor)
