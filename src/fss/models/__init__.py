"""Few-shot models (plain nn.Modules; nothing here knows of Lightning, Hydra or datasets).

``load_official`` builds whichever model an official checkpoint holds;
``convert_official_state_dict`` is the one converter of official keys
(:mod:`fss.models.checkpoint_io`).
"""

from fss.models.backbones import FeatureBackbone, build_backbone
from fss.models.checkpoint_io import (
    CheckpointMismatchError,
    convert_official_state_dict,
    read_checkpoint,
    to_official_state_dict,
)
from fss.models.hdmnet import HDMNet
from fss.models.hsnet import HSNet
from fss.models.official import load_official
from fss.models.proto import AllForeground, PrototypeBaseline
from fss.models.psp_backbones import PSP_BACKBONES, build_psp_backbone
from fss.models.pspnet import PSPNet, load_pspnet_checkpoint

__all__ = [
    "PSP_BACKBONES",
    "AllForeground",
    "CheckpointMismatchError",
    "FeatureBackbone",
    "HDMNet",
    "HSNet",
    "PSPNet",
    "PrototypeBaseline",
    "build_backbone",
    "build_psp_backbone",
    "convert_official_state_dict",
    "load_official",
    "load_pspnet_checkpoint",
    "read_checkpoint",
    "to_official_state_dict",
]
