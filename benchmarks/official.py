"""The official HSNet code (juhongm999/hsnet) as a timing baseline, loaded from a checkout.

Nothing of it is copied here: ``load_official_hsnet(path, backbone)`` imports
``model/hsnet.py`` from a checkout the user points to (kept outside this repository) with
two patches that change no computation: torchvision's ``pretrained=True`` backbones are
built with random weights (no download; speed does not depend on the values), and the
model stays on the device it is given (the official code has no ``.cuda()`` in the model).

The official HDMNet (Pbihao/HDMNet) needs mmcv 1.x / mmseg 0.x built with their CUDA ops;
they do not build on this project's CPU machines, so it has no loader here.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import torch
import torchvision

_BACKBONE_BUILDERS = {"resnet50": "resnet", "resnet101": "resnet", "vgg16": "vgg"}


@contextlib.contextmanager
def _random_torchvision_backbones():
    """``resnet.resnet50(pretrained=True)`` & co. return randomly initialised networks."""
    saved = []
    for name, module_name in _BACKBONE_BUILDERS.items():
        module = getattr(torchvision.models, module_name)
        original = getattr(module, name)
        saved.append((module, name, original))
        setattr(module, name, lambda *args, _build=original, **kwargs: _build(weights=None))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class OfficialHSNet:
    """An official ``HypercorrSqueezeNetwork`` in eval mode with our episode interface."""

    def __init__(self, path: str | Path, backbone: str, device: torch.device) -> None:
        path = Path(path).expanduser().resolve()
        if not (path / "model" / "hsnet.py").is_file():
            raise SystemExit(f"--compare {path}: no model/hsnet.py there; point it at a checkout "
                             "of github.com/juhongm999/hsnet (outside this repository)")
        if backbone not in _BACKBONE_BUILDERS:
            raise SystemExit(f"the official HSNet has no {backbone!r} backbone; accepted: "
                             f"{', '.join(_BACKBONE_BUILDERS)}")
        sys.path.insert(0, str(path))
        try:
            with _random_torchvision_backbones():
                module = importlib.import_module("model.hsnet")
                self.net = module.HypercorrSqueezeNetwork(backbone, False)
        finally:
            sys.path.remove(str(path))
        self.net.to(device).eval()

    def predict(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor):
        """Official K-shot prediction (``predict_mask_nshot``): (B, H, W)."""
        batch = {"query_img": query, "support_imgs": supports, "support_masks": masks}
        return self.net.predict_mask_nshot(batch, supports.shape[1])

    def logits(self, query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor):
        """1-shot logits (B, 2, H, W) for one support (B, 3, H, W) and its mask (B, H, W)."""
        return self.net(query, support, mask)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()
