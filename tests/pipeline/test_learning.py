"""Learning actually happens: cheap checks in the fast suite, the full bar marked slow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fss.data import SyntheticSource
from fss.models import HSNet
from fss.models.segmenter import PyramidSegmenter


def test_base_class_segmenter_learns_quickly():
    torch.manual_seed(0)
    source = SyntheticSource(image_size=64)
    loader = DataLoader(source.semantic("train", fold=0, num_images=16 * 25, seed=0), batch_size=16)
    net = PyramidSegmenter("resnet18", num_classes=16, head_channels=32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for batch in loader:
        loss = F.cross_entropy(net(batch["image"]), batch["label"], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 1.5  # ~ln(16) at random init
    assert last < 0.6 * first, losses


def test_segmenter_head_levels_choose_which_levels_are_supervised():
    """head_levels=[3, 4]: the head never reads layer2, which learns only through layer3."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    full = PyramidSegmenter("resnet18", num_classes=4, head_channels=8)
    deep = PyramidSegmenter("resnet18", num_classes=4, head_channels=8, head_levels=(4, 3))
    assert deep.head_levels == (3, 4) and len(deep.laterals) == 2
    assert [m[0].in_channels for m in deep.laterals] == [256, 512]
    assert deep(images).shape == full(images).shape == (2, 4, 64, 64)
    # Parameters: the full head has one more 1x1 lateral (128 -> 8, no bias) + its BN (2·8).
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(full) - count(deep) == 128 * 8 + 2 * 8
    with pytest.raises(ValueError, match="head_levels"):
        PyramidSegmenter("resnet18", num_classes=4, head_levels=(1, 4))


def test_default_head_levels_keep_the_trunk_cache_key(compose_cfg, tmp_path):
    from fss.stages.trunk import TRUNK

    pretrain_key = TRUNK.key

    default = pretrain_key(compose_cfg([], cache_dir=tmp_path))
    explicit = pretrain_key(compose_cfg(["pretrain.head_levels=[4,3,2]"], cache_dir=tmp_path))
    deep = pretrain_key(compose_cfg(["pretrain.head_levels=[3,4]"], cache_dir=tmp_path))
    assert default == explicit != deep
    assert default == pretrain_key(compose_cfg(["pretrain.head_levels=[2,3,4]"], cache_dir=tmp_path))


def test_hsnet_learner_fits_a_batch():
    torch.manual_seed(0)
    source = SyntheticSource(image_size=64)
    batch = next(iter(DataLoader(source.episodic("train", 0, 1, 4, seed=0), batch_size=4)))
    model = HSNet(backbone="resnet18", weights=None)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(25):
        out = model.training_loss(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                  batch["query_mask"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses
    prediction = model.predict(batch["query_img"], batch["support_imgs"], batch["support_masks"])
    valid = batch["query_mask"] != 255
    accuracy = (prediction == batch["query_mask"])[valid].float().mean().item()
    assert accuracy > 0.85


@pytest.mark.slow
def test_default_run_beats_prototype_baseline_by_ten_points(compose_cfg, tmp_path):
    """The README's acceptance bar, on the real default recipe (about 10 minutes)."""
    from fss.pipeline import run

    cache = tmp_path / "cache"
    hsnet = run(compose_cfg(["callbacks.progress_bar.refresh_rate=0"], cache_dir=cache))
    proto = run(compose_cfg(["model=proto", "callbacks.progress_bar.refresh_rate=0"], cache_dir=cache))
    assert hsnet["episodes"] == proto["episodes"] == 1000
    assert hsnet["mIoU"] >= proto["mIoU"] + 10, (hsnet["mIoU"], proto["mIoU"])
