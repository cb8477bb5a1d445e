"""The whole models on the fast kernels equal them on the references (fss.ops switch).

fp32 bound: max |Δ logit| <= 1e-4 (and 1e-4 relative for HSNet); gradients at the
tolerances of the ops. ``fss.ops.set_fast_paths(False)`` (or ``FSS_FAST_PATHS=0``, or a
model's ``fast_paths=False``) runs every op on its reference: spies on the fast kernels
show none of them ran. bf16 autocast (the GPU training precision) is checked on the CPU at
a loose tolerance, and ``torch.compile`` of the trainable parts in a slow test.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fss.lightning.few_shot_module import compile_trainable_children
from fss.models import HDMNet, HSNet
from fss.ops import fast_paths, set_fast_paths

LOGIT_TOLERANCE = 1e-4
SRC = Path(__file__).resolve().parents[2] / "src"
# Every fast kernel of fss.ops (and where a model reaches one by name).
FAST_KERNELS = [
    ("fss.ops.correlation", "_level_in_place"),
    ("fss.ops.correlation", "_level_plain"),
    ("fss.ops.correlation", "matmul_as_conv"),
    ("fss.ops.conv4d", "_support_branch"),
    ("fss.ops.conv4d", "_query_branch"),
    ("fss.ops.conv4d", "_boxed_conv"),
    ("fss.ops.conv4d", "_group_norm_channels_last"),
    ("fss.ops.conv4d", "_resize_query_dims_channels_last"),
    ("fss.ops.conv4d", "matmul_as_conv"),
    ("fss.ops.folding", "fold_batchnorms"),
    ("fss.ops.attention", "pruned_cross_attention"),
    ("fss.ops.attention", "_fused_self_attention"),
    ("fss.ops.priors", "_pruned_prior"),
    ("fss.ops.priors", "_dense_prior"),
    ("fss.ops.priors", "matmul_as_conv"),
    ("fss.ops.boxes", "nonzero_box"),
    ("fss.ops.pyramid", "_conv2d_split"),
    ("fss.ops.pyramid", "conv2d_in_boxes"),
]


def spy_on_fast_kernels(monkeypatch) -> dict[str, int]:
    """Counts calls of every fast kernel from now on (by ``module.name``)."""
    calls: dict[str, int] = {}
    for module_name, name in FAST_KERNELS:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def counted(*args, _original=original, _key=f"{module_name}.{name}", **kwargs):
            calls[_key] = calls.get(_key, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _box_masks(batch: int, shots: int, size: int) -> torch.Tensor:
    masks = torch.zeros(batch, shots, size, size)
    masks[..., size // 4 : size // 2, size // 5 : 3 * size // 4] = 1
    return masks


@functools.lru_cache
def _hsnet(name: str) -> HSNet:
    torch.manual_seed(0)
    return HSNet(name).eval()


def _hsnet_episode(size: int, shots: int, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 3, size, size, generator=generator)
    supports = torch.randn(2, shots, 3, size, size, generator=generator)
    masks = _box_masks(2, shots, size)
    masks[1, 0] = 0  # a support with an empty mask
    return query, supports, masks


# ------------------------------------------------------------------------------ HSNet
@pytest.mark.parametrize(("name", "size", "shots"), [("resnet18", 96, 3), ("resnet50", 128, 1)])
def test_hsnet_logits_match_reference(name, size, shots) -> None:
    model = _hsnet(name)
    query, supports, masks = _hsnet_episode(size, shots)
    with torch.inference_mode():
        fast = model.per_shot_logits(query, supports, masks, allow_empty_support=True)
        with fast_paths(False):
            expected = model.per_shot_logits(query, supports, masks, allow_empty_support=True)
    error = (fast - expected).abs().max().item()
    assert error <= LOGIT_TOLERANCE
    assert error <= 1e-4 * expected.abs().max().item()  # relative, too: logits are small here


def test_hsnet_training_gradients_match_reference(monkeypatch) -> None:
    """Training reads the masked levels as support boxes too; its gradients are the
    straightforward implementation's."""
    model = _hsnet("resnet18")
    monkeypatch.setattr("fss.ops.correlation.BOXED_MIN_POSITIONS", 0)  # boxes at 64² too
    model.train()
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 3, 64, 64, generator=generator)
    supports = torch.randn(2, 2, 3, 64, 64, generator=generator)
    masks = _box_masks(2, 2, 64)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, 20:40, 10:50] = 1
    calls = spy_on_fast_kernels(monkeypatch)
    try:
        loss = model.training_loss(query, supports, masks, target)["loss"]
        fast = torch.autograd.grad(loss, model.trainable_parameters())
        assert calls["fss.ops.conv4d._boxed_conv"] > 0
        with fast_paths(False):
            reference_loss = model.training_loss(query, supports, masks, target)["loss"]
        expected = torch.autograd.grad(reference_loss, model.trainable_parameters())
    finally:
        model.eval()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(fast, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_switch_off_runs_no_fast_kernel_in_hsnet(monkeypatch) -> None:
    monkeypatch.setattr("fss.ops.correlation.BOXED_MIN_POSITIONS", 0)  # boxes at 64² too
    model = _hsnet("resnet18")
    query, supports, masks = _hsnet_episode(64, 2)
    calls = spy_on_fast_kernels(monkeypatch)
    try:
        set_fast_paths(False)
        with torch.inference_mode():
            reference = model.per_shot_logits(query, supports, masks, allow_empty_support=True)
    finally:
        set_fast_paths(True)
    assert calls == {}
    with torch.inference_mode():
        fast = model.per_shot_logits(query, supports, masks, allow_empty_support=True)
    assert calls["fss.ops.correlation._level_in_place"] > 0  # the spies do see the fast run
    assert calls["fss.ops.conv4d._boxed_conv"] > 0
    assert (fast - reference).abs().max().item() <= LOGIT_TOLERANCE


def test_model_argument_overrides_the_process_switch(monkeypatch) -> None:
    torch.manual_seed(0)
    model = HSNet("resnet18", fast_paths=False).eval()
    query, supports, masks = _hsnet_episode(64, 1)
    calls = spy_on_fast_kernels(monkeypatch)
    with torch.inference_mode():
        model.predict(query, supports, masks, allow_empty_support=True)
    assert calls == {}
    model.fast_paths = True
    with torch.inference_mode(), fast_paths(False):
        model.predict(query, supports, masks, allow_empty_support=True)
    assert calls


def test_environment_turns_the_fast_kernels_off_in_a_new_process() -> None:
    """FSS_FAST_PATHS=0: an HSNet built and run in a fresh process calls no fast kernel."""
    script = """
import pytest, torch
from tests.models.test_speed_equivalence import spy_on_fast_kernels, _hsnet_episode
import fss.ops
from fss.models import HSNet
assert not fss.ops.use_fast_paths()
patch = pytest.MonkeyPatch()
calls = spy_on_fast_kernels(patch)
model = HSNet("resnet18").eval()
with torch.inference_mode():
    model.predict(*_hsnet_episode(64, 1), allow_empty_support=True)
print("fast kernel calls:", sum(calls.values()))
"""
    environment = {**os.environ, "FSS_FAST_PATHS": "0",
                   "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent)])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=SRC.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "fast kernel calls: 0"


@pytest.mark.parametrize("model", ["hsnet", "hdmnet"])
def test_config_key_reaches_the_model(compose_cfg, model) -> None:
    from hydra.utils import instantiate

    assert compose_cfg([f"model={model}", "data=synth"]).model.net.fast_paths is None
    cfg = compose_cfg([f"model={model}", "data=synth", "model.fast_paths=false"])
    backbone = "resnet18" if model == "hsnet" else "resnet_small"
    net = instantiate(cfg.model.net, backbone=backbone, weights=None)
    assert net.fast_paths is False


# ----------------------------------------------------------------------------- HDMNet
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
        with fast_paths(False):
            expected = model(query, supports, masks, allow_empty_support=True)
    assert (fast - expected).abs().max().item() <= LOGIT_TOLERANCE

    model.train()
    torch.manual_seed(12)
    loss = model.training_loss(query, supports, masks, target, allow_empty_support=True)["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad(loss, params)
    torch.manual_seed(12)  # the same dropout masks
    with fast_paths(False):
        reference_loss = model.training_loss(
            query, supports, masks, target, allow_empty_support=True)["loss"]
    reference_grads = torch.autograd.grad(reference_loss, params)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_switch_off_runs_no_fast_kernel_in_hdmnet(monkeypatch) -> None:
    torch.manual_seed(10)
    model = HDMNet("resnet_small", shot=2, strict_size=False).eval()
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(1, 3, 65, 65, generator=generator)
    supports = torch.randn(1, 2, 3, 65, 65, generator=generator)
    masks = _box_masks(1, 2, 65)
    calls = spy_on_fast_kernels(monkeypatch)
    with torch.no_grad():
        with fast_paths(False):
            reference = model(query, supports, masks)
        assert calls == {}
        fast = model(query, supports, masks)
    for kernel in ("fss.ops.attention.pruned_cross_attention",
                   "fss.ops.attention._fused_self_attention", "fss.ops.priors._pruned_prior",
                   "fss.ops.pyramid._conv2d_split", "fss.ops.pyramid.conv2d_in_boxes",
                   "fss.ops.folding.fold_batchnorms"):
        assert calls.get(kernel, 0) > 0, kernel
    assert (fast - reference).abs().max().item() <= LOGIT_TOLERANCE


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


def _learner_inputs(model: HSNet, size: int, shots: int) -> list:
    """The hypercorrelation pyramid HSNet's learner reads (dense levels), for an episode."""
    from fss.models.hsnet.correlation import mask_features
    from fss.ops.correlation import hypercorrelation_pyramid

    generator = torch.Generator().manual_seed(21)
    query = torch.randn(1, 3, size, size, generator=generator)
    supports = torch.randn(shots, 3, size, size, generator=generator)
    masks = _box_masks(1, shots, size).flatten(0, 1)
    with torch.no_grad():
        query_features, support_features = model._encode(query.expand(shots, -1, -1, -1),
                                                         supports)
        support_features = mask_features(support_features, masks)
        return hypercorrelation_pyramid(query_features, support_features, model.tap_groups,
                                        boxed=False)


@pytest.mark.parametrize("training", [True, False])
def test_hsnet_learner_traces_as_one_graph(training: bool) -> None:
    """`model.compile=true` compiles HSNet's learner: dynamo traces its forward (training
    with autograd, and inference) without a graph break. Breaks came from the product-path
    lookup, the support-matrix cache's data-pointer key and a strided ``out=`` add; each
    split the learner into frames that then recompiled per level."""
    torch.manual_seed(0)
    model = HSNet("resnet18").train(training)
    pyramid = _learner_inputs(model, 96, 1)
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        model.learner(pyramid)  # eager first: fills the support-matrix caches
        explanation = torch._dynamo.explain(model.learner)(pyramid)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_learner_trains_like_eager(monkeypatch) -> None:
    """Training steps with the compiled learner: the eager losses and learner gradients,
    also for a smaller last batch (a recompile), and dense levels for the compiled learner
    where eager reads boxes. With graph breaks in the 4D conv, its frames recompiled per
    level under dynamic shapes and inductor raised "cannot determine truth value of
    Relational" in the first step."""
    from fss.ops import correlation

    monkeypatch.setattr(correlation, "BOXED_MIN_POSITIONS", 0)  # boxes at 64² too
    boxed_calls = []
    original = correlation.hypercorrelation_pyramid

    def spy(*args, boxed=False, **kwargs):
        boxed_calls.append(boxed)
        return original(*args, boxed=boxed, **kwargs)

    monkeypatch.setattr("fss.models.hsnet.model.hypercorrelation_pyramid", spy)
    torch.manual_seed(0)
    model = HSNet("resnet18").train()
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 3, 64, 64, generator=generator)
    supports = torch.randn(2, 1, 3, 64, 64, generator=generator)
    masks = _box_masks(2, 1, 64)
    target = (torch.rand(2, 64, 64, generator=generator) > 0.5).long()
    results = []
    for compiled in (False, True):
        if compiled:
            torch._dynamo.reset()
            assert compile_trainable_children(model) == ["learner"]
        model.zero_grad(set_to_none=True)
        loss = model.training_loss(query, supports, masks, target)["loss"]
        loss.backward()
        grads = [p.grad.clone() for p in model.learner.parameters()]
        # An epoch's last, smaller batch: a new shape, a recompile.
        last = model.training_loss(query[:1], supports[:1], masks[:1], target[:1])["loss"]
        last.backward()
        results.append((torch.stack([loss.detach(), last.detach()]), grads))
    assert boxed_calls == [True, True, False, False]
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
    assert (compiled_losses - eager_losses).abs().max().item() <= 1e-5
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


FAST_AGAINST_REFERENCE = r"""
import json, torch
import fss.ops.correlation as correlation
import fss.ops.conv4d as conv4d
from fss.models import HSNet
from fss.ops import fast_paths
correlation.BOXED_MIN_POSITIONS = 0  # boxed levels at 128² too
ran = {"boxed": 0, "one_node": 0}
boxed, one_node = conv4d._boxed_conv, conv4d._SupportBranchAndPivots.apply
def count(name, original):
    def counted(*args):
        ran[name] += 1
        return original(*args)
    return counted
conv4d._boxed_conv = count("boxed", boxed)
conv4d._SupportBranchAndPivots.apply = count("one_node", one_node)
torch.manual_seed(0)
model = HSNet("resnet18").train()
generator = torch.Generator().manual_seed(5)
query = torch.randn(2, 3, 128, 128, generator=generator)
supports = torch.randn(2, 2, 3, 128, 128, generator=generator)
masks = torch.zeros(2, 2, 128, 128)
masks[..., 32:64, 24:96] = 1
target = torch.zeros(2, 128, 128, dtype=torch.long)
target[:, 40:80, 20:100] = 1
result = {"capability": torch.backends.cpu.get_cpu_capability()}
for fast in (True, False):
    with fast_paths(fast):
        loss = model.training_loss(query, supports, masks, target)["loss"]
        grads = torch.autograd.grad(loss, model.trainable_parameters())
        model.eval()
        with torch.inference_mode():
            logits = model.per_shot_logits(query, supports, masks)
        model.train()
    result[str(fast)] = (loss.detach(), grads, logits)
    if fast:
        result["ran"] = dict(ran)
(loss, grads, logits), (ref_loss, ref_grads, ref_logits) = result.pop("True"), result.pop("False")
result["loss"] = (loss - ref_loss).abs().item()
result["gradients"] = max(((g - r).abs().max() / r.abs().max().clamp(min=1e-6)).item()
                          for g, r in zip(grads, ref_grads))
result["logits"] = (logits - ref_logits).abs().max().item()
print(json.dumps(result))
"""


@pytest.mark.parametrize("caps", [False, True], ids=["no-caps", "avx2-caps"])
def test_hsnet_fast_paths_match_reference_under_isa_caps(caps: bool) -> None:
    """With and without the three AVX2 caps (a new process each: the libraries read them
    at start-up), HSNet's fast paths give the reference's training loss, learner
    gradients (through the boxed conv, the one-node support branch and GroupNorm's
    hand-written backward) and inference logits."""
    from tests.helpers.isa import run_json_script

    result = run_json_script(FAST_AGAINST_REFERENCE, caps)
    if caps:
        assert result["capability"] in ("AVX2", "DEFAULT")
    assert result["ran"]["boxed"] > 0 and result["ran"]["one_node"] > 0
    assert result["loss"] <= 1e-6
    # fp32 summation order: the two paths' convolution backwards run in different layouts
    # (1e-4 of a tensor's largest gradient measured on AVX2); a broken path is off by O(1).
    assert result["gradients"] <= 5e-4
    assert result["logits"] <= LOGIT_TOLERANCE
