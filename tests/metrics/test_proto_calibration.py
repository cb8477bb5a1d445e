"""The prototype baseline's threshold calibration: the model sweeps the thresholds, the
metrics layer scores them (fss.metrics.calibration), so fss.models needs no metrics."""

from __future__ import annotations

import re

import pytest
import torch

from fss.metrics.calibration import GrowingIoU
from fss.models import PrototypeBaseline


def _episodes():
    """Four batches whose query holds the support's bright square (class 0..2 and 5)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for i in range(4):
        query = torch.randn(2, 3, 48, 48, generator=generator)
        supports = torch.randn(2, 1, 3, 48, 48, generator=generator)
        query[:, :, 10:30, 5:25] += 2
        supports[:, 0, :, 12:30, 5:22] += 2
        masks = torch.zeros(2, 1, 48, 48)
        masks[:, :, 12:30, 5:22] = 1
        target = torch.zeros(2, 48, 48, dtype=torch.long)
        target[:, 10:30, 5:25] = 1
        target[:, :2] = 255
        batches.append({"query_img": query, "support_imgs": supports, "support_masks": masks,
                        "query_mask": target, "class_id": torch.tensor([i % 3, 5])})
    return batches


def test_calibration_picks_the_best_base_class_threshold(caplog):
    torch.manual_seed(0)
    model = PrototypeBaseline("resnet18", None).eval()
    caplog.set_level("INFO")
    assert model.calibrate(_episodes(), GrowingIoU, thresholds=41) == pytest.approx(0.9)
    assert model.threshold.item() == pytest.approx(0.9)
    # The best of the 41 candidates (the same number as before the score moved out of the
    # model).
    score = re.search(r"Prototype threshold 0\.900 \(base-class mIoU ([\d.]+)\)", caplog.text)
    assert float(score.group(1)) == pytest.approx(53.27, abs=0.02)
    with pytest.raises(ValueError, match="no calibration episodes"):
        model.calibrate([], GrowingIoU)
