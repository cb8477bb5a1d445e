"""Transformer blocks of HDMNet: SegFormer-style efficient attention, Mix-FFN, patch embedding.

Tokens are (B, L, C) with L = h·w in row-major order; ``hw`` carries (h, w). Every
LayerNorm uses eps 1e-6. Attribute names follow the official checkpoints (``norm1``,
``attn.attn.linear_q``, ``attn.sr``, ``ffn.layers.0`` …, ``projection``), so an official
state dict maps by prefix only (``fss.models.checkpoint_io.convert_official_state_dict``).
"""

from __future__ import annotations

import torch
from torch import nn

from fss.ops.attention import cross_attention, cross_attention_weights, self_attention

__all__ = ["ATTENTION_MODES", "EncoderLayer", "MultiHeadAttention", "PatchEmbed",
           "SelfAttentionStage", "cross_attention_weights", "map_to_tokens", "tokens_to_map"]

LN_EPS = 1e-6
ATTENTION_MODES = ("self", "cosine", "dot")


def tokens_to_map(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, C) → (B, C, h, w)."""
    batch, length, channels = tokens.shape
    if length != hw[0] * hw[1]:
        raise ValueError(f"{length} tokens do not fill a {hw[0]}x{hw[1]} map")
    return tokens.transpose(1, 2).reshape(batch, channels, hw[0], hw[1])


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h·w, C)."""
    return feature_map.flatten(2).transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Q/K/V/O projections (no bias) and the three score rules of HDMNet.

    - ``self``: scaled dot product q·k/√d, softmax over the keys (the self-attention
      pyramid).
    - ``cosine``: the matching module. Per-head L2-normalised q and k, scores = cos/τ with
      τ = 0.1, softmax over the QUERY axis ("inverse softmax": each support token
      distributes a unit of attention over the query positions), then the background
      support columns are zeroed.
    - ``dot``: plain cross-attention for the matching ablation: q·k/√d, softmax over the
      foreground support tokens (background columns excluded before the softmax; a query
      with no foreground support token gets a zero output).

    In the cross modes the layer also returns the correlation map C' (B, Lq): the mean
    score over the foreground support tokens, averaged over heads.
    """

    def __init__(
        self, dim: int, num_heads: int, mode: str = "self", temperature: float = 0.1
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        if mode not in ATTENTION_MODES:
            raise ValueError(
                f"unknown attention mode {mode!r}; accepted: {', '.join(ATTENTION_MODES)}"
            )
        self.num_heads = num_heads
        self.mode = mode
        self.temperature = temperature
        self.linear_q = nn.Linear(dim, dim, bias=False)
        self.linear_k = nn.Linear(dim, dim, bias=False)
        self.linear_v = nn.Linear(dim, dim, bias=False)
        self.linear_o = nn.Linear(dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.reshape(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor,
        support_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, Lq, C), key_value (B, Lk, C), support_mask (B, Lk) {0,1} (cross modes)
        → output (B, Lq, C), correlation (B, Lq) or None."""
        q = self._split_heads(self.linear_q(query))  # (B, heads, Lq, d)
        k = self._split_heads(self.linear_k(key_value))
        v = self._split_heads(self.linear_v(key_value))
        correlation = None
        if self.mode == "self":
            out = self_attention(q, k, v)
        elif support_mask is None:
            raise ValueError(f"attention mode {self.mode!r} needs the support mask")
        else:
            out, correlation = cross_attention(
                q, k, v, support_mask, self.mode, self.temperature
            )
        out = out.transpose(1, 2).flatten(2)
        return self.linear_o(out), correlation


class EfficientAttention(nn.Module):
    """Attention with SegFormer spatial reduction of the keys/values (conv kernel =
    stride = ``sr_ratio`` then LayerNorm; none when ``sr_ratio == 1``), output dropout and
    residual."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int = 1, dropout: float = 0.1, mode: str = "self"
    ) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiHeadAttention(dim, num_heads, mode=mode)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        hw: tuple[int, int],
        identity: torch.Tensor,
        source: torch.Tensor | None = None,
        support_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key_value = x if source is None else source
        if self.sr_ratio > 1:
            key_value = self.norm(map_to_tokens(self.sr(tokens_to_map(key_value, hw))))
        out, correlation = self.attn(x, key_value, support_mask)
        return identity + self.proj_drop(out), correlation


class MixFFN(nn.Module):
    """1×1 dim→hidden, depth-wise 3×3, GELU, dropout, 1×1 hidden→dim, dropout; residual."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        drop = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden),
            nn.GELU(),
            drop,
            nn.Conv2d(hidden, dim, kernel_size=1),
            drop,
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int], identity: torch.Tensor) -> torch.Tensor:
        return identity + map_to_tokens(self.layers(tokens_to_map(x, hw)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN1(x)[, LN1(source)]), then x + FFN(LN2(x)).

    In a cross mode (matching) the query and the support tokens share ``norm1``."""

    def __init__(
        self,
        dim: int = 64,
        num_heads: int = 2,
        sr_ratio: int = 1,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        mode: str = "self",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, dropout, mode)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, dim * mlp_ratio, dropout)

    def forward(
        self,
        x: torch.Tensor,
        hw: tuple[int, int],
        source: torch.Tensor | None = None,
        support_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed_source = None if source is None else self.norm1(source)
        x, correlation = self.attn(
            self.norm1(x), hw, identity=x, source=normed_source, support_mask=support_mask
        )
        x = self.ffn(self.norm2(x), hw, identity=x)
        return x, correlation


class PatchEmbed(nn.Module):
    """Conv ``projection`` (kernel k, stride s, padding s // 2) then LayerNorm; returns
    tokens and the new (h, w)."""

    def __init__(self, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            dim, dim, kernel_size=kernel_size, stride=stride, padding=stride // 2
        )
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(map_to_tokens(x)), hw


class SelfAttentionStage(nn.ModuleList):
    """One pyramid stage: [PatchEmbed, EncoderLayer, EncoderLayer, LayerNorm].

    A ``ModuleList`` so that the state-dict keys (``0.projection``, ``1.attn`` …, ``3``)
    equal the official ones. Query and support images go through the same weights,
    separately (no cross-talk: the pyramid is self-attention only)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        patch_size: int,
        stride: int,
        depth: int = 2,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
    ) -> None:
        layers = [
            EncoderLayer(dim, num_heads, sr_ratio, mlp_ratio, dropout, mode="self")
            for _ in range(depth)
        ]
        super().__init__(
            [PatchEmbed(dim, patch_size, stride), *layers, nn.LayerNorm(dim, eps=LN_EPS)]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x (N, C, h, w) → tokens (N, h'·w', C), (h', w')."""
        patch_embed, *layers, norm = self
        tokens, hw = patch_embed(x)
        for layer in layers:
            tokens, _ = layer(tokens, hw)
        return norm(tokens), hw
