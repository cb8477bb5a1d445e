"""fss.predict and fss-predict: your own images in, masks at the query's size out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fss
from fss import predict_cli
from fss.data.io import resize_image, resize_label
from fss.data.transforms import image_to_tensor
from fss.lightning.few_shot_module import FewShotModule
from fss.prediction import input_spec, load_cached
from fss.utils.errors import ConfigError
from tests.predict_helpers import SIZES, box_mask, make_checkpoint, random_image, save_png

ROOT = Path(__file__).resolve().parents[1]
# Queries of odd sizes and aspect ratios: the masks must come back at exactly these sizes.
QUERY_SIZES = [(77, 51), (120, 161), (64, 64)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, directory) for name in SIZES}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict[str, torch.nn.Module]:
    return {name: load_cached(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Support images (different sizes) with 0/255 masks, and a folder of queries."""
    directory = tmp_path_factory.mktemp("images")
    supports = []
    for index, (height, width) in enumerate([(90, 130), (70, 70), (100, 60), (81, 97), (64, 120)]):
        image = save_png(random_image(height, width, seed=index), directory / f"s{index}.png")
        mask = save_png(box_mask(height, width), directory / f"s{index}_label.png")
        supports.append((image, mask))
    queries = directory / "queries"
    queries.mkdir()
    for index, (height, width) in enumerate(QUERY_SIZES):
        save_png(random_image(height, width, seed=10 + index), queries / f"q{index}.png")
    return {"dir": directory, "supports": supports, "queries": queries}


def support_args(files, shots: int) -> list[str]:
    args = []
    for image, mask in files["supports"][:shots]:
        args += ["--support", str(image), str(mask)]
    return args


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------ API
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


# ------------------------------------------------------------------------------ CLI
def test_cli_writes_masks_overlays_and_probabilities(checkpoints, models, files, tmp_path,
                                                     capsys):
    out = tmp_path / "out"
    extra = files["dir"] / "extra.png"  # a file next to a folder, in any order
    save_png(random_image(40, 72, seed=99), extra)
    code, stdout, stderr = run_cli(
        ["--checkpoint", checkpoints["hdmnet"], *support_args(files, 2),
         "--query", files["queries"], extra, "--out", out, "--probabilities",
         "--batch-size", "2"], capsys)
    assert code == 0, stderr
    assert "hdmnet on resnet_small, 65x65 input, 2-shot, 4 queries" in stdout
    assert "wrote 4 of 4 masks" in stdout
    queries = sorted(files["queries"].glob("*.png")) + [extra]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{q.stem}_{kind}" for q in queries
        for kind in ("mask.png", "overlay.png", "prob.npy", "prob.png"))
    supports = [image for image, _ in files["supports"][:2]]
    masks = [mask for _, mask in files["supports"][:2]]
    for query in queries:
        image = np.array(Image.open(query))
        written = np.array(Image.open(out / f"{query.stem}_mask.png"))
        assert written.shape == image.shape[:2] and written.dtype == np.uint8
        assert set(np.unique(written)) <= {0, 255}
        np.testing.assert_array_equal(written, 255 * fss.predict(models["hdmnet"], query,
                                                                 supports, masks))
        overlay = np.array(Image.open(out / f"{query.stem}_overlay.png"))
        assert overlay.shape == image.shape
        changed = (overlay != image).any(axis=2)
        assert not changed[written == 0].any()  # background pixels untouched
        assert changed[written == 255].mean() > 0.9  # object pixels tinted
        probability = np.load(out / f"{query.stem}_prob.npy")
        assert probability.dtype == np.float32 and probability.shape == image.shape[:2]
        assert 0 <= probability.min() and probability.max() <= 1
        sixteen = Image.open(out / f"{query.stem}_prob.png")
        assert sixteen.mode.startswith("I;16") or sixteen.mode == "I"
        np.testing.assert_array_equal(np.array(sixteen), np.round(probability * 65535))


def test_cli_five_shots_label_maps_and_hsnet(checkpoints, files, tmp_path, capsys):
    directory = tmp_path / "labels"
    directory.mkdir()
    argv = []
    for index, (image, mask) in enumerate(files["supports"]):
        labels = np.where(np.array(Image.open(mask)) > 0, 2, 1).astype(np.uint8)
        argv += ["--support", image, save_png(labels, directory / f"{index}.png")]
    code, stdout, stderr = run_cli(["--checkpoint", checkpoints["hsnet"], *argv, "--mask-value",
                                    "2", "--query", files["queries"] / "q2.png", "--out",
                                    tmp_path / "out", "--model", "hsnet", "--backbone",
                                    "resnet18"], capsys)
    assert code == 0, stderr
    assert "5-shot, 1 query" in stdout
    mask = np.array(Image.open(tmp_path / "out" / "q2_mask.png"))
    expected = fss.predict(checkpoints["hsnet"], files["queries"] / "q2.png",
                           [image for image, _ in files["supports"]],
                           [mask for _, mask in files["supports"]])
    np.testing.assert_array_equal(mask, 255 * expected)


def _bad_inputs(files, checkpoints, tmp_path):
    (image, mask), = files["supports"][:1]
    query = files["queries"] / "q0.png"
    empty = save_png(np.zeros((90, 130), np.uint8), tmp_path / "empty.png")
    small = save_png(box_mask(45, 65), tmp_path / "small.png")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    base = ["--checkpoint", checkpoints["hsnet"]]
    cases = [
        (["--checkpoint", tmp_path / "none.ckpt", "--support", image, mask],
         f"--checkpoint {tmp_path / 'none.ckpt'} does not exist"),
        ([*base, "--support", tmp_path / "none.png", mask],
         f"support image {tmp_path / 'none.png'} does not exist"),
        ([*base, "--support", text, mask], f"support image {text} is not an image PIL can read"),
        ([*base, "--support", image, empty], f"the support mask for {image} is empty"),
        ([*base, "--support", image, small],
         f"the support mask {small} is 65x45 but its image {image} is 130x90"),
        ([*base, "--support", image, mask, "--model", "hdmnet"],
         "holds the hsnet model (resnet18), not --model hdmnet"),
        ([*base, "--support", image, mask, "--backbone", "resnet50"],
         "holds the hsnet model on resnet18, not --backbone resnet50"),
        (["--support", image, mask, "--model", "hsnet"],
         "--model hsnet would run untrained weights"),
        (["--support", image, mask], "no --checkpoint: pass --checkpoint CKPT"),
        ([*base, "--support", image, mask, "--batch-size", "0"], "--batch-size 0 must be >= 1"),
        ([*base, "--support", image, mask, "--size", "60"],
         "input size 60x60 does not suit HSNet"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*base, "--support", image, mask, "--device", "cuda"],
                      "device='cuda' but this machine has no CUDA device"))
    return [(argv + ["--query", query], phrase) for argv, phrase in cases] + [
        ([*base, "--support", image, mask, "--query", tmp_path / "nowhere.png"],
         f"query image {tmp_path / 'nowhere.png'} does not exist"),
        ([*base, "--support", image, mask, "--query", tmp_path / "labels"],
         f"query folder {tmp_path / 'labels'} holds no image file"),
    ]


def test_cli_bad_input_is_one_line_and_exit_2(checkpoints, files, tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    for argv, phrase in _bad_inputs(files, checkpoints, tmp_path):
        out = tmp_path / "out"
        code, stdout, stderr = run_cli([*argv, "--out", out], capsys)
        lines = stderr.strip().splitlines()
        assert code == 2, (argv, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, stderr)
        assert phrase in lines[0], (phrase, lines[0])
        assert not out.exists() or not any(out.iterdir()), argv


def test_cli_resize_mask_accepts_another_size(checkpoints, files, tmp_path, capsys):
    (image, _), = files["supports"][:1]
    small = save_png(box_mask(45, 65), tmp_path / "small.png")
    code, _, stderr = run_cli(["--checkpoint", checkpoints["hsnet"], "--support", image, small,
                               "--resize-mask", "--query", files["queries"] / "q0.png", "--out",
                               tmp_path / "out"], capsys)
    assert code == 0, stderr
    assert np.array(Image.open(tmp_path / "out" / "q0_mask.png")).shape == QUERY_SIZES[0]


def test_cli_a_failed_query_is_listed_and_exits_1(checkpoints, files, tmp_path, capsys):
    queries = tmp_path / "queries"
    queries.mkdir()
    for source in sorted(files["queries"].glob("*.png"))[:2]:
        (queries / source.name).write_bytes(source.read_bytes())
    whole = (files["queries"] / "q2.png").read_bytes()
    (queries / "cut.png").write_bytes(whole[: len(whole) // 2])  # a valid header, cut short
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["--checkpoint", checkpoints["hsnet"], *support_args(files, 1),
                                    "--query", queries, "--out", out], capsys)
    assert code == 1
    assert "wrote 2 of 3 masks" in stdout
    assert f"error: 1 of 3 queries failed, nothing written for them: {queries / 'cut.png'}" \
        in stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "q0_mask.png", "q0_overlay.png", "q1_mask.png", "q1_overlay.png"]


def test_cli_untrained_model_needs_the_flag_and_warns(files, tmp_path, capsys, caplog):
    code, stdout, stderr = run_cli(["--model", "hdmnet", "--backbone", "resnet_small",
                                    "--allow-untrained", "--size", "65", *support_args(files, 1),
                                    "--query", files["queries"] / "q0.png", "--out",
                                    tmp_path / "out"], capsys)
    assert code == 0, stderr
    assert "untrained weights" in caplog.text and "meaningless" in caplog.text
    assert np.array(Image.open(tmp_path / "out" / "q0_mask.png")).shape == QUERY_SIZES[0]


def test_console_entry_point_exit_status(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fss.predict_cli", "--checkpoint", str(tmp_path / "x.ckpt"),
         "--support", "a.png", "a_mask.png", "--query", "b.png", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --checkpoint {tmp_path / 'x.ckpt'} does not exist; "
                                   "pass a run's checkpoint (<run dir>/checkpoints/last.ckpt) "
                                   "or an official file")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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
