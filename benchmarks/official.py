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

    def training_step(self, lr: float = 1e-3):
        """One official training step as its ``train.py`` takes it (1-shot logits, the
        official ``compute_objective``, Adam over every parameter, ``train_mode``: the
        learner in train mode, the backbone in eval and without gradients)."""
        self.net.train_mode()
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

        def step(query, support, mask, query_mask):
            loss = self.net.compute_objective(self.net(query, support, mask), query_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step


# ------------------------------------------------------------------------------- HDMNet
# The official HDMNet (Pbihao/HDMNet) imports mmcv 1.x and mmseg 0.x. It uses none of
# mmcv's compiled ops, so it runs on the CPU in a venv built as docs/performance.md says
# (mmcv installed with MMCV_WITH_OPS=0) once ``mmcv.ops`` is replaced by an empty module.
_HDMNET_ARGS = {
    "data_set": "pascal", "layers": 50, "vgg": False, "shot": 1, "ignore_label": 255,
    "zoom_factor": 8, "low_fea": "layer2", "kshot_trans_dim": 2, "classes": 2,
}


def _stub_mmcv_ops() -> None:
    import types

    if "mmcv.ops" not in sys.modules:
        stub = types.ModuleType("mmcv.ops")
        stub.__getattr__ = lambda name: None  # mmseg imports names it never calls here
        sys.modules["mmcv.ops"] = stub


class OfficialHDMNet:
    """An official HDMNet ``OneModel`` in eval mode, with the weights of one of our models.

    ``ours`` is an :class:`fss.models.HDMNet` (resnet50 or vgg16, any ``shot``); its
    state dict is written in the official layout (PSPNet part as ``pre_weight``, the rest
    loaded into ``OneModel``), so both compute on the same weights.
    """

    def __init__(self, path: str | Path, ours: torch.nn.Module, device: torch.device) -> None:
        import argparse
        import tempfile

        from fss.models.checkpoint_io import to_official_state_dict

        path = Path(path).expanduser().resolve()
        if not (path / "model" / "HDMNet.py").is_file():
            raise SystemExit(f"--compare {path}: no model/HDMNet.py there; point it at a checkout "
                             "of github.com/Pbihao/HDMNet (outside this repository)")
        _stub_mmcv_ops()
        official_state = to_official_state_dict(ours.state_dict(), "hdmnet")
        pspnet_state = {}
        for key, value in official_state.items():
            for part in ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.", "ppm.", "cls.0.",
                         "cls.1."):
                if key.startswith(part):
                    pspnet_state[key] = value
            if key.startswith("base_learnear.2."):
                pspnet_state["cls.4." + key[len("base_learnear.2."):]] = value
        args = argparse.Namespace(**{**_HDMNET_ARGS, "shot": ours.shot,
                                     "vgg": ours.pspnet.backbone_name == "vgg16"})
        sys.path.insert(0, str(path))
        try:
            with tempfile.TemporaryDirectory() as tmp, _random_torchvision_backbones():
                resnet = importlib.import_module("model.resnet")
                vgg = importlib.import_module("model.vgg")
                saved = (resnet.resnet50, vgg.vgg16_bn)
                resnet.resnet50 = lambda pretrained=True, **kw: saved[0](pretrained=False, **kw)
                vgg.vgg16_bn = lambda pretrained=True, **kw: saved[1](pretrained=False, **kw)
                try:
                    pspnet = importlib.import_module("model.PSPNet").OneModel(args)
                    full = pspnet.state_dict()
                    full.update(pspnet_state)
                    args.pre_weight = str(Path(tmp) / "pspnet.pth")
                    torch.save({"state_dict": full}, args.pre_weight)
                    module = importlib.import_module("model.HDMNet")
                    self.net = module.OneModel(args, cls_type="Base")
                finally:
                    resnet.resnet50, vgg.vgg16_bn = saved
        finally:
            sys.path.remove(str(path))
        missing, unexpected = self.net.load_state_dict(official_state, strict=False)
        if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
            raise SystemExit(f"official HDMNet weights do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.net.to(device).eval()

    def logits(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor):
        """Final ensemble scores (B, 2, H, W), as the official ``test.py`` takes them."""
        final, _meta, _base = self.net(query, s_x=supports, s_y=masks.float())
        return final

    def predict(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor):
        return self.logits(query, supports, masks).argmax(1)
