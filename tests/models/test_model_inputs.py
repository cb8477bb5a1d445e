"""The models' public entry points reject bad episodes with one InputError sentence.

HSNet (resnet18, 64²), HDMNet (resnet_small, 65²) and the prototype baseline share
``fss.models.inputs.check_episode``; every rejection is checked on every entry point.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

import fss.models.inputs
from fss.data.transforms import image_to_tensor
from fss.models import HDMNet, HSNet, PrototypeBaseline
from fss.models.inputs import check_episode, empty_support_kwargs
from fss.utils.errors import InputError

torch.set_num_threads(1)
SIZES = {"hsnet": 64, "hdmnet": 65, "proto": 64}  # HDMNet: (H - 1) % 8 == 0
ENTRIES = {
    "hsnet": ("forward", "predict", "per_shot_logits", "training_loss"),
    "hdmnet": ("forward", "predict", "correlation_maps", "training_loss"),
    "proto": ("forward", "predict", "similarity"),
}


@functools.lru_cache
def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "hsnet":
        return HSNet("resnet18").eval()
    if name == "hdmnet":
        return HDMNet("resnet_small").eval()
    return PrototypeBaseline("resnet18").eval()


def episode(size: int, batch: int = 2, shots: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = torch.zeros(batch, shots, size, size)
    masks[..., size // 4: 3 * size // 4, size // 5: 4 * size // 5] = 1
    return query, supports, masks


def query_mask_of(size: int, batch: int = 2) -> torch.Tensor:
    target = torch.zeros(batch, size, size, dtype=torch.long)
    target[:, size // 3: 2 * size // 3, size // 4: 3 * size // 4] = 1
    target[:, 0] = 255
    return target


def call(name: str, entry: str, query, supports, masks, **kwargs):
    method = getattr(model(name), entry)
    if entry == "training_loss":
        return method(query, supports, masks, query_mask_of(SIZES[name]), **kwargs)
    return method(query, supports, masks, **kwargs)


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 50 + 128).clamp(0, 255).to(torch.uint8)


def _nan_in_query(q, s, m):
    q = q.clone()
    q[1, 0, 3, 4] = float("nan")
    return q, s, m


def _inf_in_supports(q, s, m):
    s = s.clone()
    s[0, 1, 2, 5, 5] = float("inf")
    return q, s, m


def _ignore_label(q, s, m):
    m = m.clone()
    m[0, 1, 0, :4] = 255
    return q, s, m


def _empty_shot(q, s, m):
    m = m.clone()
    m[1, 1] = 0
    return q, s, m


# (case, episode -> bad episode, phrases the message must contain; {S} = the size)
CASES = [
    ("uint8_query", lambda q, s, m: (_uint8(q), s, m),
     ["query_img must be floating-point ImageNet-normalised RGB, got dtype torch.uint8 "
      "(raw 0-255 pixels)", "fss.data.transforms.image_to_tensor"]),
    ("uint8_supports", lambda q, s, m: (q, _uint8(s), m),
     ["support_imgs must be floating-point", "torch.uint8", "image_to_tensor"]),
    ("nan_query", _nan_in_query,
     ["query_img must be finite, got 1 non-finite value (1 NaN, 0 inf; first at episode 1)"]),
    ("inf_supports", _inf_in_supports,
     ["support_imgs must be finite, got 1 non-finite value (0 NaN, 1 inf; first at "
      "episode 0, shot 1)"]),
    ("hwc_query", lambda q, s, m: (q.permute(0, 2, 3, 1), s, m),
     ["query_img must be (B, 3, H, W), got shape (2, {S}, {S}, 3), a channels-last "
      "(B, H, W, 3) HWC layout; pass query_img.permute(0, 3, 1, 2)"]),
    ("hwc_supports", lambda q, s, m: (q, s.permute(0, 1, 3, 4, 2), m),
     ["support_imgs must be (B, K, 3, H, W), got shape (2, 2, {S}, {S}, 3)", "HWC layout",
      "support_imgs.permute(0, 1, 4, 2, 3)"]),
    ("query_without_batch", lambda q, s, m: (q[0], s, m),
     ["query_img must be (B, 3, H, W), got shape (3, {S}, {S})", "query_img.unsqueeze(0)"]),
    ("supports_without_shots", lambda q, s, m: (q, s[:, 0], m),
     ["support_imgs must be (B, K, 3, H, W), got shape (2, 3, {S}, {S}), no shot dimension"]),
    ("zero_shots", lambda q, s, m: (q, s[:, :0], m[:, :0]),
     ["support_imgs must be (B, K, 3, H, W), got shape (2, 0, 3, {S}, {S}), K = 0 shots"]),
    ("masks_with_channel", lambda q, s, m: (q, s, m[:, :, None]),
     ["support_masks must be (B, K, H, W) = (2, 2, {S}, {S}) like the images, got shape "
      "(2, 2, 1, {S}, {S})", "support_masks.squeeze(2)"]),
    ("batch_mismatch", lambda q, s, m: (q, s[:1], m[:1]),
     ["support_imgs must be (B, K, 3, H, W) with query_img's B = 2, got B = 1"]),
    ("shot_mismatch", lambda q, s, m: (q, s, m[:, :1]),
     ["support_masks must be (B, K, H, W) = (2, 2, {S}, {S}) like the images, got shape "
      "(2, 1, {S}, {S})"]),
    ("size_mismatch", lambda q, s, m: (q, s[..., :-8, :], m[..., :-8, :]),
     ["support_imgs must be (B, K, 3, H, W) at query_img's size {S}x{S}, got {S8}x{S}"]),
    ("dtype_mismatch", lambda q, s, m: (q, s.double(), m),
     ["support_imgs must have query_img's dtype torch.float32, got torch.float64"]),
    ("masks_not_a_tensor", lambda q, s, m: (q, s, m.numpy()),
     ["support_masks must be a torch.Tensor, got ndarray"]),
    ("mask_0_255_float", lambda q, s, m: (q, s, m * 255),
     ["support_masks must hold only 0 and 1, got values {0, 255} (first at episode 0, "
      "shot 0), a 0/255 image mask", "(support_masks > 0).float()", "divide it by 255"]),
    ("mask_0_255_uint8", lambda q, s, m: (q, s, (m * 255).to(torch.uint8)),
     ["support_masks must hold only 0 and 1, got values {0, 255}", "a 0/255 image mask"]),
    ("mask_ignore_label", _ignore_label,
     ["support_masks must hold only 0 and 1, got values {0, 1, 255} (first at episode 0, "
      "shot 1)", "(support_masks == 1).float()"]),
    ("mask_soft", lambda q, s, m: (q, s, m * 0.5),
     ["support_masks must hold only 0 and 1, got values {0, 0.5}", "(support_masks > 0.5)"]),
    ("mask_empty_shot", _empty_shot,
     ["support_masks[1, 1] is all zero (1 of 4 support masks empty)", "allow_empty_support=True"]),
    ("mask_all_empty", lambda q, s, m: (q, s, torch.zeros_like(m)),
     ["support_masks[0, 0] is all zero (4 of 4 support masks empty)"]),
]
ENTRY_CASES = [(name, entry) for name, entries in ENTRIES.items() for entry in entries]


@pytest.mark.parametrize(("name", "entry"), ENTRY_CASES)
@pytest.mark.parametrize(("case", "corrupt", "phrases"), CASES, ids=[c[0] for c in CASES])
def test_entry_points_reject_bad_episodes(name, entry, case, corrupt, phrases) -> None:
    size = SIZES[name]
    bad = corrupt(*episode(size))
    with pytest.raises(InputError) as caught:
        call(name, entry, *bad)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert re.match(r"(query_img|support_imgs|support_masks)\b", message), message
    for phrase in phrases:
        assert phrase.replace("{S8}", str(size - 8)).replace("{S}", str(size)) in message, message


def test_valid_episodes_pass_every_entry_point() -> None:
    """The cases above fail because of their corruption, not of the clean episode."""
    for name, entry in ENTRY_CASES:
        with torch.no_grad():
            out = call(name, entry, *episode(SIZES[name]))
        assert out is not None


@pytest.mark.parametrize("name", ["hsnet", "hdmnet"])
def test_0_255_masks_are_rejected_identically_by_both_models(name) -> None:
    query, supports, masks = episode(SIZES[name], batch=1, shots=1)
    with pytest.raises(InputError) as caught:
        model(name).predict(query, supports, masks * 255)
    assert str(caught.value) == (
        "support_masks must hold only 0 and 1, got values {0, 255} (first at episode 0, "
        "shot 0), a 0/255 image mask; binarise it with support_masks = "
        "(support_masks > 0).float() or divide it by 255")


@pytest.mark.parametrize("name", ["hsnet", "hdmnet", "proto"])
def test_binary_masks_in_any_dtype_give_identical_logits(name) -> None:
    query, supports, masks = episode(SIZES[name], seed=1)
    with torch.no_grad():
        reference = model(name)(query, supports, masks)
        for dtype in (torch.bool, torch.uint8, torch.int64, torch.float64):
            logits = model(name)(query, supports, masks.to(dtype))
            assert torch.equal(logits, reference), dtype
        # and a different mask gives different logits: the comparison can fail
        shifted = torch.roll(masks, shifts=SIZES[name] // 8, dims=-1)
        assert not torch.equal(model(name)(query, supports, shifted), reference)


@pytest.mark.parametrize("name", ["hsnet", "hdmnet", "proto"])
def test_allow_empty_support_runs_and_gives_finite_logits(name) -> None:
    size = SIZES[name]
    query, supports, masks = episode(size)
    masks[1, 1] = 0  # one empty shot
    masks[0] = 0  # an episode whose supports are all empty
    with torch.no_grad():
        logits = model(name)(query, supports, masks, allow_empty_support=True)
        prediction = model(name).predict(query, supports, masks, allow_empty_support=True)
    assert logits.shape == (2, 2, size, size)
    assert torch.isfinite(logits).all()
    assert prediction.shape == (2, size, size)
    assert set(prediction.unique().tolist()) <= {0, 1}


def test_allow_empty_support_reaches_every_entry_point() -> None:
    for name, entry in ENTRY_CASES:
        query, supports, masks = episode(SIZES[name])
        masks[1, 1] = 0
        with torch.no_grad():
            out = call(name, entry, query, supports, masks, allow_empty_support=True)
        tensors = out.values() if isinstance(out, dict) else out if isinstance(out, list) else [out]
        assert all(torch.isfinite(t.float()).all() for t in tensors), (name, entry)


@pytest.mark.parametrize("name", ["hsnet", "hdmnet"])
def test_training_loss_checks_the_query_mask(name) -> None:
    size = SIZES[name]
    query, supports, masks = episode(size)
    target = query_mask_of(size)
    target[0, 5, 5] = 2
    with pytest.raises(InputError, match=re.escape(
            "query_mask must hold 0 (background), 1 (foreground) or 255 (ignore), got values "
            "{0, 1, 2, 255}")):
        model(name).training_loss(query, supports, masks, target)
    with pytest.raises(InputError, match=re.escape(
            f"query_mask must be (B, H, W) = (2, {size}, {size}) like query_img, got shape "
            f"(2, 1, {size}, {size}), a channel dimension; pass query_mask.squeeze(1)")):
        model(name).training_loss(query, supports, masks, query_mask_of(size)[:, None])


def test_hsnet_size_rule_comes_before_the_value_checks() -> None:
    query, supports, masks = episode(60)
    with pytest.raises(InputError, match="multiples of 8 and at least 32 for HSNet, got 60x60"):
        model("hsnet")(query, supports, torch.zeros_like(masks))


def test_the_named_image_helper_exists() -> None:
    image = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()
    tensor = image_to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 8, 8)
    check_episode(tensor[None], tensor[None, None], torch.ones(1, 1, 8, 8))


# ------------------------------------------------------------------ tracing / compiling
@pytest.mark.parametrize(("owner", "flag"), [(torch.compiler, "is_compiling"),
                                            (torch.jit, "is_tracing"),
                                            (torch.onnx, "is_in_onnx_export")])
def test_value_checks_are_skipped_while_tracing(monkeypatch, owner, flag) -> None:
    query, supports, masks = episode(16)
    query[0, 0, 0, 0] = float("nan")
    masks[0, 0] = 0
    with pytest.raises(InputError, match="query_img must be finite"):
        check_episode(query, supports, masks * 255)
    monkeypatch.setattr(owner, flag, lambda: True)
    converted = check_episode(query, supports, masks * 255)  # no value check, no host sync
    assert converted.dtype == query.dtype
    with pytest.raises(InputError, match="HWC layout"):  # layouts are still checked
        check_episode(query.permute(0, 2, 3, 1), supports, masks)


def _traced_warnings(fn, inputs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(fn, inputs)
    torch.testing.assert_close(traced(*inputs), fn(*inputs))
    return [str(w.message) for w in caught]


def test_jit_trace_reads_no_values(monkeypatch) -> None:
    """Under torch.jit.trace the value checks, whose one host read is a .tolist(), are
    skipped (shape checks only read static sizes)."""
    inputs = episode(16)

    def fn(q, s, m):
        return check_episode(q, s, m) * 2

    assert not [w for w in _traced_warnings(fn, inputs) if "Python list" in w]
    monkeypatch.setattr(fss.models.inputs, "tracing", lambda: False)  # what it would do
    assert [w for w in _traced_warnings(fn, inputs) if "Python list" in w]


def test_torch_compile_traces_the_checks_without_graph_breaks() -> None:
    query, supports, masks = episode(16)

    def fn(q, s, m):
        return check_episode(q, s, m) * 2

    compiled = torch.compile(fn, backend="eager", fullgraph=True)  # a graph break would fail
    torch.testing.assert_close(compiled(query, supports, masks.bool()), masks * 2)
    # A rejection still reaches the caller as the same sentence (dynamo falls back to eager).
    compiled = torch.compile(fn, backend="eager", dynamic=False)
    with pytest.raises(InputError, match=re.escape("got shape (2, 16, 16, 3), a channels-last")):
        compiled(query.permute(0, 2, 3, 1), supports, masks)


# ------------------------------------------------------------------ callers
def test_empty_support_kwargs_follow_the_signature() -> None:
    allowed = {"allow_empty_support": True}
    assert empty_support_kwargs(model("hsnet").predict) == allowed
    assert empty_support_kwargs(model("hsnet")) == allowed  # a module: its forward
    assert empty_support_kwargs(model("hdmnet").training_loss) == allowed
    assert empty_support_kwargs(lambda query_img, support_imgs, support_masks: None) == {}
    assert empty_support_kwargs(torch.nn.Identity()) == {}


def test_evaluation_accepts_dataset_episodes_with_an_empty_support() -> None:
    from fss.lightning import FewShotModule

    query, supports, masks = episode(64)
    masks[1, 0] = 0
    batch = {"query_img": query, "support_imgs": supports, "support_masks": masks,
             "query_mask": query_mask_of(64), "class_id": torch.tensor([0, 1])}
    module = FewShotModule(model("hsnet"), eval_class_ids=[0, 1])
    with torch.no_grad():
        module.test_step(batch, 0)
        original = module.predict_original_size(
            {**batch, "query_size_orig": torch.tensor([[30, 40], [64, 64]])})
    assert module.test_iou.compute()["episodes"].item() == 2
    assert [tuple(p.shape) for p in original] == [(30, 40), (64, 64)]
    with pytest.raises(InputError, match=r"support_masks\[1, 0\] is all zero"):
        model("hsnet").predict(query, supports, masks)  # the model alone still refuses it
