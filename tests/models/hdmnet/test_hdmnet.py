"""HDMNet: parameter counts, matching, distillation, ensemble, options and the model contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fss.models.hdmnet import (
    HDMNet,
    convert_official_state_dict,
    correlation_distillation_loss,
    kl_divergence,
)
from fss.models.hdmnet.attention import cross_attention_weights
from fss.models.hdmnet.ensemble import BaseLearnerEnsemble
from fss.models.pspnet import PSPNet

torch.set_num_threads(1)
SIZE = 65  # (65 - 1) % 8 == 0 → 9² features, stages 9², 5², 3²


def episode(batch=2, shots=1, size=SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = torch.zeros(batch, shots, size, size)
    masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    query_mask = torch.zeros(batch, size, size, dtype=torch.long)
    query_mask[:, 10:40, 20:50] = 1
    query_mask[:, :2] = 255
    return query, supports, masks, query_mask


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return HDMNet("resnet_small")


# ---------------------------------------------------------------------------- sizes
def test_parameter_count_pascal_resnet50_one_shot():
    model = HDMNet("resnet50", num_classes_base=15, shot=1)
    assert model.num_trainable_parameters() == 4_161_734
    transformer = model.transformer
    assert count(transformer) == 3_309_634
    assert count(transformer.down_sample_layers) == 557_120
    assert count(transformer.match_layers) == 271_296
    assert count(transformer.parse_layers) == 1_872_960
    assert count(transformer.cls) == 608_258
    assert count(model.down_supp) == count(model.down_query) == 393_216
    assert count(model.supp_merge) == 32_768
    assert count(model.query_merge) == 32_896
    assert count(model.ensemble.gram_merge) == count(model.ensemble.cls_merge) == 2
    assert count(model.pspnet) == 0  # frozen
    # The first stage keeps the resolution (1×1 patch embedding), the others halve it.
    assert [s[0].projection.stride for s in transformer.down_sample_layers] == [
        (1, 1),
        (2, 2),
        (2, 2),
    ]
    assert [s[1].attn.attn.num_heads for s in transformer.down_sample_layers] == [2, 4, 8]
    assert [s[1].attn.sr_ratio for s in transformer.down_sample_layers] == [4, 2, 1]


def test_parameter_count_five_shot_adds_kshot_rw():
    model = HDMNet("resnet50", num_classes_base=15, shot=5)
    # kshot_rw: conv 5→2 (10 + 2 bias) and conv 2→5 (10 + 5 bias), trainable (the official
    # code leaves it out of its optimizer).
    assert count(model.ensemble.kshot_rw) == 27
    assert model.num_trainable_parameters() == 4_161_734 + 27
    fast_group = model.trainable_parameters()[1]["params"]
    assert any(p is model.ensemble.kshot_rw[0].weight for p in fast_group)


def test_vgg_count_and_coco_base_learner():
    assert HDMNet("vgg16").num_trainable_parameters() == 4_161_734 - 2 * (1536 - 768) * 256
    coco = HDMNet("resnet_small", num_classes_base=60)
    assert coco.pspnet.cls[4].out_channels == 61


# ------------------------------------------------------------------------- matching
def test_inverse_softmax_columns_sum_to_one_over_queries():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 12, 32)
    k = torch.randn(2, 2, 7, 32)
    support_mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    attention, correlation = cross_attention_weights(q, k, support_mask, "cosine", 0.1)
    column_sums = attention.sum(dim=-2)  # over the query axis
    expected = support_mask[:, None, :].expand_as(column_sums)
    torch.testing.assert_close(column_sums, expected)
    assert torch.all(attention[..., support_mask[0] == 0][0] == 0)
    # C' = mean over foreground keys of cos/0.1, averaged over heads.
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / 0.1
    manual = torch.stack([scores[b][..., support_mask[b] == 1].mean(-1).mean(0) for b in range(2)])
    torch.testing.assert_close(correlation, manual)


def test_dot_product_ablation_softmax_over_foreground_keys():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    attention, _ = cross_attention_weights(q, k, mask, "dot")
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 2, 5))
    assert torch.all(attention[..., mask[0] == 0] == 0)
    empty, _ = cross_attention_weights(q, k, torch.zeros(1, 4), "dot")
    assert torch.all(empty == 0)


def test_k_shot_support_tokens_are_concatenated(small_model):
    captured = []

    def hook(module, args, kwargs, output):
        captured.append((args[0].shape, kwargs["source"].shape, kwargs["support_mask"].shape))

    handles = [
        stage[0].register_forward_hook(hook, with_kwargs=True)
        for stage in small_model.transformer.match_layers
    ]
    try:
        small_model.eval()
        with torch.no_grad():
            small_model(*episode(batch=2, shots=3)[:3])
    finally:
        for handle in handles:
            handle.remove()
    # Coarse → fine: 3², 5², 9² query tokens; 3 shots side by side.
    assert [c[0] for c in captured] == [(2, 9, 64), (2, 25, 64), (2, 81, 64)]
    assert [c[1] for c in captured] == [(2, 27, 64), (2, 75, 64), (2, 243, 64)]
    assert [c[2] for c in captured] == [(2, 27), (2, 75), (2, 243)]


# --------------------------------------------------------------------- distillation
def test_kl_matches_hand_computation_and_is_zero_for_equal_maps():
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax → [1/4, 3/4]
    student = torch.tensor([[[0.0, 0.0]]])  # softmax → [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(teacher, student).item() == pytest.approx(expected, abs=1e-6)
    # Temperature divides both sides.
    t2 = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    assert kl_divergence(t2, student * 2, temperature=2.0).item() == pytest.approx(
        expected, abs=1e-6
    )
    same = torch.randn(3, 4, 5)
    assert kl_divergence(same, same.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_chain_ground_truth_then_detached_coarser_maps():
    query_mask = torch.zeros(1, 4, 4, dtype=torch.long)
    query_mask[0, :2, :2] = 1
    query_mask[0, 3, 3] = 255  # counts as background
    coarse = torch.randn(1, 4, 4, requires_grad=True)
    fine = torch.randn(1, 8, 8, requires_grad=True)
    loss = correlation_distillation_loss([coarse, fine], query_mask)
    gt = torch.full((1, 4, 4), -1e9)
    gt[0, :2, :2] = 1.0
    teacher_fine = F.interpolate(
        coarse.detach().unsqueeze(1), size=(8, 8), mode="bilinear"
    ).squeeze(1)
    expected = (kl_divergence(gt, coarse) + kl_divergence(teacher_fine, fine)) / 2
    torch.testing.assert_close(loss, expected)
    # The ground-truth teacher is uniform over the 4 foreground cells.
    ground_truth_probs = gt.flatten(1).softmax(1)
    assert ground_truth_probs[0, :2].tolist() == pytest.approx([0.25, 0.25])
    # The coarse map only learns from the ground truth (its teacher role is detached).
    loss.backward()
    coarse_only = torch.autograd.grad(kl_divergence(gt, coarse) / 2, coarse)[0]
    torch.testing.assert_close(coarse.grad, coarse_only)


# ------------------------------------------------------------------------- ensemble
def test_kshot_reweighting_unpermutes_to_shot_order():
    ensemble = BaseLearnerEnsemble(shot=3)
    distances = torch.tensor([[0.5, 0.1, 0.3]])
    sorted_d, order = distances.sort(dim=1)
    by_rank = ensemble.kshot_rw(sorted_d[:, :, None, None]).flatten(1)
    weights = ensemble.shot_weights(distances)
    # Shot 1 has the smallest distance → rank 0; shot 0 → rank 2; shot 2 → rank 1.
    expected = by_rank[:, [2, 0, 1]].softmax(dim=1)
    torch.testing.assert_close(weights, expected)
    # A K the layer was not built for falls back to the mean.
    torch.testing.assert_close(ensemble.shot_weights(torch.rand(2, 5)), torch.full((2, 5), 0.2))


def test_base_map_excludes_the_episode_class():
    ensemble = BaseLearnerEnsemble(shot=1)
    with torch.no_grad():
        # background score = base_map
        ensemble.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    meta = torch.zeros(2, 2, 3, 3)
    base = torch.full((2, 16, 3, 3), -30.0)
    base[:, 3] = 30.0  # base learner is sure of channel 3 = base class index 2
    out = ensemble(meta, base, torch.zeros(2, 1), torch.tensor([2, -1]))
    assert out[0, 0].max().item() < 1e-6  # its own class removed → no "base" evidence
    assert out[1, 0].min().item() > 0.999
    with pytest.raises(ValueError, match="out of range"):
        ensemble(meta, base, torch.zeros(2, 1), torch.tensor([15, 0]))


# ----------------------------------------------------------------------- contract
def test_forward_predict_loss_shapes_for_k1_and_k5():
    torch.manual_seed(0)
    model = HDMNet("resnet_small", shot=5)
    model.eval()
    for shots in (1, 5):
        query, supports, masks, query_mask = episode(batch=2, shots=shots)
        logits = model(query, supports, masks)
        assert logits.shape == (2, 2, SIZE, SIZE)
        prediction = model.predict(query, supports, masks)
        assert prediction.shape == (2, SIZE, SIZE) and prediction.dtype == torch.int64
        assert set(prediction.unique().tolist()) <= {0, 1}
        maps = model.correlation_maps(query, supports, masks)
        assert [tuple(m.shape) for m in maps] == [(2, 3, 3), (2, 5, 5), (2, 9, 9)]
    model.train()
    query, supports, masks, query_mask = episode(batch=2, shots=5)
    out = model.training_loss(query, supports, masks, query_mask, class_ids=torch.tensor([0, 4]))
    assert set(out) == {"loss", "logits", "ce_final", "ce_meta", "distill"}
    assert out["logits"].shape == (2, 2, SIZE, SIZE)
    torch.testing.assert_close(out["loss"], out["ce_final"] + out["ce_meta"] + out["distill"])
    out["loss"].backward()
    assert model.ensemble.kshot_rw[0].weight.grad is not None
    assert all(p.grad is None for p in model.pspnet.parameters())


def test_batchnorms_and_backbone_stay_in_eval(small_model):
    small_model.train()
    batchnorms = [m for m in small_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert not small_model.pspnet.training
    assert small_model.down_query[2].training  # dropout follows the mode
    before = small_model.transformer.parse_layers[0][1].running_mean.clone()
    query, supports, masks, query_mask = episode()
    small_model.training_loss(query, supports, masks, query_mask)
    torch.testing.assert_close(small_model.transformer.parse_layers[0][1].running_mean, before)


def test_trainable_parameter_groups(small_model):
    groups = small_model.trainable_parameters()
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in small_model.parameters() if p.requires_grad}
    fast = {id(p) for p in groups[1]["params"]}
    for module in (
        small_model.down_query,
        small_model.down_supp,
        small_model.query_merge,
        small_model.supp_merge,
        small_model.ensemble,
    ):
        assert all(id(p) in fast for p in module.parameters())


# ----------------------------------------------------------------------- ablations
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_num_stages(stages):
    model = HDMNet("resnet_small", num_stages=stages).eval()
    transformer = model.transformer
    assert len(transformer.down_sample_layers) == len(transformer.match_layers) == stages
    assert len(transformer.parse_layers) == stages
    maps = model.correlation_maps(*episode(batch=1, size=97)[:3])
    assert len(maps) == stages and maps[-1].shape == (1, 13, 13)
    with pytest.raises(ValueError, match="num_stages"):
        HDMNet("resnet_small", num_stages=5)


def test_options_change_structure():
    no_ensemble = HDMNet("resnet_small", use_ensemble=False)
    assert no_ensemble.ensemble is None
    assert not any("merge" in k and "ensemble" in k for k in no_ensemble.state_dict())
    model = HDMNet("resnet_small")
    assert no_ensemble.num_trainable_parameters() == model.num_trainable_parameters() - 4
    no_ensemble.train()
    query, supports, masks, query_mask = episode()
    out = no_ensemble.training_loss(query, supports, masks, query_mask)
    torch.testing.assert_close(out["loss"], out["ce_meta"] + out["distill"])

    dot = HDMNet("resnet_small", matching="dot")
    assert {stage[0].attn.attn.mode for stage in dot.transformer.match_layers} == {"dot"}
    assert {stage[0].attn.attn.mode for stage in model.transformer.match_layers} == {"cosine"}
    no_distill = HDMNet("resnet_small", use_distill=False).train()
    assert no_distill.training_loss(query, supports, masks, query_mask)["distill"].item() == 0.0
    with pytest.raises(ValueError, match="support_mask_mode"):
        HDMNet("resnet_small", support_mask_mode="both")
    with pytest.raises(ValueError, match="matching"):
        HDMNet("resnet_small", matching="l2")


def test_support_masking_modes():
    """Image masking makes the output blind to the support background; feature masking
    (BAM) and no masking do not."""
    torch.manual_seed(0)
    reference = HDMNet("resnet_small").eval()
    query, supports, masks, _ = episode(batch=1)
    changed = supports + 3.0 * (1 - masks[:, :, None])  # background pixels only
    results = {}
    for kwargs in ({}, {"support_mask_mode": "feature"}, {"use_support_mask": False}):
        model = HDMNet("resnet_small", **kwargs).eval()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            results[str(kwargs)] = (
                (model(query, supports, masks) - model(query, changed, masks)).abs().max().item()
            )
    assert results["{}"] < 1e-5
    assert results["{'support_mask_mode': 'feature'}"] > 1e-4
    assert results["{'use_support_mask': False}"] > 1e-4


def test_backbone_relu_changes_the_prior():
    torch.manual_seed(0)
    official = HDMNet("resnet_small").eval()
    relu = HDMNet("resnet_small", backbone_relu=True).eval()
    relu.load_state_dict(official.state_dict())
    inputs = episode(batch=1)[:3]
    with torch.no_grad():
        assert not torch.allclose(official(*inputs), relu(*inputs))


# -------------------------------------------------------------------- checkpoints
def test_base_learner_checkpoint_loading_and_class_count(tmp_path):
    pascal = PSPNet("resnet_small", num_classes=16)
    path = tmp_path / "best.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in pascal.state_dict().items()}}, path)
    model = HDMNet("resnet_small", weights=path, weights_prefix="model.", num_classes_base=15)
    torch.testing.assert_close(model.pspnet.cls[4].weight, pascal.cls[4].weight)
    assert all(not p.requires_grad for p in model.pspnet.parameters())

    coco_path = tmp_path / "coco.pth"
    torch.save(PSPNet("resnet_small", num_classes=61).state_dict(), coco_path)
    with pytest.raises(ValueError, match=r"61 classifier outputs but the model expects 16"):
        HDMNet("resnet_small", weights=coco_path, num_classes_base=15)


def test_official_hdmnet_keys_map_onto_the_model():
    model = HDMNet("resnet_small", shot=5)
    own = model.state_dict()
    official_keys = [
        "module.layer0.0.weight",
        "module.layer4.0.conv2.weight",
        "module.ppm.features.3.1.weight",
        "module.cls.1.running_var",
        "module.base_learnear.2.weight",
        "module.down_query.0.weight",
        "module.supp_merge.0.weight",
        "module.transformer.mix_transformer.down_sample_layers.0.0.projection.weight",
        "module.transformer.mix_transformer.down_sample_layers.0.0.norm.bias",
        "module.transformer.mix_transformer.down_sample_layers.0.1.attn.sr.weight",
        "module.transformer.mix_transformer.down_sample_layers.0.2.attn.norm.weight",
        "module.transformer.mix_transformer.down_sample_layers.1.1.attn.attn.linear_q.weight",
        "module.transformer.mix_transformer.down_sample_layers.2.2.ffn.layers.1.weight",
        "module.transformer.mix_transformer.down_sample_layers.2.3.weight",
        "module.transformer.mix_transformer.match_layers.0.0.attn.attn.linear_o.weight",
        "module.transformer.mix_transformer.match_layers.1.0.norm2.bias",
        "module.transformer.mix_transformer.match_layers.2.1.conv.weight",
        "module.transformer.mix_transformer.match_layers.2.1.bn.running_mean",
        "module.transformer.mix_transformer.parse_layers.1.2.weight",
        "module.transformer.mix_transformer.cls.4.bias",
        "module.gram_merge.weight",
        "module.cls_merge.weight",
        "module.kshot_rw.2.bias",
    ]
    converted = convert_official_state_dict({key: torch.zeros(1) for key in official_keys})
    assert set(converted) <= set(own), sorted(set(converted) - set(own))
    assert "pspnet.cls.4.weight" in converted
