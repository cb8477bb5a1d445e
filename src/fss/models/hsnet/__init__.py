"""HSNet (Min et al., ICCV 2021): hypercorrelation squeeze networks.

``convert_official_state_dict`` is the one converter of :mod:`fss.models.checkpoint_io`
(the kind is read from the keys).
"""

from fss.models.checkpoint_io import convert_official_state_dict
from fss.models.hsnet.conv4d import CenterPivotConv4d
from fss.models.hsnet.correlation import hypercorrelation_pyramid, mask_features
from fss.models.hsnet.learner import HypercorrelationLearner
from fss.models.hsnet.model import HSNet, vote

__all__ = [
    "CenterPivotConv4d",
    "HSNet",
    "HypercorrelationLearner",
    "convert_official_state_dict",
    "hypercorrelation_pyramid",
    "mask_features",
    "vote",
]
