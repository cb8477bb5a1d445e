"""HSNet's learner: squeeze the hypercorrelation pyramid, mix the levels, decode a mask."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.hsnet.conv4d import CenterPivotConv4d, GroupNorm6d, ReLU6d
from fss.models.hsnet.conv4d_variants import build_conv4d
from fss.ops.conv4d import resize_query_dims, resize_support_dims
from fss.ops.correlation import BoxedCorrelation
from fss.utils.errors import ConfigError

# (out channels, kernel sizes, support strides) of each block's three 4D convs (spec table).
BlockSpec = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
SQUEEZE_L4: BlockSpec = ((16, 64, 128), (3, 3, 3), (2, 2, 2))
SQUEEZE_L3: BlockSpec = ((16, 64, 128), (5, 3, 3), (4, 2, 2))
SQUEEZE_L2: BlockSpec = ((16, 64, 128), (5, 5, 3), (4, 4, 2))
MIX: BlockSpec = ((128, 128, 128), (3, 3, 3), (1, 1, 1))
GROUPNORM_GROUPS = 4
OFFICIAL_LAYERS_PER_BLOCK = 3
# Blocks by pyramid position, deepest level first (names match the official checkpoints').
SQUEEZE_BLOCKS = (("squeeze_l4", SQUEEZE_L4), ("squeeze_l3", SQUEEZE_L3),
                  ("squeeze_l2", SQUEEZE_L2))
MIX_BLOCKS = ("mix_l43", "mix_l32")


def block_spec(spec: BlockSpec, layers: int) -> BlockSpec:
    """A block's official 3-layer spec with ``layers`` 4D convs instead (paper's ablation of
    the number of layers per building block, 1 to 4).

    The paper gives no per-layer table for 1, 2 or 4 layers; this rule keeps what the
    pyramid depends on: the block still ends with 128 channels, and the product of its
    support strides (so the support dims still end at the official size, 2×2 at 400²).
    Fewer layers keep the official first kernels and the last channel widths, the last
    layer taking the remaining stride (1 layer: (128,), kernel k1, stride s1·s2·s3;
    2 layers: (64, 128), kernels (k1, k2), strides (s1, s2·s3)); more layers append
    [128 channels, kernel 3, stride 1] convs.
    """
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConfigError(f"model.net.layers_per_block={layers!r} must be an integer >= 1 "
                          f"(the paper's model has {OFFICIAL_LAYERS_PER_BLOCK})")
    channels, kernels, strides = spec
    if layers <= len(channels):
        merged_stride = math.prod(strides[layers - 1 :])
        return channels[-layers:], kernels[:layers], (*strides[: layers - 1], merged_stride)
    extra = layers - len(channels)
    return (*channels, *(channels[-1],) * extra), (*kernels, *(3,) * extra), (*strides, *(1,) * extra)


def conv4d_block(in_channels: int, spec: BlockSpec, kernel: str = "center_pivot") -> nn.Sequential:
    """[4D conv -> GroupNorm(4) -> ReLU] per layer of ``spec`` on (N, C, Ha, Wa, Hb, Wb).

    ``kernel``: the 4D convolution (``fss.models.hsnet.conv4d_variants.KERNELS``; the paper's
    model: center_pivot). GroupNorm accepts the 6D tensor directly (it normalises over
    channel groups and all trailing dims). Layout (conv, norm, relu) × 3 gives the official
    checkpoints' indices.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for out_channels, kernel_size, stride in zip(*spec, strict=True):
        layers += [
            build_conv4d(kernel, channels, out_channels, kernel_size, stride),
            # nn.GroupNorm, layout-preserving; in place on the conv's output (inference)
            GroupNorm6d(GROUPNORM_GROUPS, out_channels, inplace=True),
            ReLU6d(),
        ]
        channels = out_channels
    return nn.Sequential(*layers)


class HypercorrelationLearner(nn.Module):
    """Squeeze -> mix -> mean over support dims -> 2D decoder.

    Args:
        level_channels: correlation channels (taps) per pyramid level, DEEPEST first:
            (n4, n3, n2) for the paper's model; (n4, n3) or (n4,) for the pyramid ablation
            (C(2:3) and C(3) in the paper: the deepest levels only).
        kernel: the 4D convolution of every block (``conv4d_variants.KERNELS``; the paper's
            model: ``center_pivot``).
        layers_per_block: 4D convs per squeezing / mixing block (paper: 3; see
            :func:`block_spec` for 1, 2 and 4).
    """

    def __init__(
        self, level_channels: list[int], kernel: str = "center_pivot", layers_per_block: int = 3
    ) -> None:
        super().__init__()
        if not 1 <= len(level_channels) <= len(SQUEEZE_BLOCKS):
            raise ValueError(f"level_channels needs 1 to {len(SQUEEZE_BLOCKS)} levels (deepest "
                             f"first), got {list(level_channels)}")
        self.num_levels = len(level_channels)
        for (name, spec), channels in zip(SQUEEZE_BLOCKS, level_channels, strict=False):
            self.add_module(name, conv4d_block(channels, block_spec(spec, layers_per_block), kernel))
        mix_spec = block_spec(MIX, layers_per_block)
        for name in MIX_BLOCKS[: self.num_levels - 1]:
            self.add_module(name, conv4d_block(128, mix_spec, kernel))
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
        """pyramid [l4, l3, l2] (deepest first; fewer levels for the pyramid ablation), each
        (N, n_l, ha_l, wa_l, hb_l, wb_l) or its
        :class:`~fss.ops.correlation.BoxedCorrelation` -> logits (N, 2, 2·ha, 2·wa) of the finest level."""
        if len(pyramid) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} pyramid levels, got {len(pyramid)}")
        squeezed = [self._squeeze(getattr(self, name), level)
                    for (name, _), level in zip(SQUEEZE_BLOCKS, pyramid, strict=False)]
        # Top-down: upsample the mixture so far to the next finer level, add, mix.
        mixed = squeezed[0]
        for name, finer in zip(MIX_BLOCKS, squeezed[1:], strict=False):
            mixed = getattr(self, name)(self._upsample_like(mixed, finer) + finer)

        encoded = mixed.flatten(4).mean(dim=-1)  # (N, 128, ha, wa) of the finest level
        decoded = self.decoder1(encoded)
        height, width = decoded.shape[-2:]
        decoded = F.interpolate(
            decoded, size=(2 * height, 2 * width), mode="bilinear", align_corners=True
        )
        return self.decoder2(decoded)

    @staticmethod
    def _squeeze(block: nn.Sequential, level: Tensor | BoxedCorrelation) -> Tensor:
        """A squeezing block on a level; a boxed level goes to a center-pivot first conv
        as it is, to the other kernels as its dense tensor."""
        if isinstance(level, BoxedCorrelation) and not isinstance(block[0], CenterPivotConv4d):
            level = level.to_dense()
        return block(level)

    @staticmethod
    def _upsample_like(deeper: Tensor, shallower: Tensor) -> Tensor:
        """Bring the deeper level's query dims to the shallower level's (official rule).

        The support dims already agree (2×2 at 400², ceil(H/256) for ResNets); only for VGG
        at sizes the paper never uses can they differ by one, and then they are resized too
        rather than failing.
        """
        deeper = resize_query_dims(deeper, tuple(shallower.shape[2:4]))
        return resize_support_dims(deeper, tuple(shallower.shape[4:6]))
