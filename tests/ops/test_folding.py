"""fss.ops.folding: BatchNorm folded into frozen convolutions (fast) or the module itself
(reference)."""

from __future__ import annotations

import torch

from fss.models import HSNet
from fss.ops import fast_paths
from fss.ops.folding import FoldedCache, fold_batchnorms


def test_folded_backbone_matches_and_follows_new_weights() -> None:
    torch.manual_seed(6)
    model = HSNet("resnet18").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 64)
    folded = fold_batchnorms(model.backbone)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        for got, want in zip(folded(images), model.backbone(images), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    cache = FoldedCache()
    first = cache.get(model.backbone)
    assert cache.get(model.backbone) is first  # cached while the weights are unchanged
    state = {k: v + 0.1 if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    model.backbone.load_state_dict(state)
    second = cache.get(model.backbone)
    assert second is not first  # new weights: rebuilt, never stale
    with torch.no_grad():
        torch.testing.assert_close(second(images)[-1], model.backbone(images)[-1],
                                   rtol=1e-4, atol=1e-4)
    assert "_folded_backbone" not in "".join(model.state_dict())


def test_reference_serves_the_module_itself() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    cache = FoldedCache()
    assert cache.get(module, impl="reference") is module
    with fast_paths(False):
        assert cache.get(module) is module
    folded = cache.get(module)
    assert folded is not module and isinstance(folded[1], torch.nn.Identity)
