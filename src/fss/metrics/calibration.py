"""Calibration of the prototype baseline's threshold on base-class episodes.

The model sweeps the thresholds (:meth:`fss.models.PrototypeBaseline.calibrate`); this
module gives it the episodes (from the datamodule's source) and the score (the mIoU of
:class:`~fss.metrics.FewShotIoU` over the classes the episodes show).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from fss.metrics.few_shot_iou import FewShotIoU


class GrowingIoU:
    """FewShotIoU over whatever classes show up (calibration sees the base classes)."""

    def __init__(self) -> None:
        self.meters: dict[int, FewShotIoU] = {}

    def update(self, preds, target, class_ids) -> None:
        for cls in class_ids.unique().tolist():
            meter = self.meters.setdefault(cls, FewShotIoU([cls]))
            keep = class_ids == cls
            meter.update(preds[keep], target[keep], class_ids[keep])

    def miou(self) -> float:
        return float(np.mean([m.compute()["miou"].item() for m in self.meters.values()]))


def calibrate_on_base_episodes(model, datamodule, episodes: int = 200,
                               thresholds: int = 41) -> float:
    """Calibrates ``model`` (anything with ``calibrate(batches, meter, thresholds)``) on
    ``episodes`` base-class (training-split) episodes of the fold.

    They come from their own seed, so they are not the training episodes of any run.
    """
    dataset = datamodule.source.episodic(
        "train", datamodule.fold, datamodule.shot, episodes, datamodule.seed + 1000
    )
    loader = DataLoader(dataset, batch_size=datamodule.test_batch_size,
                        num_workers=datamodule.num_workers)
    return model.calibrate(loader, GrowingIoU, thresholds=thresholds)
