"""Key layout of the official HSNet checkpoint (juhongm999/hsnet ``best_model.pt``), as data
for :mod:`fss.models.checkpoint_io`.

The file is the bare ``state_dict`` of ``nn.DataParallel(HypercorrSqueezeNetwork)``:
``module.backbone.*`` (the whole torchvision vgg16 / resnet50 / resnet101, classifier head
included) and ``module.hpn_learner.*``. Imports nothing.
"""

from __future__ import annotations

KIND = "hsnet"
ORIGIN = "HSNet (juhongm999/hsnet)"

# (prefix in the official file, prefix in this package's HSNet), first match wins.
PREFIXES = (
    ("hpn_learner.encoder_layer4to3.", "learner.mix_l43."),
    ("hpn_learner.encoder_layer3to2.", "learner.mix_l32."),
    ("hpn_learner.encoder_layer4.", "learner.squeeze_l4."),
    ("hpn_learner.encoder_layer3.", "learner.squeeze_l3."),
    ("hpn_learner.encoder_layer2.", "learner.squeeze_l2."),
    ("hpn_learner.decoder1.", "learner.decoder1."),
    ("hpn_learner.decoder2.", "learner.decoder2."),
    ("backbone.", "backbone."),
)
# The torchvision classifier head inside the official backbone: never used.
UNUSED = ("backbone.fc.", "backbone.classifier.")
DUPLICATES: tuple[tuple[str, str], ...] = ()

# How the backbone shows in the keys (after ``module.``).
BACKBONE_BY_KEY = {"backbone.features.0.weight": "vgg16"}
BACKBONE_BY_STEM = None
BACKBONE_BY_BLOCKS = ("backbone.layer3.", {2: "resnet18", 6: "resnet50", 23: "resnet101"})


def matches(keys) -> bool:
    """An HSNet file: the hypercorrelation learner ``hpn_learner``."""
    return any(key.startswith("hpn_learner.") for key in keys)


def facts(state) -> dict:
    """Nothing beyond the backbone."""
    return {}
