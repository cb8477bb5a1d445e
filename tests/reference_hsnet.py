"""Frozen straightforward HSNet forward: the reference every fast path is compared against.

A copy of this project's first (unoptimised) implementation of the center-pivot 4D conv, the
hypercorrelation pyramid and the learner's forward, written as plain functions over the
modules' weights. It follows the official data flow one op at a time (permute + contiguous
copies, one matmul per tapped layer, ``nn.GroupNorm`` on contiguous 6D tensors), so it is
slow but obviously right. Do not optimise it: ``tests/test_speed_equivalence.py`` relies on
it staying the definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-5


def conv4d(module: nn.Module, x: Tensor) -> Tensor:
    """Center-pivot 4D conv of ``module`` (``conv1``, ``conv2``, ``support_stride``) on
    x (N, C, Ha, Wa, Hb, Wb)."""
    x = x.contiguous()
    n, channels, ha, wa, hb, wb = x.shape
    stride = module.support_stride
    pivots = x[..., ::stride, ::stride] if stride > 1 else x
    hb_out, wb_out = pivots.shape[-2:]
    query = pivots.permute(0, 4, 5, 1, 2, 3).reshape(n * hb_out * wb_out, channels, ha, wa)
    query = module.conv1(query)
    out_channels = query.shape[1]
    query = query.view(n, hb_out, wb_out, out_channels, ha, wa).permute(0, 3, 4, 5, 1, 2)
    support = x.permute(0, 2, 3, 1, 4, 5).reshape(n * ha * wa, channels, hb, wb)
    support = module.conv2(support)
    support = support.view(n, ha, wa, out_channels, hb_out, wb_out).permute(0, 3, 1, 2, 4, 5)
    return (query + support).contiguous()


def mask_features(features: list[Tensor], masks: Tensor) -> list[Tensor]:
    masks = masks.unsqueeze(1)
    return [
        feature
        * F.interpolate(masks, size=feature.shape[-2:], mode="bilinear", align_corners=True)
        for feature in features
    ]


def hypercorrelation_pyramid(
    query_features: list[Tensor], support_features: list[Tensor], tap_groups: list[int]
) -> list[Tensor]:
    """One matmul per layer, clamp, stack per level; levels deepest first, contiguous."""
    batch = query_features[0].shape[0]
    shots = support_features[0].shape[0] // batch
    per_level: dict[int, list[Tensor]] = {}
    for query, support, level in zip(query_features, support_features, tap_groups, strict=True):
        _, channels, ha, wa = query.shape
        hb, wb = support.shape[-2:]
        query = query.flatten(2)
        query = query / (query.norm(dim=1, keepdim=True) + NORM_EPS)
        support = support.flatten(2)
        support = support / (support.norm(dim=1, keepdim=True) + NORM_EPS)
        corr = torch.matmul(
            query.transpose(1, 2).unsqueeze(1), support.view(batch, shots, channels, -1)
        )
        corr = corr.clamp(min=0).view(batch * shots, ha, wa, hb, wb)
        per_level.setdefault(level, []).append(corr)
    return [torch.stack(per_level[level], dim=1) for level in sorted(per_level, reverse=True)]


def _block(block: nn.Sequential, x: Tensor) -> Tensor:
    """[conv4d, GroupNorm, ReLU] x 3 with the reference conv and a plain GroupNorm."""
    for conv, norm, _ in zip(block[0::3], block[1::3], block[2::3], strict=True):
        x = conv4d(conv, x)
        x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        x = F.relu(x)
    return x


def _resize_query_dims(x: Tensor, size: tuple[int, int]) -> Tensor:
    n, channels, ha, wa, hb, wb = x.shape
    if (ha, wa) == tuple(size):
        return x
    x = x.permute(0, 4, 5, 1, 2, 3).reshape(n * hb * wb, channels, ha, wa)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, hb, wb, channels, *size).permute(0, 3, 4, 5, 1, 2)


def _resize_support_dims(x: Tensor, size: tuple[int, int]) -> Tensor:
    n, channels, ha, wa, hb, wb = x.shape
    if (hb, wb) == tuple(size):
        return x
    x = x.reshape(n, channels * ha * wa, hb, wb)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(n, channels, ha, wa, *size)


def _upsample_like(deeper: Tensor, shallower: Tensor) -> Tensor:
    deeper = _resize_query_dims(deeper, tuple(shallower.shape[2:4]))
    return _resize_support_dims(deeper, tuple(shallower.shape[4:6]))


def learner_forward(learner: nn.Module, pyramid: list[Tensor]) -> Tensor:
    """HypercorrelationLearner forward: pyramid [l4, l3, l2] -> logits (N, 2, 2ha_2, 2wa_2)."""
    l4, l3, l2 = pyramid
    squeezed4 = _block(learner.squeeze_l4, l4)
    squeezed3 = _block(learner.squeeze_l3, l3)
    squeezed2 = _block(learner.squeeze_l2, l2)
    mixed = _block(learner.mix_l43, _upsample_like(squeezed4, squeezed3) + squeezed3)
    mixed = _block(learner.mix_l32, _upsample_like(mixed, squeezed2) + squeezed2)
    encoded = mixed.flatten(4).mean(dim=-1)
    decoded = learner.decoder1(encoded)
    height, width = decoded.shape[-2:]
    decoded = F.interpolate(
        decoded, size=(2 * height, 2 * width), mode="bilinear", align_corners=True
    )
    return learner.decoder2(decoded)


def per_shot_logits(model: nn.Module, query_img: Tensor, support_imgs: Tensor,
                    support_masks: Tensor) -> Tensor:
    """HSNet.per_shot_logits as first written: (B, K, 2, H, W)."""
    batch, shots, _, height, width = support_imgs.shape
    flat_imgs = support_imgs.flatten(0, 1)
    flat_masks = support_masks.flatten(0, 1).to(flat_imgs.dtype)
    with torch.no_grad():
        taps = model.tap_indices  # the correlated taps (all of them in the paper's model)
        query_features = model.backbone(query_img)
        query_features = [query_features[i] for i in taps]
        support_features = model.backbone(flat_imgs)
        support_features = [support_features[i] for i in taps]
        if model.use_support_mask:
            support_features = mask_features(support_features, flat_masks)
        pyramid = hypercorrelation_pyramid(query_features, support_features, model.tap_groups)
    logits = learner_forward(model.learner, pyramid)
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
    return logits.view(batch, shots, 2, height, width)
