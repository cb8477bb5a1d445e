from fss.metrics.few_shot_iou import FewShotIoU

__all__ = ["FewShotIoU"]
