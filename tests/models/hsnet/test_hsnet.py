"""HSNet: center-pivot 4D conv, parameter counts, shapes, K-shot voting, training."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from fss.models import HSNet
from fss.models.backbones import FeatureBackbone
from fss.models.hsnet import CenterPivotConv4d, convert_official_state_dict, vote
from fss.models.hsnet.conv4d import channels_last_6d, is_channels_last_6d
from fss.models.hsnet.learner import resize_query_dims

OFFICIAL_PARAMETERS = {"vgg16": 2_570_018, "resnet50": 2_573_794, "resnet101": 2_587_394}
RESNET18_PARAMETERS = 2_568_706


@functools.lru_cache
def _shared_model(name: str) -> HSNet:
    """One model per backbone for read-only tests (construction dominates their cost)."""
    torch.manual_seed(0)
    return HSNet(name).eval()


def _episode(batch: int, shots: int, height: int = 64, width: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, height, width, generator=generator)
    supports = torch.randn(batch, shots, 3, height, width, generator=generator)
    masks = torch.zeros(batch, shots, height, width)
    masks[..., height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    return query, supports, masks


# ---------------------------------------------------------------- center-pivot 4D conv
def _dense_conv4d_loops(x, weight, bias, stride):
    """Definition of a 4D convolution (padding k//2, support stride), by explicit loops."""
    k = weight.shape[-1]
    pad = k // 2
    n, _, ha, wa, hb, wb = x.shape
    xp = F.pad(x, (pad,) * 8)
    hb_out, wb_out = (hb - 1) // stride + 1, (wb - 1) // stride + 1
    out = x.new_zeros(n, weight.shape[0], ha, wa, hb_out, wb_out)
    for i, j, p, q in itertools.product(range(ha), range(wa), range(hb_out), range(wb_out)):
        patch = xp[
            :, :, i : i + k, j : j + k, p * stride : p * stride + k, q * stride : q * stride + k
        ]
        out[:, :, i, j, p, q] = torch.einsum("ncabde,ocabde->no", patch, weight) + bias
    return out


def _dense_conv4d(x, weight, bias, stride):
    """The same 4D convolution as a sum over the first kernel dim of 3D convolutions."""
    k = weight.shape[-1]
    pad = k // 2
    n, channels, ha, wa, hb, wb = x.shape
    xp = F.pad(x, (pad,) * 8)
    out = 0
    for a in range(k):
        rows = xp[:, :, a : a + ha].transpose(1, 2).reshape(n * ha, channels, *xp.shape[3:])
        conv = F.conv3d(rows, weight[:, :, a], stride=(1, stride, stride))
        out = out + conv.view(n, ha, *conv.shape[1:]).transpose(1, 2)
    return out + bias.view(1, -1, 1, 1, 1, 1)


def _center_pivot_kernel(module: CenterPivotConv4d):
    """The 4D kernel of a center-pivot conv: zero off the two slices through its centre."""
    out_channels, in_channels, k, _ = module.conv1.weight.shape
    centre = k // 2
    weight = module.conv1.weight.new_zeros(out_channels, in_channels, k, k, k, k)
    weight[:, :, :, :, centre, centre] += module.conv1.weight  # query slice
    weight[:, :, centre, centre, :, :] += module.conv2.weight  # support slice
    return weight, module.conv1.bias + module.conv2.bias


def test_dense_reference_matches_its_definition() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 3, 5, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    for stride in (1, 2):
        torch.testing.assert_close(
            _dense_conv4d(x, weight, bias, stride), _dense_conv4d_loops(x, weight, bias, stride)
        )


@pytest.mark.parametrize(
    ("kernel", "stride", "size"),
    [(3, 1, (5, 6, 7, 6)), (3, 2, (5, 4, 7, 6)), (5, 4, (6, 5, 13, 9)), (5, 1, (4, 4, 6, 5))],
)
def test_center_pivot_equals_dense_4d_conv(kernel: int, stride: int, size) -> None:
    torch.manual_seed(kernel * 10 + stride)
    module = CenterPivotConv4d(3, 4, kernel, stride).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    weight, bias = _center_pivot_kernel(module)
    expected = _dense_conv4d(x, weight, bias, stride)
    with torch.no_grad():
        out = module(x)
    assert out.shape == expected.shape
    assert out.shape[-2:] == (-(-size[2] // stride), -(-size[3] // stride))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_query_dims_only_touches_query_dims(channels_last) -> None:
    x = torch.randn(2, 3, 4, 5, 2, 3)
    out = resize_query_dims(channels_last_6d(x) if channels_last else x, (7, 9))
    assert out.shape == (2, 3, 7, 9, 2, 3)
    assert is_channels_last_6d(out) == channels_last  # the layout the next 4D conv reads
    for i, j in ((1, 2), (0, 0)):
        expected = F.interpolate(x[..., i, j], size=(7, 9), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[..., i, j], expected)


# ---------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMETERS))
def test_learnable_parameter_counts_match_the_paper(name: str) -> None:
    model = _shared_model(name)
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert learnable == OFFICIAL_PARAMETERS[name]
    assert sum(p.numel() for p in model.trainable_parameters()) == learnable


def test_resnet18_parameter_count() -> None:
    model = HSNet("resnet18")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == RESNET18_PARAMETERS


def test_squeeze_block_parameter_counts() -> None:
    learner = _shared_model("resnet50").learner

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert [count(learner.squeeze_l4), count(learner.squeeze_l3), count(learner.squeeze_l2)] == [
        167_584,
        171_520,
        202_688,
    ]
    assert count(learner.mix_l43) == count(learner.mix_l32) == 886_272
    assert [count(learner.decoder1), count(learner.decoder2)] == [221_376, 38_082]


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "resnet101", "resnet18"])
def test_output_shapes(name: str) -> None:
    model = _shared_model(name)
    query, supports, masks = _episode(1, 1, 64, 96)
    with torch.no_grad():
        logits = model(query, supports, masks)
    assert logits.shape == (1, 2, 64, 96)
    assert torch.isfinite(logits).all()
    prediction = model.predict(query, supports, masks)
    assert prediction.shape == (1, 64, 96) and prediction.dtype == torch.int64


def test_vgg_size_with_unequal_support_grids_still_runs() -> None:
    # 264 rows: conv4 33 -> support grid 2 after squeezing, conv5 16 -> 1; the mix resizes.
    query, supports, masks = _episode(1, 1, 264, 32)
    with torch.no_grad():
        assert _shared_model("vgg16")(query, supports, masks).shape == (1, 2, 264, 32)


# ---------------------------------------------------------------- K shots
def test_query_encoded_once_and_supports_in_one_batch() -> None:
    model = _shared_model("resnet18")
    batch_sizes: list[int] = []

    def record(module, args):
        # Any FeatureBackbone: the frozen model runs its BatchNorm-folded copy.
        if isinstance(module, FeatureBackbone):
            batch_sizes.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        query, supports, masks = _episode(2, 3)
        with torch.no_grad():
            model(query, supports, masks)
            model.predict(query, supports, masks)
    finally:
        handle.remove()
    # One backbone pass per call over the 2 queries and the 2·3 supports together.
    assert batch_sizes == [8, 8]


def test_k_shot_equals_the_one_shot_model_per_support() -> None:
    model = _shared_model("resnet18")
    query, supports, masks = _episode(2, 2, seed=3)
    masks[:, 1, :32] = 0  # different masks per shot
    with torch.no_grad():
        per_shot = model.per_shot_logits(query, supports, masks)
        for shot in range(2):
            single = model(query, supports[:, shot : shot + 1], masks[:, shot : shot + 1])
            torch.testing.assert_close(per_shot[:, shot], single, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(query, supports, masks), per_shot.mean(dim=1))


def _logits_from_masks(foreground: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) {0,1} -> (B, K, 2, H, W) logits whose argmax is ``foreground``."""
    foreground = foreground.float()
    return torch.stack([1 - foreground, foreground], dim=2)


def test_k_shot_voting_rule(monkeypatch) -> None:
    model = _shared_model("resnet18")
    # Episode 0: votes 3, 2, 1, 0 -> max 3 -> ratios 1, .67, .33, 0.
    # Episode 1: votes 1, 0, 1, 0 -> max 1 -> every voted pixel is foreground.
    # Episode 2: nobody votes -> max floored at 1 -> background.
    shots = torch.tensor(
        [
            [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]],
            [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ]
    ).view(3, 3, 1, 4)
    monkeypatch.setattr(model, "per_shot_logits", lambda *args, **kwargs: _logits_from_masks(shots))
    prediction = model.predict(*_episode(3, 3))
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]).view(3, 1, 4)
    assert prediction.dtype == torch.int64
    assert torch.equal(prediction, expected)


def test_vote_with_one_shot_is_argmax() -> None:
    logits = torch.randn(2, 1, 2, 5, 6)
    assert torch.equal(vote(logits), logits[:, 0].argmax(dim=1))
    model = _shared_model("resnet18")
    episode = _episode(1, 1)
    with torch.no_grad():
        assert torch.equal(model.predict(*episode), model(*episode).argmax(dim=1))


# ---------------------------------------------------------------- masking, training
def test_support_mask_option() -> None:
    torch.manual_seed(0)
    masked = HSNet("resnet18")
    unmasked = HSNet(masked.backbone, use_support_mask=False)
    unmasked.learner.load_state_dict(masked.learner.state_dict())
    query, supports, masks = _episode(1, 1)
    other_masks = torch.ones_like(masks)
    with torch.no_grad():
        assert not torch.allclose(
            masked(query, supports, masks), masked(query, supports, other_masks)
        )
        torch.testing.assert_close(
            unmasked(query, supports, masks), unmasked(query, supports, other_masks)
        )
        torch.testing.assert_close(
            unmasked(query, supports, masks), masked(query, supports, other_masks)
        )


def test_backbone_stays_eval_and_frozen() -> None:
    model = HSNet("resnet18")
    model.train()
    assert model.training and model.learner.training
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_training_loss_backward_reaches_only_the_learner() -> None:
    torch.manual_seed(0)
    model = HSNet("resnet18").train()
    query, supports, masks = _episode(2, 1)
    query_mask = torch.zeros(2, 64, 64, dtype=torch.int64)
    query_mask[:, 10:40, 10:40] = 1
    query_mask[:, 0, :] = 255
    out = model.training_loss(query, supports, masks, query_mask)
    assert set(out) == {"loss", "logits", "ce"}
    assert out["logits"].shape == (2, 2, 64, 64)
    # 255 counts as background, no ignore_index (official).
    expected = F.cross_entropy(out["logits"], (query_mask == 1).long())
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("query_shape", "support_shape", "mask_shape", "message"),
    [
        ((1, 3, 60, 64), (1, 1, 3, 60, 64), (1, 1, 60, 64), "multiples of 8 and at least 32"),
        ((1, 3, 24, 64), (1, 1, 3, 24, 64), (1, 1, 24, 64), "multiples of 8 and at least 32"),
        ((3, 64, 64), (1, 1, 3, 64, 64), (1, 1, 64, 64), r"query_img must be \(B, 3, H, W\)"),
        ((1, 3, 64, 64), (1, 3, 64, 64), (1, 1, 64, 64), r"support_imgs must be \(B, K, 3, H, W\)"),
        ((1, 3, 64, 64), (2, 1, 3, 64, 64), (2, 1, 64, 64), r"support_imgs must be"),
        ((1, 3, 64, 64), (1, 1, 3, 64, 64), (1, 64, 64), r"support_masks must be \(B, K, H, W\)"),
    ],
)
def test_input_validation(query_shape, support_shape, mask_shape, message) -> None:
    model = _shared_model("resnet18")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(query_shape), torch.zeros(support_shape), torch.zeros(mask_shape))


def test_training_loss_rejects_a_bad_query_mask() -> None:
    model = _shared_model("resnet18")
    with pytest.raises(ValueError, match=r"query_mask must be \(B, H, W\)"):
        model.training_loss(*_episode(1, 1), torch.zeros(1, 1, 64, 64, dtype=torch.int64))


# ---------------------------------------------------------------- official checkpoints
_TO_OFFICIAL = {
    "squeeze_l4": "encoder_layer4",
    "squeeze_l3": "encoder_layer3",
    "squeeze_l2": "encoder_layer2",
    "mix_l43": "encoder_layer4to3",
    "mix_l32": "encoder_layer3to2",
    "decoder1": "decoder1",
    "decoder2": "decoder2",
}


def test_official_checkpoint_keys_are_converted() -> None:
    converted = convert_official_state_dict(
        {
            "module.hpn_learner.encoder_layer4.0.conv1.weight": torch.zeros(1),
            "module.hpn_learner.encoder_layer4to3.7.bias": torch.zeros(1),
            "module.hpn_learner.decoder2.2.weight": torch.zeros(1),
            "module.backbone.layer1.0.conv1.weight": torch.zeros(1),
            "module.backbone.fc.weight": torch.zeros(1),
        }
    )
    assert set(converted) == {
        "learner.squeeze_l4.0.conv1.weight",
        "learner.mix_l43.7.bias",
        "learner.decoder2.2.weight",
        "backbone.layer1.0.conv1.weight",
    }


def test_official_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    source = HSNet("resnet18")
    official = {}
    for key, value in source.state_dict().items():
        if key.startswith("learner."):
            block, rest = key[len("learner.") :].split(".", 1)
            official[f"module.hpn_learner.{_TO_OFFICIAL[block]}.{rest}"] = value
        else:
            official[f"module.{key}"] = value
    official["module.backbone.fc.weight"] = torch.zeros(1000, 512)
    torch.manual_seed(1)
    target = HSNet("resnet18")
    target.load_official_state_dict({"state_dict": official})
    episode = _episode(1, 1)
    with torch.no_grad():
        torch.testing.assert_close(target(*episode), source.eval()(*episode))
