"""HSNet's ablation options: the three 4D kernels (exact against their definitions),
single-layer correlations, pyramid levels, layers per block and backbone finetuning; the
parameter counts each option gives, computed by hand."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra.utils import instantiate

from fss.lightning.optim import build_optimizer, lightning_optimizers
from fss.models import HSNet
from fss.models.hsnet import CenterPivotConv4d, HypercorrelationLearner
from fss.models.hsnet.conv4d_variants import DenseConv4d, SeparableConv4d, build_conv4d
from fss.models.hsnet.correlation import (
    BoxedCorrelation,
    hypercorrelation_pyramid,
    mask_features,
)
from fss.models.hsnet.learner import (
    MIX,
    SQUEEZE_L2,
    SQUEEZE_L3,
    SQUEEZE_L4,
    block_spec,
    conv4d_block,
)
from fss.models.hsnet.model import select_taps
from fss.utils.errors import ConfigError
from tests.models.hsnet.test_hsnet import _center_pivot_kernel, _dense_conv4d_loops, _episode

RESNET50_PARAMETERS = 2_573_794
DECODER_PARAMETERS = 221_376 + 38_082
# Taps per level, deepest first (layer4, layer3, layer2).
RESNET50_TAPS = [3, 6, 4]
RESNET101_TAPS = [3, 23, 4]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------ 4D kernels
@pytest.mark.parametrize(
    ("kernel", "stride", "size"), [(3, 1, (4, 5, 6, 5)), (3, 2, (4, 3, 7, 6)), (5, 4, (5, 4, 13, 9))]
)
def test_dense_conv4d_is_the_4d_convolution(kernel, stride, size):
    """Against the definition by explicit loops (tests/models/hsnet/test_hsnet.py), values and gradients."""
    torch.manual_seed(kernel + stride)
    module = DenseConv4d(2, 3, kernel, stride).double()
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    out = module(x)
    expected = _dense_conv4d_loops(x, module.weight, module.bias, stride)
    assert out.shape == (2, 3, size[0], size[1], math.ceil(size[2] / stride),
                         math.ceil(size[3] / stride))
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out**2).sum(), (module.weight, module.bias))
    expected_grads = torch.autograd.grad((expected**2).sum(), (module.weight, module.bias))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (5, 4)])
def test_center_pivot_is_the_dense_conv_with_two_kernel_slices(kernel, stride):
    torch.manual_seed(kernel)
    center_pivot = CenterPivotConv4d(3, 4, kernel, stride).double()
    dense = DenseConv4d(3, 4, kernel, stride).double()
    weight, bias = _center_pivot_kernel(center_pivot)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
        x = torch.randn(2, 3, 5, 6, 9, 7, dtype=torch.float64)
        torch.testing.assert_close(dense(x), center_pivot(x))


def _separable_by_loops(module: SeparableConv4d, x: torch.Tensor) -> torch.Tensor:
    """The query-dims conv at every support position, then the support-dims conv at every
    query position, one 2D conv call each."""
    _, _, ha, wa, hb, wb = x.shape
    mid = torch.stack([torch.stack([module.query_conv(x[..., p, q]) for q in range(wb)], -1)
                       for p in range(hb)], -2)
    return torch.stack([torch.stack([module.support_conv(mid[:, :, i, j]) for j in range(wa)], 2)
                        for i in range(ha)], 2)


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 4)])
def test_separable_is_the_composition_of_two_2d_convs(kernel, stride):
    torch.manual_seed(stride)
    module = SeparableConv4d(2, 4, kernel, stride).double()
    x = torch.randn(2, 2, 4, 5, 9, 6, dtype=torch.float64)
    with torch.no_grad():
        out = module(x)
        torch.testing.assert_close(out, _separable_by_loops(module, x))
        assert out.shape == (2, 4, 4, 5, math.ceil(9 / stride), math.ceil(6 / stride))
        # Without biases it is a 4D convolution whose kernel is a sum of outer products of
        # a query kernel and a support kernel.
        module.query_conv.bias.zero_()
        module.support_conv.bias.zero_()
        kernel_4d = torch.einsum("omde,mcab->ocabde", module.support_conv.weight,
                                 module.query_conv.weight)
        dense = DenseConv4d(2, 4, kernel, stride).double()
        dense.weight.copy_(kernel_4d)
        dense.bias.zero_()
        torch.testing.assert_close(module(x), dense(x))


def test_unknown_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="model.net.kernel='full' is not a 4D kernel; "
                                          "accepted: center_pivot, dense, separable"):
        build_conv4d("full", 3, 16, 3)


def _learner_parameters(taps: list[int], conv_parameters) -> int:
    """Learner parameters from the spec table: each 4D conv (``conv_parameters(c_in, c_out,
    k)``) + GroupNorm (2 per channel) of every layer of the five blocks + the decoder."""
    total = DECODER_PARAMETERS
    blocks = [(taps[0], SQUEEZE_L4), (taps[1], SQUEEZE_L3), (taps[2], SQUEEZE_L2),
              (128, MIX), (128, MIX)]
    for in_channels, (channels, kernels, _) in blocks:
        for out_channels, kernel in zip(channels, kernels, strict=True):
            total += conv_parameters(in_channels, out_channels, kernel) + 2 * out_channels
            in_channels = out_channels
    return total


@pytest.mark.parametrize(
    ("kernel", "conv_parameters", "paper_millions"),
    [
        ("center_pivot", lambda i, o, k: 2 * (i * o * k**2 + o), 2.6),
        ("dense", lambda i, o, k: i * o * k**4 + o, 11.3),
        ("separable", lambda i, o, k: (i * o * k**2 + o) + (o * o * k**2 + o), None),
    ],
)
def test_kernel_parameter_counts(kernel, conv_parameters, paper_millions):
    learner = HypercorrelationLearner(RESNET101_TAPS, kernel=kernel)
    expected = _learner_parameters(RESNET101_TAPS, conv_parameters)
    assert _count(learner) == expected
    assert expected == {"center_pivot": 2_587_394, "dense": 11_296_690,
                        "separable": 2_944_546}[kernel]
    if paper_millions is not None:  # the paper's table (resnet101), in millions
        assert round(expected / 1e6, 1) == paper_millions


# ------------------------------------------------------------------ taps and pyramid
def test_single_layer_counts_by_hand():
    """taps=deep / shallow: each squeezing block's first conv sees 1 correlation channel
    instead of 3 / 6 / 4 (resnet50); a CP conv of kernel k into 16 channels has
    2·16·k² weights per input channel (kernels 3, 5, 5)."""
    removed = 2 * 16 * 3**2 * (3 - 1) + 2 * 16 * 5**2 * (6 - 1) + 2 * 16 * 5**2 * (4 - 1)
    assert removed == 6_976
    for taps in ("deep", "shallow"):
        assert _count(HSNet("resnet50", taps=taps)) == RESNET50_PARAMETERS - removed
    assert _count(HypercorrelationLearner(RESNET50_TAPS)) == RESNET50_PARAMETERS


def test_select_taps():
    groups = [2] * 4 + [3] * 6 + [4] * 3  # resnet50
    assert select_taps(groups, "all", (2, 3, 4)) == list(range(13))
    assert select_taps(groups, "shallow", (2, 3, 4)) == [0, 4, 10]
    assert select_taps(groups, "deep", (2, 3, 4)) == [3, 9, 12]
    assert select_taps(groups, "all", (3, 4)) == list(range(4, 13))
    assert select_taps(groups, "deep", [4]) == [12]


def test_single_layer_model_correlates_the_chosen_taps(monkeypatch):
    torch.manual_seed(0)
    model = HSNet("resnet18", taps="deep").eval()  # 2 blocks per level: first != last
    assert model.tap_indices == [1, 3, 5] and model.tap_groups == [2, 3, 4]
    assert HSNet("resnet18", taps="shallow").tap_indices == [0, 2, 4]
    captured = []
    forward = model.learner.forward
    monkeypatch.setattr(model.learner, "forward",
                        lambda pyramid: captured.append(pyramid) or forward(pyramid))
    query, supports, masks = _episode(1, 1)
    with torch.no_grad():
        assert model(query, supports, masks).shape == (1, 2, 64, 64)
        query_taps = [model.backbone(query)[i] for i in (1, 3, 5)]
        support_taps = mask_features([model.backbone(supports[:, 0])[i] for i in (1, 3, 5)],
                                     masks[:, 0])
        expected = hypercorrelation_pyramid(query_taps, support_taps, [2, 3, 4])
    assert [level.shape[1] for level in captured[0]] == [1, 1, 1]
    for level, expected_level in zip(captured[0], expected, strict=True):
        if isinstance(level, BoxedCorrelation):  # masked-out levels arrive as boxes
            level = level.to_dense()
        torch.testing.assert_close(level, expected_level)


def test_pyramid_counts_by_hand():
    """C(3) keeps squeeze_l4 and the decoder; C(2:3) adds squeeze_l3 and one mixing block
    (spec: squeeze l4 / l3 167,584 / 171,520, mixing block 886,272, resnet50)."""
    deepest = HypercorrelationLearner(RESNET50_TAPS[:1])
    assert _count(deepest) == 167_584 + DECODER_PARAMETERS == 427_042
    assert not hasattr(deepest, "mix_l43") and not hasattr(deepest, "squeeze_l3")
    two = HypercorrelationLearner(RESNET50_TAPS[:2])
    assert _count(two) == 167_584 + 171_520 + 886_272 + DECODER_PARAMETERS == 1_484_834
    assert not hasattr(two, "mix_l32")
    model = HSNet("resnet18", pyramid_levels=[3, 4])
    assert model.tap_groups == [3, 3, 4, 4] and model.learner.num_levels == 2


# --------------------------------------------------------------------- layers per block
def test_block_spec():
    assert block_spec(SQUEEZE_L3, 3) == SQUEEZE_L3
    assert block_spec(SQUEEZE_L3, 1) == ((128,), (5,), (16,))
    assert block_spec(SQUEEZE_L2, 2) == ((64, 128), (5, 5), (4, 8))
    assert block_spec(SQUEEZE_L4, 4) == ((16, 64, 128, 128), (3, 3, 3, 3), (2, 2, 2, 1))
    assert block_spec(MIX, 1) == ((128,), (3,), (1,))
    with pytest.raises(ConfigError, match="layers_per_block=0 must be an integer >= 1"):
        block_spec(MIX, 0)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_support_dims_end_where_the_official_blocks_end(layers):
    """At 400², resnet levels are 13, 25, 50 wide; every block ends at 2×2 (spec)."""
    for spec, size in ((SQUEEZE_L4, 13), (SQUEEZE_L3, 25), (SQUEEZE_L2, 50)):
        block = conv4d_block(1, block_spec(spec, layers))
        with torch.no_grad():
            out = block(torch.randn(1, 1, 2, 2, size, size))
        assert out.shape == (1, 128, 2, 2, 2, 2)
        assert len(block) == 3 * layers


def test_one_layer_per_block_counts_by_hand():
    """One CP conv per block: squeezes 3->128 (k3), 6->128 (k5), 4->128 (k5); two mixing
    convs 128->128 (k3); each conv 2·(c_in·128·k² + 128), its GroupNorm 256."""
    def cp(i, k):
        return 2 * (i * 128 * k**2 + 128) + 256

    expected = cp(3, 3) + cp(6, 5) + cp(4, 5) + 2 * cp(128, 3) + DECODER_PARAMETERS
    assert expected == 922_754
    assert _count(HypercorrelationLearner(RESNET50_TAPS, layers_per_block=1)) == expected


# ------------------------------------------------------------------- whole model, options
@pytest.mark.parametrize(
    "options",
    [
        {"kernel": "dense"},
        {"kernel": "separable"},
        {"taps": "shallow"},
        {"pyramid_levels": (4,)},
        {"pyramid_levels": (3, 4)},
        {"layers_per_block": 2},
        {"layers_per_block": 4},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_train_end_to_end(options):
    torch.manual_seed(0)
    model = HSNet("resnet18", **options).train()
    query, supports, masks = _episode(2, 1)
    query_mask = torch.zeros(2, 64, 64, dtype=torch.int64)
    query_mask[:, 16:48, 16:48] = 1
    out = model.training_loss(query, supports, masks, query_mask)
    assert out["logits"].shape == (2, 2, 64, 64) and torch.isfinite(out["logits"]).all()
    out["loss"].backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.predict(query, supports[:, :1].expand(-1, 3, -1, -1, -1),
                         masks[:, :1].expand(-1, 3, -1, -1)).shape == (2, 64, 64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"taps": "middle"}, "model.net.taps='middle' is not supported; accepted: all, "
                             "shallow, deep"),
        ({"pyramid_levels": (2, 4)}, r"model.net.pyramid_levels=\[2, 4\] is not supported; "
                                     r"accepted: \[2, 3, 4\] \| \[3, 4\] \| \[4\]"),
        ({"kernel": "full"}, "model.net.kernel='full' is not a 4D kernel"),
        ({"layers_per_block": 0}, "model.net.layers_per_block=0 must be an integer >= 1"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        HSNet("resnet18", **options)
    assert "\n" not in str(error.value)


# -------------------------------------------------------------------- backbone finetuning
def test_finetuned_backbone_trains_at_a_hundredth_of_the_lr_with_frozen_statistics():
    torch.manual_seed(0)
    model = HSNet("resnet18", finetune_backbone=True).train()
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    optimizer = build_optimizer(functools.partial(torch.optim.Adam, lr=1e-3), model)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-5]
    learner_ids = {id(p) for p in model.learner.parameters()}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == learner_ids
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == backbone_ids
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_176_512  # resnet18 trunk

    statistics = model.backbone.layer2[0].bn1.running_mean.clone()
    weight = model.backbone.layer2[0].conv1.weight.detach().clone()
    query, supports, masks = _episode(2, 1)
    query_mask = torch.zeros(2, 64, 64, dtype=torch.int64)
    query_mask[:, 16:48, 16:48] = 1
    model.training_loss(query, supports, masks, query_mask)["loss"].backward()
    backbone_grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None for g in backbone_grads)
    assert sum(g.abs().sum() for g in backbone_grads) > 0
    optimizer.step()
    changed = model.backbone.layer2[0].conv1.weight.detach() - weight
    # Adam's first step moves every weight with a gradient by about its lr.
    assert 0.5e-5 < changed.abs().max() <= 1.01e-5
    torch.testing.assert_close(model.backbone.layer2[0].bn1.running_mean, statistics)


def test_finetune_switch_in_the_config(compose_cfg):
    cfg = compose_cfg(["experiment=hsnet_finetune", "model.finetune_backbone=true",
                       "backbone=resnet18", "backbone.weights=none"])
    net = instantiate(cfg.model.net)
    assert net.finetune_backbone and net.backbone_lr_scale == 0.01
    optimizer = lightning_optimizers(instantiate(cfg.model.optimizer), None, net, 10)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-5]
    frozen = instantiate(compose_cfg(["model=hsnet", "backbone.weights=none"]).model.net)
    assert not frozen.finetune_backbone
    assert all(not p.requires_grad for p in frozen.backbone.parameters())
