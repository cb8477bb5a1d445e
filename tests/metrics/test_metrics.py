"""FewShotIoU on hand-computed cases, and its DDP-style (sum) merge."""

import math

import pytest
import torch

from fss.metrics import FewShotIoU

IGN = 255


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_single_episode_hand_computed():
    metric = FewShotIoU(class_ids=[5, 6])
    pred = t([[[1, 1], [0, 0]]])
    gt = t([[[1, 0], [1, 0]]])
    metric.update(pred, gt, torch.tensor([5]))
    out = metric.compute()
    # fg: I = 1 (top-left), U = 3 -> 33.33; bg: I = 1 (bottom-right), U = 3 -> 33.33
    assert out["miou"].item() == pytest.approx(100 / 3, abs=1e-4)
    assert out["fbiou"].item() == pytest.approx(100 / 3, abs=1e-4)
    assert out["episodes"].item() == 1
    assert math.isnan(out["class_iou"][1].item())  # class 6 never seen


def test_ignore_pixels_are_dropped():
    metric = FewShotIoU(class_ids=[0])
    pred = t([[[1, 1], [1, 0]]])
    gt = t([[[1, IGN], [IGN, 0]]])  # the two wrong-looking pixels are ignored
    metric.update(pred, gt, torch.tensor([0]))
    out = metric.compute()
    assert out["miou"].item() == pytest.approx(100.0)
    assert out["fbiou"].item() == pytest.approx(100.0)


def test_classwise_accumulation_is_not_episode_average():
    metric = FewShotIoU(class_ids=[0, 1])
    # class 0, episode A: fg I=1 U=1 ; episode B: fg I=0 U=3  -> class IoU = 1/4
    metric.update(t([[[1, 0], [0, 0]]]), t([[[1, 0], [0, 0]]]), torch.tensor([0]))
    metric.update(t([[[1, 1], [0, 0]]]), t([[[0, 0], [1, 0]]]), torch.tensor([0]))
    # class 1: fg I=2 U=2 -> 1.0
    metric.update(t([[[1, 1], [0, 0]]]), t([[[1, 1], [0, 0]]]), torch.tensor([1]))
    out = metric.compute()
    assert out["class_iou"].tolist() == pytest.approx([25.0, 100.0])
    assert out["miou"].item() == pytest.approx(62.5)
    # background over all classes: I = 3 + 1 + 2 = 6, U = 3 + 4 + 2 = 9
    # foreground over all classes: I = 1 + 0 + 2 = 3, U = 1 + 3 + 2 = 6
    assert out["fbiou"].item() == pytest.approx(100 * (6 / 9 + 3 / 6) / 2, abs=1e-4)


def test_batched_update_equals_sequential_and_sharded_merge():
    torch.manual_seed(0)
    preds = torch.randint(0, 2, (12, 8, 8))
    gts = torch.randint(0, 2, (12, 8, 8))
    gts[torch.rand(12, 8, 8) < 0.1] = IGN
    classes = torch.randint(0, 3, (12,))
    whole = FewShotIoU(class_ids=[0, 1, 2])
    whole.update(preds, gts, classes)
    # Two "ranks" each see half the episodes; DDP sums the states.
    shards = [FewShotIoU(class_ids=[0, 1, 2]) for _ in range(2)]
    shards[0].update(preds[::2], gts[::2], classes[::2])
    shards[1].update(preds[1::2], gts[1::2], classes[1::2])
    # merge_state applies each state's dist_reduce_fx, exactly what the DDP sync does.
    shards[0].merge_state(shards[1])
    a, b = whole.compute(), shards[0].compute()
    assert a["miou"].item() == pytest.approx(b["miou"].item())
    assert a["fbiou"].item() == pytest.approx(b["fbiou"].item())
    assert torch.equal(whole.intersection, shards[0].intersection)


def test_unknown_class_and_shape_errors():
    metric = FewShotIoU(class_ids=[0, 1])
    with pytest.raises(ValueError, match="not among the evaluated"):
        metric.update(t([[[1]]]), t([[[1]]]), torch.tensor([7]))
    with pytest.raises(ValueError, match="upsample"):
        metric.update(t([[[1, 1]]]), t([[[1]]]), torch.tensor([0]))
