"""Whichever model an official checkpoint holds: :func:`load_official`.

Each model loads its own official files (``HSNet.from_official_checkpoint``,
``HDMNet.from_official_checkpoint``, ``PSPNet.from_official_checkpoint``) through the one
checkpoint layer, :mod:`fss.models.checkpoint_io` (reading, trust policy, key tables and the
converter). This module only dispatches on the kind read from the file; nothing below it
imports it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fss.models.checkpoint_io import OfficialSource, read_official
from fss.models.hdmnet.model import HDMNet
from fss.models.hsnet.model import HSNet
from fss.models.pspnet import PSPNet

MODELS = {"hsnet": HSNet, "hdmnet": HDMNet, "pspnet": PSPNet}


def load_official(source: OfficialSource, **kwargs: Any) -> nn.Module:
    """Whichever model the official file holds (HSNet, HDMNet or PSPNet), in eval mode;
    ``kwargs`` go to that model's ``from_official_checkpoint``."""
    checkpoint = read_official(source)
    return MODELS[checkpoint.layout.kind].from_official_checkpoint(checkpoint, **kwargs)
