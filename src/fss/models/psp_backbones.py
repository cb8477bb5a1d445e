"""Backbones of the PSPNet base learner used by HDMNet (and BAM / PFENet before it).

Three families, each returned as five stages ``layer0 .. layer4`` (``nn.Sequential`` or
``nn.Module``) plus their output channels:

- ``resnet50`` / ``resnet101``: ResNet with the *deep stem* of the PSPNet code base
  (3×3 convs 3→64 stride 2, 64→64, 64→128, then a stride-2 max-pool), the stride on each
  bottleneck's 3×3 conv, layer3 dilated by 2 and layer4 by 4 (every block, the first one
  included), so the output stride is 8. For a 473² input: layer0 128ch 119², layer1 256ch
  119², layer2 512ch 60², layer3 1024ch 60², layer4 2048ch 60².
- ``vgg16``: VGG16-bn ``features`` sliced as [0:7], [7:14], [14:24], [24:34], [34:43] with
  ``ceil_mode`` max-pools (473² → 237, 119, 60, 30, 30); layer2 has 256ch, layer3/4 512ch.
- ``resnet_small``: the same deep-stem dilated ResNet with one bottleneck per stage and
  a quarter of the widths (stem 16/16/32, planes 16/32/64/128 → 64/128/256/512 channels).
  It exists for the synthetic CPU benchmark: a PSPNet training step (SGD, batch 8, 128²,
  1 CPU thread) takes ≈0.37 s against ≈6 s for ``resnet50``; 2.0 M parameters in all.

ImageNet weights are read from local files only (no download):
- deep-stem ResNets: the ``resnet50_v2.pth`` / ``resnet101_v2.pth`` layout of the PSPNet
  code base, keys ``conv1 bn1 conv2 bn2 conv3 bn3 layer1.0.conv1 ... layer4.2.bn3
  ... downsample.0/1`` (+ ``fc.*``, ignored);
- VGG16-bn: the torchvision layout (``features.N.*``, ``classifier.*`` ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fss.models.checkpoint_io import read_checkpoint

PSP_BACKBONES = ("resnet50", "resnet101", "vgg16", "resnet_small")

# Source layout of the ImageNet weight files: keys that the file may hold but that the
# segmentation backbone does not use.
_IGNORED_PREFIXES = ("fc.", "classifier.")


@dataclass(frozen=True)
class DeepStemConfig:
    """Depth and widths of a deep-stem dilated ResNet."""

    blocks: tuple[int, int, int, int]
    stem_widths: tuple[int, int, int] = (64, 64, 128)
    planes: tuple[int, int, int, int] = (64, 128, 256, 512)
    expansion: int = 4


DEEP_STEM_CONFIGS = {
    "resnet50": DeepStemConfig(blocks=(3, 4, 6, 3)),
    "resnet101": DeepStemConfig(blocks=(3, 4, 23, 3)),
    "resnet_small": DeepStemConfig(
        blocks=(1, 1, 1, 1), stem_widths=(16, 16, 32), planes=(16, 32, 64, 128)
    ),
}


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride (and the dilation) on the 3×3 conv.

    Attribute names follow torchvision / the PSPNet code base so that ImageNet and
    base-learner checkpoints load without renaming.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        out_channels = planes * expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes,
            planes,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DeepStemResNet(nn.Module):
    """Deep-stem ResNet, dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4).

    Holds the modules under the names of the ImageNet file (``conv1 .. bn3``,
    ``layer1 .. layer4``); ``stages()`` regroups them as ``layer0 .. layer4``.
    """

    def __init__(self, config: DeepStemConfig) -> None:
        super().__init__()
        stem1, stem2, stem3 = config.stem_widths
        self.conv1 = nn.Conv2d(3, stem1, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem1, stem2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(stem2, stem3, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem3)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        strides = (1, 2, 1, 1)
        dilations = (1, 1, 2, 4)
        in_channels = stem3
        self.channels = [stem3]
        for index, (num_blocks, planes, stride, dilation) in enumerate(
            zip(config.blocks, config.planes, strides, dilations, strict=True)
        ):
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        planes,
                        stride=stride if block_index == 0 else 1,
                        dilation=dilation,
                        expansion=config.expansion,
                    )
                )
                in_channels = planes * config.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.channels.append(in_channels)
        _init_conv_bn(self)

    def stages(self) -> list[nn.Module]:
        """``layer0 .. layer4``; layer0 indices match the PSPNet checkpoints
        (``layer0.0`` conv1, ``.1`` bn1, ``.3`` conv2, ``.4`` bn2, ``.6`` conv3, ``.7`` bn3)."""
        layer0 = nn.Sequential(
            self.conv1,
            self.bn1,
            self.relu1,
            self.conv2,
            self.bn2,
            self.relu2,
            self.conv3,
            self.bn3,
            self.relu3,
            self.maxpool,
        )
        return [layer0, self.layer1, self.layer2, self.layer3, self.layer4]


def _init_conv_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# VGG16-bn ``features`` configuration and the PSPNet slicing into five stages.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))


def vgg16_bn_features() -> nn.Sequential:
    """VGG16-bn ``features`` up to conv5_3's ReLU (indices 0..42, the last max-pool
    dropped), with ``ceil_mode`` max-pools as in the PSPNet code base."""
    layers: list[nn.Module] = []
    in_channels = 3
    for value in _VGG16_CFG:
        if value == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [
                nn.Conv2d(in_channels, value, kernel_size=3, padding=1),
                nn.BatchNorm2d(value),
                nn.ReLU(inplace=True),
            ]
            in_channels = value
    features = nn.Sequential(*layers)
    _init_conv_bn(features)
    return features


class VGG16Features(nn.Module):
    """Container with the torchvision key layout (``features.N``) for weight loading."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_bn_features()
        self.channels = [64, 128, 256, 512, 512]

    def stages(self) -> list[nn.Module]:
        return [nn.Sequential(*self.features[start:stop]) for start, stop in _VGG16_SLICES]


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weight file not found: {path}")
    state = read_checkpoint(path, f"{what} weight file {path}")
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{what} weight file {path} holds a {type(state).__name__}, not a state dict"
        )
    return {
        key.removeprefix("module."): value
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def load_matching_state_dict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module``, every parameter and buffer required.

    Raises a ``ValueError`` naming the missing, unexpected and mis-shaped keys (at most
    10 of each) instead of PyTorch's generic message. ``num_batches_tracked`` may be
    absent (old files)."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


def build_psp_backbone(
    name: str, weights: str | Path | None = None
) -> tuple[list[nn.Module], list[int]]:
    """Build ``layer0 .. layer4`` of a PSPNet backbone and their output channels.

    ``weights``: ``None`` / ``"none"`` for random init, or the path of a local ImageNet
    file (``resnet50_v2.pth`` layout for the deep-stem ResNets, torchvision layout for
    VGG16-bn). ``resnet_small`` has no pretrained weights.
    """
    if name in DEEP_STEM_CONFIGS:
        net: DeepStemResNet | VGG16Features = DeepStemResNet(DEEP_STEM_CONFIGS[name])
    elif name == "vgg16":
        net = VGG16Features()
    else:
        raise ValueError(f"unknown PSPNet backbone {name!r}; accepted: {', '.join(PSP_BACKBONES)}")
    if weights is not None and str(weights).lower() != "none":
        if str(weights).lower() == "imagenet":
            raise ValueError(
                "PSPNet backbones load ImageNet weights from a local file only: pass the path "
                "of resnet50_v2.pth / resnet101_v2.pth (deep stem) or a torchvision vgg16_bn file"
            )
        state = read_state_dict(weights, f"{name} ImageNet")
        load_matching_state_dict(
            net, state, f"ImageNet weight file {weights}", ignored_prefixes=_IGNORED_PREFIXES
        )
    return net.stages(), list(net.channels)
