"""Every fast path equals the frozen straightforward implementation (tests/reference_*.py).

fp32 bound of the issue: max |Δ logit| <= 1e-4; the pieces are held to float rounding
(~1e-6 relative). bf16 autocast (the GPU training precision) is checked on the CPU at a
loose tolerance, and ``torch.compile`` of the trainable parts in a slow test.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
import torch.nn.functional as F

from fss.lightning.few_shot_module import compile_trainable_children
from fss.models import HDMNet, HSNet
from fss.models.folding import FoldedCache, fold_batchnorms
from fss.models.hdmnet.attention import (
    MultiHeadAttention,
    cross_attention_weights,
    pruned_cross_attention,
)
from fss.models.hdmnet.priors import max_cosine_prior
from fss.models.hsnet.conv4d import (
    CenterPivotConv4d,
    GroupNorm6d,
    channels_last_6d,
    is_channels_last_6d,
)
from fss.models.hsnet.correlation import (
    BoxedCorrelation,
    correlation_product,
    hypercorrelation_pyramid,
)
from fss.models.matmul import matmul_as_conv
from fss.models.pspnet import PSPNet
from tests import reference_hdmnet, reference_hsnet

LOGIT_TOLERANCE = 1e-4


def _support_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1, 4, 5).contiguous().permute(0, 3, 1, 2, 4, 5)


def _box_masks(batch: int, shots: int, size: int) -> torch.Tensor:
    masks = torch.zeros(batch, shots, size, size)
    masks[..., size // 4 : size // 2, size // 5 : 3 * size // 4] = 1
    return masks


@functools.lru_cache
def _hsnet(name: str) -> HSNet:
    torch.manual_seed(0)
    return HSNet(name).eval()


# ------------------------------------------------------------------------ HSNet pieces
@pytest.mark.parametrize("layout", ["contiguous", "support_last", "channels_last"])
@pytest.mark.parametrize(("kernel", "stride", "size"),
                         [(5, 4, (6, 5, 13, 11)), (3, 2, (5, 6, 7, 6)), (3, 1, (6, 5, 2, 2))])
def test_center_pivot_conv_matches_reference(layout, kernel, stride, size) -> None:
    torch.manual_seed(stride)
    module = CenterPivotConv4d(4, 8, kernel, stride)
    x = torch.randn(2, 4, *size)
    laid_out = {"contiguous": x, "support_last": _support_last(x),
                "channels_last": channels_last_6d(x)}[layout]
    laid_out = laid_out.detach().requires_grad_(True)
    reference_input = x.detach().requires_grad_(True)

    out = module(laid_out)
    expected = reference_hsnet.conv4d(module, reference_input)
    assert is_channels_last_6d(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(expected)
    weight_grads = torch.autograd.grad(out, [laid_out, *module.parameters()], grad)
    reference_grads = torch.autograd.grad(expected, [reference_input, *module.parameters()], grad)
    for got, want in zip(weight_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_center_pivot_conv_without_autograd_matches_too() -> None:
    torch.manual_seed(1)
    module = CenterPivotConv4d(4, 16, 5, 4)
    x = torch.randn(1, 4, 9, 8, 13, 13)
    with torch.inference_mode():
        torch.testing.assert_close(module(_support_last(x)), reference_hsnet.conv4d(module, x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kernel", "stride", "support"), [(3, 1, (2, 2)), (3, 2, (1, 2)),
                                                          (5, 1, (3, 3)), (3, 1, (1, 1))])
def test_small_support_maps_as_one_matrix_match_reference(kernel, stride, support) -> None:
    """Inference on support maps every window covers: conv2 as one cached matrix product,
    rebuilt when the weights change."""
    torch.manual_seed(kernel + stride)
    module = CenterPivotConv4d(8, 16, kernel, stride)
    assert module._windows_cover(*support)
    x = torch.randn(3, 8, 6, 5, *support)
    with torch.no_grad():
        torch.testing.assert_close(module(channels_last_6d(x)), reference_hsnet.conv4d(module, x),
                                   rtol=1e-5, atol=1e-5)
        cached = module._support_matrix_cache
        assert cached is not None
        module.conv2.weight.mul_(-2.0)
        torch.testing.assert_close(module(channels_last_6d(x)), reference_hsnet.conv4d(module, x),
                                   rtol=1e-5, atol=1e-5)
        assert module._support_matrix_cache is not cached
    # Training after inference: the cached matrix has no graph, so it must not be reused.
    leaf = channels_last_6d(x).requires_grad_(True)
    grad = torch.randn(reference_hsnet.conv4d(module, x).shape)
    got = torch.autograd.grad(module(leaf), [leaf, *module.parameters()], grad)
    reference_leaf = x.clone().requires_grad_(True)
    want = torch.autograd.grad(reference_hsnet.conv4d(module, reference_leaf),
                               [reference_leaf, *module.parameters()], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not CenterPivotConv4d(8, 16, 3, 2)._windows_cover(4, 4)  # squeeze: windows differ


# Support boxes (top, bottom, left, right) on a 13x11 support map, one per pair: interior,
# touching every border, a single position, a full-width band, and an empty support.
_BOXES = [(3, 9, 2, 7), (0, 13, 0, 4), (12, 13, 10, 11), (5, 6, 0, 11), (0, 0, 0, 0)]


@pytest.mark.parametrize(("kernel", "stride"), [(5, 4), (3, 2), (3, 1), (5, 2)])
def test_boxed_correlation_conv_matches_dense(kernel, stride) -> None:
    """The first 4D conv on a level kept as support boxes (inference) equals the conv of
    the dense level: bias where no window reaches the box, the convolution elsewhere."""
    torch.manual_seed(kernel * 10 + stride)
    hb, wb = 13, 11
    shots = len(_BOXES)
    query = [torch.randn(1, 6, 20, 21) for _ in range(3)]  # >= 400: products as 1x1 convs
    support = [torch.randn(shots, 6, hb, wb) for _ in range(3)]
    for pair, (top, bottom, left, right) in enumerate(_BOXES):
        keep = torch.zeros(hb, wb)
        keep[top:bottom, left:right] = 1
        for feature in support:
            feature[pair] *= keep
    module = CenterPivotConv4d(3, 8, kernel, stride)
    with torch.no_grad():
        dense = hypercorrelation_pyramid(query, support, [2, 2, 2])[0]
        boxed = hypercorrelation_pyramid(query, support, [2, 2, 2], boxed=True)[0]
        assert isinstance(boxed, BoxedCorrelation)
        assert boxed.boxes == tuple(_BOXES) and boxed.values[-1] is None
        torch.testing.assert_close(boxed.to_dense(), dense, rtol=1e-5, atol=1e-6)
        got = module(boxed)
        expected = reference_hsnet.conv4d(module, dense)
    assert is_channels_last_6d(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The empty support sees only zeros: both branches give their bias.
    bias = (module.conv1.bias + module.conv2.bias).detach()
    torch.testing.assert_close(got[-1], bias.view(-1, 1, 1, 1, 1).expand_as(got[-1]))
    with pytest.raises(RuntimeError, match="for inference"):
        module(boxed)  # autograd on: a boxed level cannot be trained through


@pytest.mark.parametrize("positions", [120, 2500])
def test_correlation_product_matches_matmul(positions) -> None:
    """Products of >= 400 query positions run as oneDNN 1x1 convolutions; fewer, as mm."""
    torch.manual_seed(positions)
    query = torch.randn(48, positions).t()  # (P, C), not contiguous: as the taps arrive
    support = torch.randn(48, 70)
    got = correlation_product(query, support)
    assert got.shape == (positions, 70) and got.is_contiguous()
    torch.testing.assert_close(got, query @ support, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("positions", "channels", "columns"),
                         [(500, 32, 7), (3, 32, 0), (0, 32, 5), (10, 0, 4)])
def test_matmul_as_conv_matches_matmul(positions, channels, columns) -> None:
    """Bias included; an empty side (no support rows kept, say) falls back to matmul."""
    torch.manual_seed(positions + columns)
    rows, matrix, bias = (torch.randn(positions, channels), torch.randn(channels, columns),
                          torch.randn(columns))
    got = matmul_as_conv(rows, matrix, bias)
    assert got.shape == (positions, columns)
    torch.testing.assert_close(got, rows @ matrix + bias, rtol=1e-5, atol=1e-4)


def test_boxed_levels_only_where_supports_are_masked() -> None:
    query = [torch.randn(1, 4, 6, 6)]
    full = [torch.randn(2, 4, 6, 6)]
    with torch.no_grad():
        assert isinstance(hypercorrelation_pyramid(query, full, [2], boxed=True)[0], torch.Tensor)
        masked = [full[0] * (torch.arange(6) < 3).float().view(1, 1, 6, 1)]
        assert isinstance(hypercorrelation_pyramid(query, masked, [2], boxed=True)[0],
                          BoxedCorrelation)
        assert isinstance(hypercorrelation_pyramid(query, masked, [2])[0], torch.Tensor)


@pytest.mark.parametrize("inplace", [True, False])
def test_groupnorm6d_inference_in_chunks_and_in_place(inplace) -> None:
    """Without autograd the statistics run in chunks (more positions than one chunk here)
    and ``inplace`` writes over the input; the values are nn.GroupNorm's either way."""
    torch.manual_seed(7)
    norm = GroupNorm6d(4, 8, inplace=inplace)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, 8, 30, 30, 5, 4) * 2 + 1  # 18,000 positions: 3 chunks of <= 8192
    expected = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    laid_out = channels_last_6d(x)
    before = laid_out.clone()
    with torch.no_grad():
        out = norm(laid_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out.data_ptr() == laid_out.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(laid_out, before)


@pytest.mark.parametrize("channels_last", [True, False])
def test_groupnorm6d_matches_groupnorm(channels_last) -> None:
    torch.manual_seed(2)
    norm = GroupNorm6d(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(2, 16, 5, 4, 3, 3) * 3 + 2).requires_grad_(True)
    laid_out = channels_last_6d(x) if channels_last else x
    out = norm(laid_out)
    expected = F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert is_channels_last_6d(out) == channels_last
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x, norm.weight, norm.bias], grad)
    want = torch.autograd.grad(expected, [x, norm.weight, norm.bias], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask", ["box", "rows", "full", "empty_shot"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hypercorrelation_pyramid_matches_reference(mask, channels_last) -> None:
    torch.manual_seed(3)
    batch, shots = 2, 3
    # 21 x 20 = 420 query positions at level 2: its products run as 1x1 convolutions.
    shapes = [(8, 21, 20), (8, 21, 20), (16, 6, 6), (16, 6, 6), (16, 6, 6), (32, 3, 3)]
    groups = [2, 2, 3, 3, 3, 4]
    query = [torch.randn(batch, *shape) for shape in shapes]
    support = [torch.randn(batch * shots, *shape) for shape in shapes]
    masks = torch.ones(batch * shots, 48, 48)
    if mask in ("box", "empty_shot"):
        masks = _box_masks(batch * shots, 1, 48)[:, 0]
    if mask == "rows":  # whole rows: the in-place span of the pruned GEMM
        masks = torch.zeros(batch * shots, 48, 48)
        masks[:, 8:30] = 1
    if mask == "empty_shot":
        masks[1] = 0
    support = reference_hsnet.mask_features(support, masks)
    if channels_last:
        query = [q.contiguous(memory_format=torch.channels_last) for q in query]
        support = [s.contiguous(memory_format=torch.channels_last) for s in support]
    pruned = sum(int((s.flatten(2).norm(dim=1) == 0).sum()) for s in support)
    assert (pruned > 0) == (mask != "full")  # the pruned GEMMs are exercised

    with torch.no_grad():
        fast = hypercorrelation_pyramid(query, support, groups)
        expected = reference_hsnet.hypercorrelation_pyramid(query, support, groups)
    assert [tuple(f.shape) for f in fast] == [tuple(e.shape) for e in expected]
    for got, want in zip(fast, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # With autograd (fine-tuned backbone) the differentiable path gives the same values.
    leaves = [s.detach().requires_grad_(True) for s in support]
    differentiable = hypercorrelation_pyramid(query, leaves, groups)
    for got, want in zip(differentiable, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "size", "shots"), [("resnet18", 96, 3), ("resnet50", 128, 1)])
def test_hsnet_logits_match_reference(name, size, shots) -> None:
    model = _hsnet(name)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, size, size, generator=generator)
    supports = torch.randn(2, shots, 3, size, size, generator=generator)
    masks = _box_masks(2, shots, size)
    masks[1, 0] = 0  # a support with an empty mask
    with torch.inference_mode():
        fast = model.per_shot_logits(query, supports, masks, allow_empty_support=True)
        expected = reference_hsnet.per_shot_logits(model, query, supports, masks)
    error = (fast - expected).abs().max().item()
    assert error <= LOGIT_TOLERANCE
    assert error <= 1e-4 * expected.abs().max().item()  # relative, too: logits are small here


def test_hsnet_training_gradients_match_reference() -> None:
    model = _hsnet("resnet18")
    model.train()
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 3, 64, 64, generator=generator)
    supports = torch.randn(2, 2, 3, 64, 64, generator=generator)
    masks = _box_masks(2, 2, 64)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, 20:40, 10:50] = 1
    try:
        loss = model.training_loss(query, supports, masks, target)["loss"]
        fast = torch.autograd.grad(loss, model.trainable_parameters())
        logits = reference_hsnet.per_shot_logits(model, query, supports, masks).mean(dim=1)
        reference_loss = F.cross_entropy(logits, target)
        expected = torch.autograd.grad(reference_loss, model.trainable_parameters())
    finally:
        model.eval()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(fast, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- folding
def test_folded_backbone_matches_and_follows_new_weights() -> None:
    torch.manual_seed(6)
    model = HSNet("resnet18").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 64)
    folded = fold_batchnorms(model.backbone)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        for got, want in zip(folded(images), model.backbone(images), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    cache = FoldedCache()
    first = cache.get(model.backbone)
    assert cache.get(model.backbone) is first  # cached while the weights are unchanged
    state = {k: v + 0.1 if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    model.backbone.load_state_dict(state)
    second = cache.get(model.backbone)
    assert second is not first  # new weights: rebuilt, never stale
    with torch.no_grad():
        torch.testing.assert_close(second(images)[-1], model.backbone(images)[-1],
                                   rtol=1e-4, atol=1e-4)
    assert "_folded_backbone" not in "".join(model.state_dict())


# ------------------------------------------------------------------------ HDMNet pieces
@pytest.mark.parametrize("mode", ["cosine", "dot"])
def test_pruned_cross_attention_matches_dense(mode) -> None:
    torch.manual_seed(7)
    q, k, v = torch.randn(3, 2, 20, 8), torch.randn(3, 2, 30, 8), torch.randn(3, 2, 30, 8)
    mask = (torch.rand(3, 30) > 0.6).float()
    mask[1] = 0  # no foreground token at all
    mask[2] = 1
    attention, correlation = reference_hdmnet.cross_attention_weights(q, k, mask, mode)
    out, fast_correlation = pruned_cross_attention(q, k, v, mask, mode)
    torch.testing.assert_close(out, attention @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_correlation, correlation, rtol=1e-5, atol=1e-6)
    # The public dense function is still the reference's.
    dense, dense_correlation = cross_attention_weights(q, k, mask, mode)
    torch.testing.assert_close(dense, attention)
    torch.testing.assert_close(dense_correlation, correlation)


def test_self_attention_via_sdpa_matches_reference() -> None:
    torch.manual_seed(8)
    layer = MultiHeadAttention(16, 2, mode="self")
    tokens, keys = torch.randn(2, 25, 16), torch.randn(2, 9, 16)
    out, _ = layer(tokens, keys)
    expected, _ = reference_hdmnet.multi_head_attention_forward(layer, tokens, keys)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["box", "full", "empty_shot"])
def test_max_cosine_prior_matches_reference(mask) -> None:
    torch.manual_seed(9)
    query = torch.randn(2, 8, 6, 7)
    supports = torch.randn(2, 3, 8, 6, 7)
    masks = torch.ones(2, 3, 1, 41, 49) if mask == "full" else _box_masks(2, 3, 41)
    if mask != "full":
        masks = F.interpolate(masks, size=(41, 49)).unsqueeze(2)
    if mask == "empty_shot":
        masks[0, 1] = 0
    expected = reference_hdmnet.max_cosine_prior(query, supports, masks)
    torch.testing.assert_close(max_cosine_prior(query, supports, masks), expected,
                               rtol=1e-5, atol=1e-6)


def test_pspnet_feat5_in_boxes_matches_feat5_inside() -> None:
    """The supports' feat5 inside mask boxes only: the full map's values there (the 3x3
    conv's halo zero-padded at borders), 0 elsewhere."""
    torch.manual_seed(13)
    model = PSPNet("resnet_small", strict_size=False).eval()
    layer4 = torch.randn(4, model.stage_channels[4], 9, 8)
    boxes = [(2, 6, 3, 7), (0, 9, 0, 2), (8, 9, 7, 8), (0, 0, 0, 0)]  # border, corner, empty
    with torch.no_grad():
        full = model.feat5(layer4)
        boxed = model.feat5_in_boxes(layer4, boxes)
    for index, (top, bottom, left, right) in enumerate(boxes):
        inside = torch.zeros(9, 8, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        torch.testing.assert_close(boxed[index][:, inside], full[index][:, inside],
                                   rtol=1e-5, atol=1e-5)
        assert not boxed[index][:, ~inside].any()


@pytest.mark.parametrize(("shots", "matching", "mask_mode"),
                         [(1, "cosine", "image"), (2, "cosine", "image"), (2, "dot", "feature")])
def test_hdmnet_matches_reference(shots, matching, mask_mode) -> None:
    torch.manual_seed(10)
    model = HDMNet("resnet_small", shot=shots, strict_size=False, matching=matching,
                   support_mask_mode=mask_mode).eval()
    size = 65
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(2, 3, size, size, generator=generator)
    supports = torch.randn(2, shots, 3, size, size, generator=generator)
    masks = _box_masks(2, shots, size)
    masks[1, 0] = 0  # a support with an empty mask
    target = torch.zeros(2, size, size, dtype=torch.long)
    target[:, 10:40, 20:50] = 1
    with torch.no_grad():
        fast = model(query, supports, masks, allow_empty_support=True)
        with reference_hdmnet.reference_mode():
            expected = model(query, supports, masks, allow_empty_support=True)
    assert (fast - expected).abs().max().item() <= LOGIT_TOLERANCE

    model.train()
    torch.manual_seed(12)
    loss = model.training_loss(query, supports, masks, target, allow_empty_support=True)["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad(loss, params)
    torch.manual_seed(12)  # the same dropout masks
    with reference_hdmnet.reference_mode():
        reference_loss = model.training_loss(
            query, supports, masks, target, allow_empty_support=True)["loss"]
    reference_grads = torch.autograd.grad(reference_loss, params)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ precision, compile
@pytest.mark.parametrize("mask", ["box", "scattered"])
def test_bf16_autocast_stays_close_to_fp32(mask: str) -> None:
    """bf16-mixed (`trainer.precision=bf16-mixed`, on a GPU or on this CPU): same predictions
    up to bf16 rounding. A scattered mask takes the CPU's in-place whole-row GEMMs, whose
    `out=` autocast does not cover: before the dtype fix it raised a dtype mismatch."""
    model = _hsnet("resnet18")
    generator = torch.Generator().manual_seed(13)
    query = torch.randn(1, 3, 64, 64, generator=generator)
    supports = torch.randn(1, 2, 3, 64, 64, generator=generator)
    if mask == "box":
        masks = _box_masks(1, 2, 64)
    else:
        masks = (torch.rand(1, 2, 64, 64, generator=generator) > 0.5).float()
    with torch.inference_mode():
        fp32 = model.per_shot_logits(query, supports, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.per_shot_logits(query, supports, masks)
    assert bf16.dtype in (torch.bfloat16, torch.float32)
    error = (bf16.float() - fp32).abs().max().item()
    assert error <= 0.05 * fp32.abs().max().item()


@pytest.mark.parametrize(("support_size", "stride"), [(1, 2), (2, 4), (3, 4), (4, 2)])
def test_center_pivot_conv_bf16_weight_gradients_when_stride_exceeds_the_map(
    support_size: int, stride: int
) -> None:
    """PyTorch's CPU bf16 conv gives NaN/inf or wrong weight gradients in most calls when
    the stride exceeds the input (the deepest support level, strided to 1x1): the 4D conv
    must not hand it such a call. Compared with fp32 on the same bf16-rounded values."""
    torch.manual_seed(0)
    conv = CenterPivotConv4d(4, 8, 3, support_stride=stride)
    for _ in range(8):
        x = torch.randn(2, 4, 3, 3, support_size, support_size)
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        grad_out = torch.randn(out.shape)
        (out.float() * grad_out).sum().backward()
        bf16_grads = [p.grad.clone() for p in conv.parameters()]
        reference = CenterPivotConv4d(4, 8, 3, support_stride=stride)
        with torch.no_grad():
            for mine, theirs in zip(reference.parameters(), conv.parameters(), strict=True):
                mine.copy_(theirs.bfloat16().float())
        (reference(x.bfloat16().float()) * grad_out).sum().backward()
        for got, want in zip(bf16_grads, (p.grad for p in reference.parameters()), strict=True):
            assert torch.isfinite(got).all()
            assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3


def test_bf16_autocast_training_steps_give_finite_learner_gradients() -> None:
    """HSNet trained under bf16-mixed on the CPU (64² input: the deepest support level
    is strided down to 1x1): finite, non-zero learner gradients at every step."""
    torch.manual_seed(0)
    model = HSNet("resnet18").train()
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, 64, 64, generator=generator)
    supports = torch.randn(2, 1, 3, 64, 64, generator=generator)
    masks = (torch.rand(2, 1, 64, 64, generator=generator) > 0.5).float()
    target = (torch.rand(2, 64, 64, generator=generator) > 0.5).long()
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_loss(query, supports, masks, target)["loss"]
        loss.backward()
        grads = [p.grad for p in model.learner.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_trainable_parts_match_eager() -> None:
    torch.manual_seed(14)
    model = HSNet("resnet18").eval()
    generator = torch.Generator().manual_seed(15)
    query = torch.randn(1, 3, 64, 64, generator=generator)
    supports = torch.randn(1, 2, 3, 64, 64, generator=generator)
    masks = _box_masks(1, 2, 64)
    with torch.inference_mode():
        eager = model.per_shot_logits(query, supports, masks)
    assert compile_trainable_children(model) == ["learner"]
    with torch.inference_mode():
        compiled = model.per_shot_logits(query, supports, masks)
    assert (compiled - eager).abs().max().item() <= LOGIT_TOLERANCE
