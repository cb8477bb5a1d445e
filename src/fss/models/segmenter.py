"""A semantic-segmentation network used to pretrain a backbone on a fold's BASE classes.

On the synthetic benchmark there are no ImageNet weights (no downloads), and frozen random
features are too weak for few-shot matching (see ../shared/spec/synth.md). So the default
pipeline first trains the backbone as an ordinary segmentation model on the base classes
of the fold — the analogue of the base-class PSPNet that HDMNet builds on — and then hands
its weights, in plain torchvision format, to HSNet / the prototype baseline, which freeze it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
VGGS = ("vgg16",)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class PyramidSegmenter(nn.Module):
    """torchvision backbone + a light FPN-style head over its stride-8/16/32 outputs.

    Args:
        backbone: ``resnet18|resnet34|resnet50|resnet101|vgg16``.
        num_classes: output classes, background included (base classes + 1).
        head_channels: width of the head.
        init_weights: what the trunk starts from: ``none`` (random) or ``imagenet``.
        head_levels: which pyramid levels (2 = stride 8, 3 = stride 16, 4 = stride 32) feed
            the head. Levels left out are trained only through the deeper ones, as in an
            ImageNet or PSPNet trunk, so their features stay generic rather than class-specific.

    ``backbone_state_dict()`` returns the trunk's weights in torchvision's own key
    layout, loadable with ``fss.models.build_backbone(name, weights=<file>)``.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 16,
        head_channels: int = 128,
        init_weights: str | None = None,
        head_levels: tuple[int, ...] = (2, 3, 4),
    ):
        super().__init__()
        if init_weights not in (None, "none", "imagenet"):
            raise ValueError(f"init_weights={init_weights!r}; accepted: none, imagenet")
        # torchvision downloads IMAGENET1K_V1 on first use (the official HSNet weights).
        tv_weights = "IMAGENET1K_V1" if init_weights == "imagenet" else None
        if backbone in RESNETS:
            self.body = getattr(torchvision.models, backbone)(weights=tv_weights)
            width = 512 if backbone in ("resnet18", "resnet34") else 2048
            channels = [width // 4, width // 2, width]
        elif backbone in VGGS:
            self.body = getattr(torchvision.models, backbone)(weights=tv_weights)
            channels = [512, 512, 512]
        else:
            raise ValueError(
                f"unknown backbone {backbone!r} for base-class pretraining; accepted: "
                f"{', '.join(RESNETS + VGGS)}"
            )
        head_levels = tuple(sorted(int(level) for level in head_levels))
        if not head_levels or any(level not in (2, 3, 4) for level in head_levels):
            raise ValueError(f"head_levels={list(head_levels)}; accepted: a non-empty subset of [2, 3, 4]")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.head_levels = head_levels
        self.laterals = nn.ModuleList(
            _conv_bn_relu(channels[level - 2], head_channels, 1) for level in head_levels
        )
        self.fuse = _conv_bn_relu(head_channels, head_channels, 3)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        # Channels-last weights and activations: oneDNN's native layout on CPU (and the
        # tensor-core layout on GPU). Measured on 2 CPU cores, resnet18 at 128², batch 16, with
        # the fused AdamW step: 0.321 -> 0.303 s per training step (interleaved A/B medians,
        # docs/performance.md). Same model; the state dict is saved contiguous.
        self.to(memory_format=torch.channels_last)

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) -> [stride 8, stride 16, stride 32] feature maps (post-ReLU)."""
        body = self.body
        if self.backbone_name in VGGS:
            features = body.features
            c3 = features[:23](images)  # conv4_3 + ReLU, stride 8
            c4 = features[23:30](c3)  # conv5_3 + ReLU, stride 16
            c5 = features[30](c4)  # pool5, stride 32
            return [c3, c4, c5]
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        c2 = body.layer2(body.layer1(x))
        c3 = body.layer3(c2)
        c4 = body.layer4(c3)
        return [c2, c3, c4]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> logits (B, num_classes, H, W)."""
        pyramid = self.pyramid(images.contiguous(memory_format=torch.channels_last))
        size = pyramid[0].shape[-2:]  # the head works at stride 8 whichever levels feed it
        levels = [pyramid[level - 2] for level in self.head_levels]
        fused = sum(
            F.interpolate(lateral(x), size=size, mode="bilinear", align_corners=False)
            for lateral, x in zip(self.laterals, levels, strict=True)
        )
        logits = self.classifier(self.fuse(fused))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in self.body.state_dict().items()
        }
