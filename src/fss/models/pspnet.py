"""PSPNet, the base-class learner of BAM / HDMNet.

``layer0 .. layer4`` (see ``fss.models.psp_backbones``) → pyramid pooling (bins 1, 2, 3, 6,
each adaptive average pool → 1×1 conv in→in/4 without bias → BN → ReLU, upsampled with
``align_corners=True`` and concatenated to the input: 2·in channels) → ``cls`` = 3×3 conv
→ 512 (no bias) → BN → ReLU → Dropout2d(0.1) → 1×1 conv → ``num_classes`` (16 for
PASCAL-5i: background + 15 base classes; 61 for COCO-20i). Logits are upsampled
bilinearly (``align_corners=True``) to the input size.

HDMNet reuses it frozen and split: ``cls[0:2]`` (conv + BN, before the ReLU) gives the
512-ch ``feat5`` used for the prior, ``cls[2:5]`` is the base learner applied to it.

Input size. With output stride 8 and ``align_corners=True`` upsampling, feature pixel i
sits exactly on input pixel 8i only when ``(H - 1) % 8 == 0`` (473 → 60², 633 → 80²), the
sizes of the official code. ``strict_size=True`` (default) enforces that rule;
``strict_size=False`` accepts any size ≥ 17 (e.g. 128² for the synthetic benchmark; the
logits are then off by a fraction of a pixel).

Module names follow the official checkpoints (``layer0.0`` …, ``ppm.features.i.1``,
``cls.0`` …, ``cls.4``): ``load_pspnet_checkpoint`` reads an official ``best.pth``
(``{"state_dict": ...}``, keys maybe prefixed ``module.``, duplicated ``encoder.*`` keys
dropped) or a plain state dict of this class.

Base-class training as in BAM's ``train_base.py``: SGD momentum 0.9, weight decay 1e-4,
lr 2.5e-4 (poly 0.9) with the head (PPM + cls) at 10× (``trainable_parameters``), BN
layers in training mode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fss.models import pspnet_keys
from fss.models.checkpoint_io import load_official_state_dict, read_official
from fss.models.psp_backbones import (
    PSP_BACKBONES,
    build_psp_backbone,
    load_matching_state_dict,
    read_state_dict,
)
from fss.ops.pyramid import conv2d_over_pyramid, upsampled

log = logging.getLogger(__name__)

# BAM's second registration of layer0..4 (encoder.0..4), from the official key table.
_BAM_COPIES = tuple(copy for copy, _ in pspnet_keys.DUPLICATES)

PPM_BINS = (1, 2, 3, 6)
MIN_INPUT_SIZE = 17
IGNORE_INDEX = 255
# Number of base-learner outputs (background + base classes) of the official datasets.
NUM_CLASSES = {"pascal": 16, "coco": 61}


def aligned_sizes(size: int, stride: int = 8) -> tuple[int, int]:
    """The sizes next to ``size`` (below and above) with ``(size - 1) % stride == 0``."""
    lower = size - (size - 1) % stride
    return lower, lower + stride


def check_input_size(height: int, width: int, strict: bool = True, stride: int = 8) -> None:
    """Raise a ``ValueError`` if ``(height, width)`` is not a usable PSPNet input size."""
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(
            f"input {height}x{width} is too small: PSPNet needs at least {MIN_INPUT_SIZE}"
        )
    if strict:
        bad = list(dict.fromkeys(size for size in (height, width) if (size - 1) % stride))
        if bad:
            hints = ", ".join(
                "{} → {} or {}".format(size, *aligned_sizes(size, stride)) for size in bad
            )
            raise ValueError(
                f"input {height}x{width}: PSPNet sizes must satisfy (size - 1) % {stride} == 0 "
                f"(e.g. 473, 633) so that features align with pixels ({hints}); "
                "pass strict_size=False to accept any size"
            )


class PyramidPooling(nn.Module):
    """PPM: ``features[i]`` = AdaptiveAvgPool(bin) → 1×1 conv → BN → ReLU."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = PPM_BINS) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(size),
                nn.Conv2d(in_channels, reduced, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduced),
                nn.ReLU(inplace=True),
            )
            for size in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def bins(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The bins' maps at their own sizes (1², 2², 3², 6²)."""
        return [branch(x) for branch in self.features]

    def pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The bins' maps, each upsampled (bilinear, align_corners=True) to x's size."""
        return upsampled(self.bins(x), x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, *self.pooled(x)], dim=1)


@dataclass
class PSPFeatures:
    """Intermediate maps of one PSPNet pass (B = batch; sizes for a 473² ResNet input).

    layer0 (B,128,119,119), layer1 (B,256,119,119), layer2 (B,512,60,60),
    layer3 (B,1024,60,60), layer4 (B,2048,60,60), feat5 = cls[0:2] output before its ReLU
    (B,512,60,60).
    """

    layer0: torch.Tensor
    layer1: torch.Tensor
    layer2: torch.Tensor
    layer3: torch.Tensor
    layer4: torch.Tensor
    feat5: torch.Tensor


class PSPNet(nn.Module):
    """PSPNet semantic segmenter over ``num_classes`` (background included).

    Args:
        backbone: ``resnet50`` | ``resnet101`` | ``vgg16`` | ``resnet_small``.
        num_classes: outputs of the classifier (16 PASCAL, 61 COCO).
        backbone_weights: ``None`` (random) or a local ImageNet file (see
            ``fss.models.psp_backbones``).
        head_channels: width of the ``cls`` 3×3 conv (512 in the official code; the
            ``resnet_small`` benchmark variant uses 128).
        strict_size: enforce ``(H - 1) % 8 == 0`` (see the module docstring).
        backbone_lr_scale, head_lr_scale: learning-rate multipliers of the two optimizer
            groups (``trainable_parameters``). BAM: 1 and 10 on PASCAL (``index_split: 0``),
            10 and 10 on COCO (``index_split: -1``).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = NUM_CLASSES["pascal"],
        backbone_weights: str | Path | None = None,
        head_channels: int | None = None,
        dropout: float = 0.1,
        strict_size: bool = True,
        backbone_lr_scale: float = 1.0,
        head_lr_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if backbone not in PSP_BACKBONES:
            raise ValueError(
                f"unknown PSPNet backbone {backbone!r}; accepted: {', '.join(PSP_BACKBONES)}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if head_channels is None:
            head_channels = 128 if backbone == "resnet_small" else 512
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.strict_size = strict_size
        self.lr_scales = {"backbone": float(backbone_lr_scale), "head": float(head_lr_scale)}
        stages, channels = build_psp_backbone(backbone, backbone_weights)
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.stage_channels = channels  # outputs of layer0 .. layer4
        self.ppm = PyramidPooling(channels[4])
        self.cls = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, head_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels),
            # Not in place: HDMNet keeps the pre-ReLU feat5 after running the base learner.
            nn.ReLU(),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(head_channels, num_classes, kernel_size=1),
        )
        self.feat5_channels = head_channels

    # ----------------------------------------------------------------------------- parts
    def backbone_modules(self) -> list[nn.Module]:
        return [self.layer0, self.layer1, self.layer2, self.layer3, self.layer4]

    def run_backbone(
        self, images: torch.Tensor, layer3_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """layer0 .. layer4 outputs of ``images`` (B,3,H,W).

        ``layer3_mask`` (B,1,H,W), if given, multiplies layer3's output (resized bilinearly,
        ``align_corners=True``) before layer4, as BAM masks its support features; the
        returned layer3 map is the unmasked one."""
        check_input_size(*images.shape[-2:], strict=self.strict_size)
        outputs = []
        x = images
        for index, layer in enumerate(self.backbone_modules()):
            if index == 4 and layer3_mask is not None:
                x = x * F.interpolate(
                    layer3_mask, size=x.shape[-2:], mode="bilinear", align_corners=True
                )
            x = layer(x)
            outputs.append(x)
        return outputs

    def feat5(self, layer4: torch.Tensor) -> torch.Tensor:
        """``cls[0:2](ppm(layer4))``: conv + BN, before the ReLU. The conv's share of the
        bins is computed on their small maps (:func:`fss.ops.pyramid.conv2d_over_pyramid`;
        the reference upsamples and concatenates them)."""
        conv = self.cls[0]
        return conv2d_over_pyramid(layer4, self.ppm.bins(layer4), conv.weight, conv.bias,
                                   after=self.cls[1])

    def feat5_in_boxes(
        self, layer4: torch.Tensor, boxes: list[tuple[int, int, int, int]]
    ) -> torch.Tensor:
        """``feat5`` of each image inside its box (top, bottom, left, right; ends
        exclusive), 0 elsewhere: the values :meth:`feat5` gives there, for the price of the
        box (the 3x3 conv reads a one-position halo, zero-padded at the map's border as
        the full conv pads it; :func:`fss.ops.pyramid.conv2d_over_pyramid`). The pyramid
        pooling still sees the whole map."""
        conv = self.cls[0]
        return conv2d_over_pyramid(layer4, self.ppm.bins(layer4), conv.weight, conv.bias,
                                   boxes, after=self.cls[1])

    def base_learner(self, feat5: torch.Tensor) -> torch.Tensor:
        """``cls[2:5]`` on ``feat5``: logits (B, num_classes, h, w) at feature resolution."""
        return self.cls[4](self.cls[3](self.cls[2](feat5)))

    def extract_features(
        self, images: torch.Tensor, layer3_mask: torch.Tensor | None = None
    ) -> PSPFeatures:
        layers = self.run_backbone(images, layer3_mask)
        return PSPFeatures(*layers, feat5=self.feat5(layers[4]))

    # ----------------------------------------------------------------------- segmenter API
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) → logits (B, num_classes, H, W)."""
        features = self.extract_features(images)
        logits = self.base_learner(features.feat5)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B,H,W) int64 class map."""
        return self(images).argmax(dim=1)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (ignore 255) against ``labels`` (B,H,W): 0 = background, j+1 =
        j-th base class."""
        logits = self(images)
        loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        return {"loss": loss, "logits": logits, "ce": loss}

    @classmethod
    def from_official_checkpoint(cls, path: str | Path | Mapping, **kwargs) -> PSPNet:
        """A PSPNet in eval mode from a BAM ``best.pth`` (backbone and class count read
        from the file; ``kwargs`` go to the constructor). Every key must match: see
        :mod:`fss.models.checkpoint_io` (key table :mod:`fss.models.pspnet_keys`)."""
        checkpoint = read_official(path, kinds=("pspnet",))
        layout = checkpoint.layout
        settings: dict = {"backbone": layout.backbone, "num_classes": layout.num_classes}
        settings.update(kwargs)
        model = cls(**settings)
        load_official_state_dict(model, "pspnet", checkpoint.state, checkpoint.name)
        log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
        return model.eval()

    def trainable_parameters(self) -> list[dict]:
        """Backbone at the base lr, PPM + classifier at 10× (BAM ``index_split=0``; the
        multipliers are ``backbone_lr_scale`` / ``head_lr_scale``)."""
        backbone = [p for m in self.backbone_modules() for p in m.parameters()]
        head = [*self.ppm.parameters(), *self.cls.parameters()]
        return [
            {"params": backbone, "lr_scale": self.lr_scales["backbone"], "name": "backbone"},
            {"params": head, "lr_scale": self.lr_scales["head"], "name": "head"},
        ]


def pspnet_state_dict_from_checkpoint(
    checkpoint: Mapping | str | Path, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Extract a ``PSPNet`` state dict from a checkpoint.

    Accepts a path or an already loaded object: a plain state dict, or a dict with a
    ``state_dict`` entry (official ``best.pth``, Lightning checkpoints). Drops the keys
    outside ``prefix`` when given (e.g. ``"model."`` or ``"net.pspnet."``) and strips it,
    strips ``module.``, and drops the official duplicate ``encoder.*`` keys."""
    if isinstance(checkpoint, (str, Path)):
        state: Mapping = read_state_dict(checkpoint, "PSPNet checkpoint")
    else:
        state = checkpoint.get("state_dict", checkpoint)
    result = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :]
        if key.startswith(_BAM_COPIES):
            continue
        result[key] = value
    if not result:
        raise ValueError(f"no PSPNet weights found in the checkpoint (prefix {prefix!r})")
    return result


def load_pspnet_checkpoint(
    model: PSPNet, checkpoint: Mapping | str | Path, prefix: str | None = None
) -> None:
    """Load a base-learner checkpoint into ``model``, refusing a wrong class count."""
    state = pspnet_state_dict_from_checkpoint(checkpoint, prefix)
    classifier = state.get("cls.4.weight")
    if classifier is not None and classifier.shape[0] != model.num_classes:
        raise ValueError(
            f"base-learner checkpoint has {classifier.shape[0]} classifier outputs but the "
            f"model expects {model.num_classes} (background + base classes): wrong dataset "
            "or wrong num_classes"
        )
    load_matching_state_dict(model, state, "PSPNet checkpoint")
