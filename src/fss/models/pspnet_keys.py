"""Key layout of the official PSPNet base learner (chunbolang/BAM ``best.pth``, also HDMNet's
``initmodel/PSPNet/...``), as data for :mod:`fss.models.checkpoint_io`.

The file is ``{"epoch", "state_dict", "optimizer"}``; its state dict holds ``layer0..4``,
the same five modules a second time under ``encoder.0..4``, ``ppm`` and ``cls``. This
package's :class:`~fss.models.PSPNet` uses the official module names, so every prefix maps
onto itself. Imports nothing: HDMNet's table (``fss.models.hdmnet_keys``) builds on
these parts.
"""

from __future__ import annotations

KIND = "pspnet"
ORIGIN = "BAM PSPNet base learner (chunbolang/BAM)"

# The backbone stages and the pyramid pooling module, named alike in both.
PARTS = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.", "ppm.")

# (prefix in the official file, prefix in this package's model), first match wins.
PREFIXES = (*((part, part) for part in PARTS), ("cls.", "cls."))
# Dropped on purpose: none (BAM's encoder.* copies are DUPLICATES, checked equal).
UNUSED: tuple[str, ...] = ()
# BAM registers layer0..4 a second time as encoder.0..4: (copy, original).
DUPLICATES = tuple((f"encoder.{i}.", f"layer{i}.") for i in range(5))

# How the backbone shows in the keys (after ``module.``): a key only one backbone has, the
# stem width of this package's synthetic-benchmark trunk, the residual blocks of layer3.
BACKBONE_BY_KEY = {"layer4.0.weight": "vgg16"}  # VGG's layer4 is a plain conv stack
BACKBONE_BY_STEM = ("layer0.0.weight", {16: "resnet_small"})
BACKBONE_BY_BLOCKS = ("layer3.", {6: "resnet50", 23: "resnet101"})


def matches(keys) -> bool:
    """A PSPNet base learner: pyramid pooling and the final classifier ``cls.4``."""
    keys = set(keys)
    return "ppm.features.0.1.weight" in keys and "cls.4.weight" in keys


def facts(state) -> dict:
    """Base-learner outputs (background + base classes: 16 PASCAL, 61 COCO)."""
    return {"num_classes": int(state["cls.4.weight"].shape[0])}
