"""HDMNet matching module: query tokens attend to the support tokens of all shots.

One per pyramid stage. The support tokens of the K shots are concatenated along the
token axis (B, K·Ls, C), so K shots cost one attention over K·Ls keys. After the
attention layer the tokens go back to a (B, 64, h, w) map, the two prior channels are
appended (resized bilinearly, ``align_corners=True``) and fused by a 3×3 conv + BN + ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from fss.models.hdmnet.attention import EncoderLayer, tokens_to_map

MATCHING_MODES = ("cosine", "dot")


class ConvBNReLU(nn.Module):
    """3×3 conv (no bias) + BN + ReLU; names ``conv`` / ``bn`` as mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class MatchingStage(nn.ModuleList):
    """[EncoderLayer in cross mode, ConvBNReLU(dim + priors → dim)].

    A ``ModuleList`` so that the keys equal the official ``match_layers.i.{0,1}``.

    ``matching="cosine"`` is HDMNet's matching (cosine / 0.1, softmax over the query axis,
    background support columns zeroed); ``"dot"`` is the plain dot-product cross-attention
    of the ablation (see ``MultiHeadAttention``)."""

    def __init__(
        self,
        dim: int = 64,
        num_heads: int = 2,
        num_prior_channels: int = 2,
        matching: str = "cosine",
        mlp_ratio: int = 4,
        dropout: float = 0.1,
    ) -> None:
        if matching not in MATCHING_MODES:
            raise ValueError(
                f"unknown matching {matching!r}; accepted: {', '.join(MATCHING_MODES)}"
            )
        super().__init__(
            [
                EncoderLayer(
                    dim, num_heads, sr_ratio=1, mlp_ratio=mlp_ratio, dropout=dropout, mode=matching
                ),
                ConvBNReLU(dim + num_prior_channels, dim),
            ]
        )

    def forward(
        self,
        query_tokens: torch.Tensor,
        hw: tuple[int, int],
        support_tokens: torch.Tensor,
        support_mask: torch.Tensor,
        priors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query_tokens (B, h·w, C); support_tokens (B, K·Ls, C); support_mask (B, K·Ls)
        {0,1}; priors (B, P, h, w) → fused map (B, C, h, w), correlation C' (B, h, w)."""
        attention_layer, fuse = self
        out, correlation = attention_layer(
            query_tokens, hw, source=support_tokens, support_mask=support_mask
        )
        out = fuse(torch.cat([tokens_to_map(out, hw), priors], dim=1))
        return out, correlation.reshape(-1, *hw)
