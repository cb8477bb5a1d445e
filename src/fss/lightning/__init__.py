from fss.lightning.few_shot_module import FewShotModule
from fss.lightning.segmentation_module import SegmentationModule

__all__ = ["FewShotModule", "SegmentationModule"]
