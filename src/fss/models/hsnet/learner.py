"""HSNet's learner: squeeze the hypercorrelation pyramid, mix the levels, decode a mask."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.hsnet.conv4d import CenterPivotConv4d

# (out channels, kernel sizes, support strides) of each block's three 4D convs (spec table).
SQUEEZE_L4 = ((16, 64, 128), (3, 3, 3), (2, 2, 2))
SQUEEZE_L3 = ((16, 64, 128), (5, 3, 3), (4, 2, 2))
SQUEEZE_L2 = ((16, 64, 128), (5, 5, 3), (4, 4, 2))
MIX = ((128, 128, 128), (3, 3, 3), (1, 1, 1))
GROUPNORM_GROUPS = 4


def conv4d_block(
    in_channels: int, spec: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
) -> nn.Sequential:
    """Three [center-pivot 4D conv -> GroupNorm(4) -> ReLU] on (N, C, Ha, Wa, Hb, Wb).

    GroupNorm accepts the 6D tensor directly (it normalises over channel groups and all
    trailing dims). Layout (conv, norm, relu) × 3 gives the official checkpoints' indices.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for out_channels, kernel, stride in zip(*spec, strict=True):
        layers += [
            CenterPivotConv4d(channels, out_channels, kernel, stride),
            nn.GroupNorm(GROUPNORM_GROUPS, out_channels),
            nn.ReLU(inplace=True),
        ]
        channels = out_channels
    return nn.Sequential(*layers)


def resize_query_dims(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of the query dims: (N,C,ha,wa,hb,wb) -> (N,C,*size,hb,wb)."""
    n, channels, ha, wa, hb, wb = x.shape
    if (ha, wa) == tuple(size):
        return x
    x = x.permute(0, 4, 5, 1, 2, 3).reshape(n * hb * wb, channels, ha, wa)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, hb, wb, channels, *size).permute(0, 3, 4, 5, 1, 2)


def resize_support_dims(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of the support dims: (N,C,ha,wa,hb,wb) -> (N,C,ha,wa,*size)."""
    n, channels, ha, wa, hb, wb = x.shape
    if (hb, wb) == tuple(size):
        return x
    x = x.reshape(n, channels * ha * wa, hb, wb)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, channels, ha, wa, *size)


class HypercorrelationLearner(nn.Module):
    """Squeeze -> mix -> mean over support dims -> 2D decoder.

    Args:
        level_channels: correlation channels (taps) per level, DEEPEST first (n4, n3, n2).
    """

    def __init__(self, level_channels: list[int]) -> None:
        super().__init__()
        n4, n3, n2 = level_channels
        self.squeeze_l4 = conv4d_block(n4, SQUEEZE_L4)
        self.squeeze_l3 = conv4d_block(n3, SQUEEZE_L3)
        self.squeeze_l2 = conv4d_block(n2, SQUEEZE_L2)
        self.mix_l43 = conv4d_block(128, MIX)
        self.mix_l32 = conv4d_block(128, MIX)
        self.decoder1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 2, 3, padding=1),
        )

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        """pyramid [l4, l3, l2], each (N, n_l, ha_l, wa_l, hb_l, wb_l) -> logits (N, 2, 2·ha_2, 2·wa_2)."""
        l4, l3, l2 = pyramid
        squeezed4 = self.squeeze_l4(l4)
        squeezed3 = self.squeeze_l3(l3)
        squeezed2 = self.squeeze_l2(l2)

        mixed = self._upsample_like(squeezed4, squeezed3) + squeezed3
        mixed = self.mix_l43(mixed)
        mixed = self._upsample_like(mixed, squeezed2) + squeezed2
        mixed = self.mix_l32(mixed)

        encoded = mixed.flatten(4).mean(dim=-1)  # (N, 128, ha_2, wa_2)
        decoded = self.decoder1(encoded)
        height, width = decoded.shape[-2:]
        decoded = F.interpolate(
            decoded, size=(2 * height, 2 * width), mode="bilinear", align_corners=True
        )
        return self.decoder2(decoded)

    @staticmethod
    def _upsample_like(deeper: Tensor, shallower: Tensor) -> Tensor:
        """Bring the deeper level's query dims to the shallower level's (official rule).

        The support dims already agree (2×2 at 400², ceil(H/256) for ResNets); only for VGG
        at sizes the paper never uses can they differ by one, and then they are resized too
        rather than failing.
        """
        deeper = resize_query_dims(deeper, tuple(shallower.shape[2:4]))
        return resize_support_dims(deeper, tuple(shallower.shape[4:6]))
