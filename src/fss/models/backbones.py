"""Frozen ImageNet backbones that return the intermediate feature maps HSNet correlates.

``build_backbone(name, weights)`` returns a :class:`FeatureBackbone` whose forward gives the
list of tapped feature maps, shallow -> deep, exactly as the official HSNet taps them:

- ``resnet50`` / ``resnet101``: every bottleneck of layer2-4, after the residual add and
  BEFORE the block's final ReLU (4 + 6 + 3 = 13 / 4 + 23 + 3 = 30 maps).
- ``resnet18`` (not in the paper; the fast synthetic default): every BasicBlock of layer2-4,
  same rule (2 + 2 + 2 maps).
- ``vgg16``: ``features[17, 19, 21]`` (conv4_1..3), ``features[24, 26, 28]`` (conv5_1..3),
  all pre-ReLU, and ``features[30]`` (pool5, which is post-ReLU by construction).

The modules are torchvision's, registered under torchvision's names, so the backbone's
``state_dict`` keys are torchvision's keys without the classifier head (``layer1.0.conv1.weight``,
``features.0.weight``). Only the forward is ours: it records the pre-activation tensors
instead of cloning them before torchvision's in-place ReLUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fss.models.checkpoint_io import read_checkpoint
from fss.utils.errors import ConfigError

BACKBONE_NAMES = ("vgg16", "resnet18", "resnet50", "resnet101")

# Torchvision classifier heads: present in torchvision files, absent from the backbone.
_HEAD_PREFIXES = ("fc.", "classifier.")

# vgg16 taps (indices into ``features``) and their pyramid level.
_VGG16_TAPS = {17: 2, 19: 2, 21: 2, 24: 3, 26: 3, 28: 3, 30: 4}

# The torchvision weights the official code used (``pretrained=True`` = IMAGENET1K_V1).
_IMAGENET_WEIGHTS = {
    "vgg16": "VGG16_Weights",
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}

WeightsArg = str | Path | None


class FeatureBackbone(nn.Module):
    """Base class: a backbone whose forward returns the list of tapped feature maps.

    Attributes:
        name: backbone name (one of ``BACKBONE_NAMES``).
        tap_groups: pyramid level (2, 3 or 4) of each tap, in depth order.
        tap_channels: channels of each tap, in depth order.
        frozen: if True, parameters have ``requires_grad=False`` and the module stays in
            eval mode whatever ``train()`` is asked (BatchNorm statistics never move).
    """

    name: str
    tap_groups: list[int]
    tap_channels: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.frozen = True

    @property
    def levels(self) -> list[int]:
        """Pyramid levels present, shallow -> deep (``[2, 3, 4]``)."""
        return sorted(set(self.tap_groups))

    @property
    def level_channels(self) -> list[int]:
        """Channels of :meth:`level_outputs`, one per level, shallow -> deep."""
        return [self._last_tap_channels(level) for level in self.levels]

    def _last_tap_channels(self, level: int) -> int:
        last = max(i for i, g in enumerate(self.tap_groups) if g == level)
        return self.tap_channels[last]

    def level_outputs(self, taps: list[Tensor]) -> list[Tensor]:
        """Post-ReLU output of each pyramid level, shallow -> deep, from :meth:`forward`'s taps.

        ReLU of the last tap of each level. For ResNets these are exactly the outputs of
        layer2, layer3, layer4. For vgg16 they are relu(conv4_3), relu(conv5_3) (the inputs of
        pool4 / pool5) and pool5 itself (already non-negative, so the ReLU is a no-op).

        Args:
            taps: the list returned by :meth:`forward`.
        Returns:
            ``[level2 (B, C2, H/8, W/8), level3, level4]``.
        """
        if len(taps) != len(self.tap_groups):
            raise ValueError(
                f"expected the {len(self.tap_groups)} taps of {self.name}, got {len(taps)}"
            )
        outputs = []
        for level in self.levels:
            last = max(i for i, g in enumerate(self.tap_groups) if g == level)
            outputs.append(F.relu(taps[last]))
        return outputs

    def freeze(self) -> None:
        """No gradients, eval mode forever (the HSNet recipe)."""
        self.frozen = True
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureBackbone:
        # A frozen backbone keeps BatchNorm in inference mode even when a parent module is
        # put in training mode: HSNet trains with the backbone's ImageNet statistics.
        return super().train(False if self.frozen else mode)


class ResNetBackbone(FeatureBackbone):
    """Torchvision ResNet; taps every block of layer2-4 before its final ReLU."""

    def __init__(self, name: str) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        # Same attribute names as torchvision so state-dict keys match torchvision's.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4
        self.name = name
        self.tap_groups = []
        self.tap_channels = []
        for level, layer in ((2, self.layer2), (3, self.layer3), (4, self.layer4)):
            for block in layer:
                self.tap_groups.append(level)
                self.tap_channels.append(_block_out_channels(block))

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> taps [(B, C_i, h_i, w_i)], shallow -> deep (strides 8, 16, 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer1(x)
        taps: list[Tensor] = []
        for layer in (self.layer2, self.layer3, self.layer4):
            for block in layer:
                tap = _block_pre_activation(block, x)
                taps.append(tap)
                # Not in place: the tap must keep its negative values.
                x = F.relu(tap)
        return taps


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, Bottleneck):
        return block.bn3.num_features
    if isinstance(block, BasicBlock):
        return block.bn2.num_features
    raise TypeError(f"unsupported ResNet block {type(block).__name__}")


def _block_pre_activation(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision residual block's output before its final ReLU (body + identity)."""
    identity = x if block.downsample is None else block.downsample(x)
    # block.relu is in place, which is safe here: it only overwrites fresh BN outputs.
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"unsupported ResNet block {type(block).__name__}")
    return out + identity


class VGGBackbone(FeatureBackbone):
    """Torchvision VGG16 (no BN) convolutional trunk; taps conv4_x, conv5_x pre-ReLU and pool5."""

    def __init__(self) -> None:
        super().__init__()
        # Only the trunk: torchvision's vgg16() would also allocate the 124M-parameter
        # classifier, which HSNet never uses.
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.name = "vgg16"
        self.tap_groups = list(_VGG16_TAPS.values())
        self.tap_channels = [512] * len(_VGG16_TAPS)
        self._last_index = max(_VGG16_TAPS)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> 7 taps: 3 × (B,512,H/8,W/8), 3 × (B,512,H/16,W/16), (B,512,H/32,W/32)."""
        x = images
        taps: list[Tensor] = []
        for index, module in enumerate(self.features):
            if index > self._last_index:
                break
            # torchvision's ReLUs are in place and would overwrite the pre-ReLU taps.
            x = F.relu(x) if isinstance(module, nn.ReLU) else module(x)
            if index in _VGG16_TAPS:
                taps.append(x)
        return taps


def build_backbone(name: str, weights: WeightsArg = None, frozen: bool = True) -> FeatureBackbone:
    """Build a feature backbone.

    Args:
        name: one of ``vgg16``, ``resnet18``, ``resnet50``, ``resnet101``.
        weights: ``None`` / ``"none"`` (random init), ``"imagenet"`` (torchvision's
            IMAGENET1K_V1 download, as the official ``pretrained=True``), or a path to a
            torchvision-format state dict. A checkpoint dict with a ``state_dict`` entry and
            keys under a prefix (Lightning ``model.backbone.``, DataParallel ``module.``) works
            too: the prefix in front of the torchvision keys is stripped.
        frozen: no gradients and always eval mode (HSNet). ``False`` gives a normal trainable
            module (e.g. for base-class pretraining).
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONE_NAMES)}")
    backbone: FeatureBackbone = VGGBackbone() if name == "vgg16" else ResNetBackbone(name)
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    if weights is not None:
        if isinstance(weights, str) and weights.lower() == "imagenet":
            state_dict = _imagenet_state_dict(name)
            source = f"torchvision {name} IMAGENET1K_V1"
        else:
            state_dict = _read_state_dict(weights)
            source = str(weights)
        load_torchvision_state_dict(backbone, state_dict, source)
    if frozen:
        backbone.freeze()
    else:
        backbone.frozen = False
    return backbone


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    enum = getattr(torchvision.models, _IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=True)
    except Exception as error:  # network or cache problems: say what to do instead
        raise ConfigError(
            f"backbone.weights=imagenet: could not download the ImageNet weights of {name} from "
            f"{enum.url} ({type(error).__name__}: {error}); download that file elsewhere and "
            "pass its path as backbone.weights=<file>"
        ) from error


def _read_state_dict(path: str | Path) -> Mapping[str, object]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {str(path)!r} do not exist; accepted: None/'none' (random), "
            "'imagenet' (torchvision download) or the path of a torchvision-format state dict "
            "(or a checkpoint with a 'state_dict')"
        )
    # Lightning checkpoints of other projects may hold hyper-parameters as OmegaConf
    # objects: allowed by the one trust policy (fss.models.checkpoint_io.TRUST_POLICY).
    loaded = read_checkpoint(path, f"backbone weights {str(path)!r}")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"backbone weights {str(path)!r} hold a {type(loaded).__name__}, expected a state dict"
        )
    return loaded


def _strip_prefix(state_dict: Mapping[str, object], expected: Iterable[str]) -> dict[str, object]:
    """Keep the keys under the prefix that sits in front of the expected (torchvision) keys.

    Candidate prefixes are whatever precedes the deepest expected weight (a key specific
    enough not to occur elsewhere, e.g. ``layer4.2.bn3.weight``); the candidate under which
    most expected keys are found wins, so ``model.backbone.`` is picked in a Lightning
    checkpoint that also holds a head or a learner.
    """
    expected = set(expected)
    anchor = max((key for key in expected if key.endswith(".weight")), key=_depth_order)
    candidates = {key[: -len(anchor)] for key in state_dict if key.endswith(anchor)}
    candidates = [p for p in candidates if p == "" or p.endswith(".")]
    if not candidates:
        return dict(state_dict)

    def matches(prefix: str) -> int:
        return sum(key.startswith(prefix) and key[len(prefix) :] in expected for key in state_dict)

    prefix = max(sorted(candidates, key=len), key=matches)
    return {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }


def _depth_order(key: str) -> tuple:
    """Sort key that puts ``layer4.2...`` after ``layer1.0...`` and ``features.28`` after ``.5``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


def load_torchvision_state_dict(
    backbone: FeatureBackbone, state_dict: Mapping[str, object], source: str = "state dict"
) -> None:
    """Load a torchvision-format state dict into ``backbone``; one-line error on any mismatch.

    Classifier-head keys (``fc.*``, ``classifier.*``) are ignored; a missing
    ``num_batches_tracked`` (older checkpoints) is tolerated.
    """
    own = backbone.state_dict()
    found = _strip_prefix(state_dict, own)
    found = {k: v for k, v in found.items() if not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in found.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    not_tensors = [k for k, v in found.items() if k in own and not isinstance(v, Tensor)]
    if missing or unexpected or shapes or not_tensors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if not_tensors:
            parts.append(
                f"{len(not_tensors)} non-tensor values (e.g. {', '.join(not_tensors[:3])})"
            )
        raise ValueError(
            f"{source} does not match the {backbone.name} architecture (torchvision keys like "
            f"{next(iter(own))!r}): " + "; ".join(parts)
        )
    backbone.load_state_dict(found, strict=False)
