"""fss.predict: your own images in (paths, PIL, numpy, tensors), masks at the query's size
out, exactly as evaluation at eval_resolution=original makes them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fss
from fss.data.io import resize_image, resize_label
from fss.data.transforms import image_to_tensor
from fss.lightning.few_shot_module import FewShotModule
from fss.prediction import input_spec, load_cached
from fss.utils.errors import ConfigError
from tests.helpers.config import ROOT
from tests.helpers.predict import (  # noqa: F401 - the *_fixture names are fixtures
    QUERY_SIZES,
    SIZES,
    checkpoints_fixture,
    files_fixture,
    make_checkpoint,
    models_fixture,
    save_png,
    write_files,
)


def test_fss_exports_predict_lazily():
    done = subprocess.run([sys.executable, "-c", "import sys, fss; assert 'torch' not in "
                           "sys.modules; from fss import predict; print(predict.__module__)"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fss.prediction"


def test_every_input_type_gives_the_same_mask(models, checkpoints, files):
    model = models["hsnet"]
    (support_path, mask_path), = files["supports"][:1]
    query_path = files["queries"] / "q1.png"
    query = np.array(Image.open(query_path))
    support = np.array(Image.open(support_path))
    mask = np.array(Image.open(mask_path))
    forms = {
        "path": (query_path, support_path, mask_path),
        "str": (str(query_path), str(support_path), str(mask_path)),
        "pil": (Image.open(query_path), Image.open(support_path), Image.open(mask_path)),
        "numpy": (query, support, mask),
        "tensor": (torch.from_numpy(query).permute(2, 0, 1).float() / 255,
                   torch.from_numpy(support).permute(2, 0, 1).float() / 255,
                   torch.from_numpy(mask)),
        "bool mask": (query, support, mask > 0),
    }
    results = {name: fss.predict(model, q, [s], [m]) for name, (q, s, m) in forms.items()}
    # The checkpoint path loads the same weights (once per process).
    results["checkpoint"] = fss.predict(checkpoints["hsnet"], query, [support], [mask])
    assert load_cached(checkpoints["hsnet"]) is model
    reference = results["path"]
    assert reference.shape == query.shape[:2] and reference.dtype == np.uint8
    assert set(np.unique(reference)) == {0, 1}  # neither all background nor all object
    for name, result in results.items():
        np.testing.assert_array_equal(result, reference, err_msg=name)
    # A list of queries gives a list, in order, each at its own size.
    listed = fss.predict(model, [query_path, files["queries"] / "q0.png"], [support], [mask])
    assert [r.shape for r in listed] == [QUERY_SIZES[1], QUERY_SIZES[0]]
    np.testing.assert_array_equal(listed[0], reference)


def _evaluation_episode(model, files, query_path, shots):
    """The episode as the data pipeline and evaluation at eval_resolution=original make
    it: images resized to the input size, masks nearest, the original size recorded."""
    spec = input_spec(model)
    size = (spec.size, spec.size)
    query = np.array(Image.open(query_path).convert("RGB"))
    images, masks = [], []
    for image_path, mask_path in files["supports"][:shots]:
        images.append(image_to_tensor(resize_image(np.array(Image.open(image_path).convert("RGB")),
                                                   size, spec.antialias).copy()))
        masks.append(torch.from_numpy(resize_label(np.array(Image.open(mask_path)) > 0, size)
                                      .astype(np.float32)))
    return {
        "query_img": image_to_tensor(resize_image(query, size, spec.antialias).copy())[None],
        "support_imgs": torch.stack(images)[None],
        "support_masks": torch.stack(masks)[None],
        "query_size_orig": torch.tensor([query.shape[:2]]),
    }


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("name", ["hsnet", "hdmnet"])
def test_prediction_is_evaluation_at_the_original_size(models, files, name, shots):
    """fss.predict = FewShotModule.predict_original_size on the pipeline's episode (HSNet
    votes its K shots, HDMNet takes all K); the probabilities are the softmax of the
    logits upsampled bilinearly (align_corners=True) to the query's size."""
    model = models[name]
    query_path = files["queries"] / "q1.png"
    supports = [image for image, _ in files["supports"][:shots]]
    masks = [mask for _, mask in files["supports"][:shots]]
    mask = fss.predict(model, query_path, supports, masks)
    probability = fss.predict(model, query_path, supports, masks, probabilities=True)

    batch = _evaluation_episode(model, files, query_path, shots)
    module = FewShotModule(model, eval_class_ids=[0])
    expected = module.predict_original_size(batch)[0].numpy()
    assert mask.shape == expected.shape == QUERY_SIZES[1]
    np.testing.assert_array_equal(mask, expected)
    assert 0.05 < mask.mean() < 0.95

    with torch.no_grad():
        if name == "hsnet":
            logits = model.per_shot_logits(batch["query_img"], batch["support_imgs"],
                                           batch["support_masks"])[0]  # (K, 2, h, w)
        else:
            logits = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
    upsampled = F.interpolate(logits, size=QUERY_SIZES[1], mode="bilinear", align_corners=True)
    expected_probability = upsampled.softmax(dim=1)[:, 1].mean(dim=0).numpy()
    assert probability.dtype == np.float32 and probability.shape == QUERY_SIZES[1]
    np.testing.assert_allclose(probability, expected_probability, atol=1e-6)
    if shots == 1:  # one shot: the mask is the probability above one half
        np.testing.assert_array_equal(mask, (probability > 0.5).astype(np.uint8))


def test_label_maps_and_resized_masks(models, files, tmp_path):
    model = models["hdmnet"]
    (image_path, mask_path), = files["supports"][:1]
    mask = np.array(Image.open(mask_path))
    expected = fss.predict(model, files["queries"] / "q0.png", [image_path], [mask_path])
    # A palette label map: the object is label 7, label 3 is something else.
    labels = np.where(mask > 0, 7, 0).astype(np.uint8)
    labels[:5] = 3
    label_map = Image.fromarray(labels, mode="P")
    label_map.putpalette([0, 0, 0] * 3 + [200, 0, 0] + [0, 0, 0] * 3 + [0, 200, 0] + [0] * 744)
    label_map.save(tmp_path / "labels.png")
    got = fss.predict(model, files["queries"] / "q0.png", [image_path], [tmp_path / "labels.png"],
                      mask_value=7)
    np.testing.assert_array_equal(got, expected)
    # A mask at another size: refused, or stretched (nearest) with resize_mask.
    small = Image.fromarray(mask).resize((mask.shape[1] // 2, mask.shape[0] // 2), Image.NEAREST)
    with pytest.raises(ConfigError, match=r"is 65x45 but its image .* is 130x90; .*resize_mask"):
        fss.predict(model, files["queries"] / "q0.png", [image_path], [small])
    stretched = fss.predict(model, files["queries"] / "q0.png", [image_path], [small],
                            resize_mask=True)
    assert stretched.shape == QUERY_SIZES[0]


def test_a_mask_with_many_values_warns(models, files, caplog):
    """Every non-zero value is the object, and a mask that looks like a label map or a
    JPEG-compressed mask says so."""
    (image_path, mask_path), = files["supports"][:1]
    noisy = np.array(Image.open(mask_path))
    noisy[noisy > 0] = 250
    noisy[:3] = 2  # faint values, as JPEG compression leaves them near edges
    query = files["queries"] / "q0.png"
    with caplog.at_level("WARNING", logger="fss.prediction"):
        got = fss.predict(models["hsnet"], query, [image_path], [noisy])
    assert "holds 3 distinct values (0, 2, 250 ...); every non-zero pixel counts" in caplog.text
    np.testing.assert_array_equal(got, fss.predict(models["hsnet"], query, [image_path],
                                                   [noisy > 0]))


def test_api_errors_name_the_input(models, files, tmp_path):
    model = models["hsnet"]
    (image_path, mask_path), = files["supports"][:1]
    query = files["queries"] / "q0.png"
    empty = save_png(np.zeros((90, 130), np.uint8), tmp_path / "empty.png")
    with pytest.raises(ConfigError, match=f"the support mask for {image_path} is empty"):
        fss.predict(model, query, [image_path], [empty])
    with pytest.raises(ConfigError, match="the support mask for .* is empty once resized"):
        tiny = np.zeros((90, 130), np.uint8)
        tiny[44, 64] = 1  # one pixel that nearest resizing to 64x64 skips
        fss.predict(model, query, [image_path], [tiny])
    with pytest.raises(ConfigError, match="2 support images but 1 masks"):
        fss.predict(model, query, [image_path, image_path], [mask_path])
    with pytest.raises(ConfigError, match=r"query 1 must hold values in \[0, 1\]"):
        fss.predict(model, torch.full((3, 20, 20), 3.0), [image_path], [mask_path])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ConfigError, match=f"support image {not_image} is not an image"):
        fss.predict(model, query, [not_image], [mask_path])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this machine has no CUDA device"):
            fss.predict(model, query, [image_path], [mask_path], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hsnet", "hdmnet"])
def test_cuda_gives_the_cpu_masks(checkpoints, files, name):
    """On a GPU the models take their accelerator paths (no host-side boxes); the masks
    agree with the CPU's except where the two logits are within rounding."""
    model = load_cached(checkpoints[name])
    supports = [image for image, _ in files["supports"][:2]]
    masks = [mask for _, mask in files["supports"][:2]]
    query = files["queries"] / "q1.png"
    cpu = fss.predict(model, query, supports, masks, probabilities=True)
    gpu = fss.predict(model, query, supports, masks, device="cuda", probabilities=True)
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)  # cuDNN may convolve in TF32
    assert (fss.predict(model, query, supports, masks, device="cuda")
            != fss.predict(model, query, supports, masks)).mean() < 0.01
    model.to("cpu")
