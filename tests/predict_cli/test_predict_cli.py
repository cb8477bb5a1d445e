"""fss-predict end to end on image files: exit codes, output files, sizes and values."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import fss
from fss import predict_cli
from fss.prediction import load_cached
from tests.helpers.config import ROOT
from tests.helpers.predict import (  # noqa: F401 - the *_fixture names are fixtures
    QUERY_SIZES,
    SIZES,
    box_mask,
    checkpoints_fixture,
    files_fixture,
    make_checkpoint,
    models_fixture,
    random_image,
    save_png,
    support_args,
    write_files,
)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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




def test_cli_reads_an_official_hsnet_file(files, tmp_path, capsys):
    """An official best_model.pt (DataParallel keys, no run description): recognised by its
    keys, run at the official 400 px unless --size says otherwise, checked against --model."""
    from fss.models import HSNet
    from fss.models.checkpoint_io import to_official_state_dict
    from fss.prediction import input_spec

    torch.manual_seed(0)
    model = HSNet("resnet18", weights=None).eval()
    path = tmp_path / "best_model.pt"
    torch.save(to_official_state_dict(model.state_dict(), "hsnet", parallel=True), path)
    assert input_spec(load_cached(path)).size == 400
    query = files["queries"] / "q0.png"
    code, stdout, stderr = run_cli(["--checkpoint", path, *support_args(files, 1), "--query",
                                    query, "--out", tmp_path / "out", "--size", "64",
                                    "--model", "hsnet", "--backbone", "resnet18"], capsys)
    assert code == 0, stderr
    assert "hsnet on resnet18, 64x64 input, 1-shot, 1 query" in stdout
    model.checkpoint_info = {"input": {"image_size": 64}}  # the same weights, told 64 px
    expected = fss.predict(model, query, *zip(*files["supports"][:1], strict=True))
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / "q0_mask.png")),
                                  255 * expected)
    code, _, stderr = run_cli(["--checkpoint", path, *support_args(files, 1), "--query", query,
                               "--out", tmp_path / "out2", "--model", "hdmnet"], capsys)
    assert code == 2 and "holds the hsnet model (resnet18), not --model hdmnet" in stderr
