"""HDMNet (Peng et al., CVPR 2023) on a frozen PSPNet base learner.

``convert_official_state_dict`` is the one converter of :mod:`fss.models.checkpoint_io`
(the kind is read from the keys).
"""

from fss.models.checkpoint_io import convert_official_state_dict
from fss.models.hdmnet.distillation import correlation_distillation_loss, kl_divergence
from fss.models.hdmnet.ensemble import BaseLearnerEnsemble, gram_distance, gram_matrix
from fss.models.hdmnet.model import HDMNet, HierarchicalTransformer

__all__ = [
    "BaseLearnerEnsemble",
    "HDMNet",
    "HierarchicalTransformer",
    "convert_official_state_dict",
    "correlation_distillation_loss",
    "gram_distance",
    "gram_matrix",
    "kl_divergence",
]
