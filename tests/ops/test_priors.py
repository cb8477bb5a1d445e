"""fss.ops.priors: the max-cosine prior, every implementation against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fss.ops.priors import max_cosine_prior, max_cosine_prior_reference

IMPLS = ("fast", "fast_cpu", "fast_accelerator", "reference")


def _masks(kind: str) -> torch.Tensor:
    if kind == "full":
        return torch.ones(2, 3, 1, 41, 49)
    masks = torch.zeros(2, 3, 41, 41)
    masks[..., 41 // 4 : 41 // 2, 41 // 5 : 3 * 41 // 4] = 1
    masks = F.interpolate(masks, size=(41, 49)).unsqueeze(2)
    if kind == "empty_shot":
        masks[0, 1] = 0
    return masks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", ["box", "full", "empty_shot"])
def test_max_cosine_prior_matches_reference(impl, mask) -> None:
    torch.manual_seed(9)
    query = torch.randn(2, 8, 6, 7)
    supports = torch.randn(2, 3, 8, 6, 7)
    masks = _masks(mask)
    expected = max_cosine_prior_reference(query, supports, masks)
    torch.testing.assert_close(max_cosine_prior(query, supports, masks, impl=impl), expected,
                               rtol=1e-5, atol=1e-6)


def test_reference_is_the_max_cosine_to_the_masked_support() -> None:
    torch.manual_seed(10)
    query, supports = torch.randn(1, 4, 2, 3), torch.randn(1, 1, 4, 2, 3)
    masks = torch.zeros(1, 1, 1, 2, 3)
    masks[..., 0, :2] = 1
    prior = max_cosine_prior_reference(query, supports, masks)
    for i in range(2):
        for j in range(3):
            cosines = [F.cosine_similarity(query[0, :, i, j], supports[0, 0, :, 0, c], dim=0)
                       for c in range(2)]
            best = max(max(cosines), torch.tensor(0.0))  # masked-out positions: cosine 0
            torch.testing.assert_close(prior[0, 0, i, j], best, rtol=1e-5, atol=1e-6)
