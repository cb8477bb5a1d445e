"""The base-class segmentation module: progressive resizing of the trunk's early epochs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from fss.lightning.segmentation_module import (
    SegmentationModule,
    check_low_resolution,
    downsample,
)


def test_downsample_keeps_ignore_and_labels_nearest():
    images = torch.rand(2, 3, 112, 112)
    labels = torch.zeros(2, 112, 112, dtype=torch.long)
    labels[:, :56] = 3
    labels[:, :, :8] = 255
    small_images, small_labels = downsample(images, labels, 80)
    assert small_images.shape == (2, 3, 80, 80) and small_labels.shape == (2, 80, 80)
    assert small_labels.dtype == torch.long
    assert set(small_labels.unique().tolist()) == {0, 3, 255}
    # 56 of 112 rows are class 3 -> 40 of 80 rows (nearest), ignore columns 8/112 -> 6/80
    assert (small_labels[:, :, 10] == 3).sum().item() == 2 * 40
    assert (small_labels[0, 60] == 255).sum().item() == 6
    # antialiased bilinear: a constant image stays that constant
    flat = torch.full((1, 3, 112, 112), 0.25)
    assert torch.allclose(downsample(flat, labels[:1], 80)[0], torch.full((1, 3, 80, 80), 0.25))
    # at the size or smaller already: the same tensors, never upsampled
    assert downsample(small_images, small_labels, 80)[0] is small_images
    assert downsample(small_images, small_labels, 96)[1] is small_labels
    # not square: the longer side goes to the size
    wide_images, wide_labels = downsample(torch.rand(1, 3, 120, 160),
                                          torch.zeros(1, 120, 160, dtype=torch.long), 80)
    assert wide_images.shape == (1, 3, 60, 80) and wide_labels.shape == (1, 60, 80)


@pytest.mark.parametrize("value, message", [
    ({"size": 80}, "expected exactly the keys size and epochs"),
    ({"size": 16, "epochs": 2}, "size=16: expected an integer >= 32"),
    ({"size": 80, "epochs": -1}, "epochs=-1: expected an integer >= 0"),
    ({"size": 80.5, "epochs": 2}, "size=80.5"),
])
def test_check_low_resolution_names_the_key(value, message):
    with pytest.raises(ValueError, match="pretrain.low_resolution") as error:
        check_low_resolution(value)
    assert message in str(error.value)


def test_check_low_resolution_accepts_off_and_on():
    assert check_low_resolution(None) is None
    assert check_low_resolution({"size": 80, "epochs": 0}) is None
    assert check_low_resolution({"size": 80, "epochs": 4}) == (80, 4)


class _SizeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(images.shape[-2:]))
        return self.conv(images)


@pytest.mark.parametrize("epoch, expected", [(0, (48, 48)), (1, (48, 48)), (2, (64, 64))])
def test_training_step_uses_low_resolution_only_in_early_epochs(epoch, expected, monkeypatch):
    net = _SizeRecorder()
    module = SegmentationModule(net, 4, partial(torch.optim.SGD, lr=0.1),
                                low_resolution={"size": 48, "epochs": 2})
    monkeypatch.setattr(SegmentationModule, "current_epoch", property(lambda self: epoch))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.randint(0, 4, (2, 64, 64))}
    loss = module.training_step(batch, 0)
    assert net.sizes == [expected]
    assert loss.ndim == 0 and torch.isfinite(loss)
    net.sizes.clear()
    module.validation_step(batch, 0)
    assert net.sizes == [(64, 64)]  # validation always at the data's size

