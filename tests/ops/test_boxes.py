"""fss.ops.boxes: mask boxes, the pruning decision, and convolutions inside boxes."""

from __future__ import annotations

import pytest
import torch

from fss.models.pspnet import PSPNet
from fss.ops.boxes import (
    conv2d_in_boxes,
    conv2d_in_boxes_reference,
    mask_boxes,
    nonzero_box,
    union_box,
    worth_pruning,
)

# On a 9x8 map: interior, full height at the left border, the bottom-right corner, empty.
BOXES = [(2, 6, 3, 7), (0, 9, 0, 2), (8, 9, 7, 8), (0, 0, 0, 0)]


def _masks(boxes, height=9, width=8) -> torch.Tensor:
    masks = torch.zeros(len(boxes), 1, height, width)
    for index, (top, bottom, left, right) in enumerate(boxes):
        masks[index, 0, top:bottom, left:right] = 1
    return masks


def test_nonzero_box_bounds_the_nonzero_entries() -> None:
    values = torch.zeros(6, 7)
    assert nonzero_box(values) == (0, 0, 0, 0)
    values[1, 5] = 2.0
    values[4, 2] = 0.5
    assert nonzero_box(values) == (1, 5, 2, 6)
    assert union_box([(1, 3, 2, 4), (0, 0, 0, 0), (2, 5, 0, 3)]) == (1, 5, 0, 4)
    assert union_box([(0, 0, 0, 0)]) == (0, 0, 0, 0)
    assert worth_pruning((0, 5, 0, 5), 10, 10) and not worth_pruning((0, 10, 0, 10), 10, 10)


@pytest.mark.parametrize("impl", ["fast", "fast_cpu", "fast_accelerator", "reference"])
def test_mask_boxes_prunes_on_the_cpu_branch_only(impl) -> None:
    masks = _masks(BOXES)
    boxes = mask_boxes(masks, (9, 8), impl=impl)
    if impl in ("fast", "fast_cpu"):
        assert boxes == BOXES
    else:
        assert boxes is None
    # Nothing worth pruning (every mask full): the whole map, on every branch.
    assert mask_boxes(torch.ones(2, 1, 9, 8), (9, 8), impl=impl) is None


def test_mask_boxes_resize_the_masks_to_the_map() -> None:
    masks = torch.zeros(1, 1, 18, 16)
    masks[..., 4:12, 6:14] = 1
    assert mask_boxes(masks, (9, 8), impl="fast_cpu") == [(2, 6, 3, 7)]


@pytest.mark.parametrize("kernel", [3, 5])
def test_conv2d_in_boxes_matches_the_whole_map_inside(kernel) -> None:
    torch.manual_seed(kernel)
    inputs = [torch.randn(4, 5, 9, 8), torch.randn(4, 3, 9, 8)]
    weight, bias = torch.randn(6, 8, kernel, kernel), torch.randn(6)
    norm = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        got = conv2d_in_boxes(inputs, weight, bias, BOXES, after=norm)
        expected = conv2d_in_boxes_reference(inputs, weight, bias, BOXES, after=norm)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got[3].any()  # the empty box: zeros


def test_pspnet_feat5_in_boxes_matches_feat5_inside() -> None:
    """The supports' feat5 inside mask boxes only: the full map's values there (the 3x3
    conv's halo zero-padded at borders), 0 elsewhere."""
    torch.manual_seed(13)
    model = PSPNet("resnet_small", strict_size=False).eval()
    layer4 = torch.randn(4, model.stage_channels[4], 9, 8)
    with torch.no_grad():
        full = model.feat5(layer4)
        boxed = model.feat5_in_boxes(layer4, BOXES)
    for index, (top, bottom, left, right) in enumerate(BOXES):
        inside = torch.zeros(9, 8, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        torch.testing.assert_close(boxed[index][:, inside], full[index][:, inside],
                                   rtol=1e-5, atol=1e-5)
        assert not boxed[index][:, ~inside].any()
