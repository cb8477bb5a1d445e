"""Few-shot models (plain nn.Modules; nothing here knows of Lightning or datasets)."""

from fss.models.backbones import FeatureBackbone, build_backbone
from fss.models.hdmnet import HDMNet, convert_official_state_dict
from fss.models.hsnet import HSNet
from fss.models.proto import AllForeground, PrototypeBaseline
from fss.models.psp_backbones import PSP_BACKBONES, build_psp_backbone
from fss.models.pspnet import PSPNet, load_pspnet_checkpoint

__all__ = [
    "PSP_BACKBONES",
    "AllForeground",
    "FeatureBackbone",
    "HDMNet",
    "HSNet",
    "PSPNet",
    "PrototypeBaseline",
    "build_backbone",
    "build_psp_backbone",
    "convert_official_state_dict",
    "load_pspnet_checkpoint",
]
