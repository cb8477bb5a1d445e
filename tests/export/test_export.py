"""fss-export: the exported ONNX / TorchScript files compute what the PyTorch models do.

Each file is exported from one set of random inputs and run on ANOTHER set, whose support
masks cover other boxes: a graph that had frozen the example's mask-dependent choices
(the CPU fast paths read support boxes on the host) would fail here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fss import export as fss_export
from fss.export import INPUT_NAMES, example_inputs, nearest_by_indices
from fss.prediction import load_cached
from tests.helpers.predict import make_checkpoint

TOLERANCE = 1e-4
# Non-square sizes that each model accepts (HSNet: multiples of 8; the synthetic HDMNet
# checkpoint has strict_size=false).
SHAPES = {"hsnet": (64, 96), "hdmnet": (65, 81)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, directory) for name in SHAPES}


def reference(model, inputs):
    """The PyTorch model itself, fast paths included: (B, 2, H, W) logits (HSNet: its
    forward, the mean over shots) and the (B, H, W) mask of its predict."""
    with torch.no_grad():
        return model(*inputs), model.predict(*inputs)


def run_exported(path: Path, fmt: str, inputs):
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        logits, mask = module(*inputs)
        return logits.detach(), mask
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, mask = session.run(None, {name: tensor.numpy()
                                      for name, tensor in zip(INPUT_NAMES, inputs, strict=True)})
    return torch.from_numpy(logits), torch.from_numpy(mask)


def check_export(checkpoints, name, fmt, shot, tmp_path, batch=1):
    model = load_cached(checkpoints[name])
    size = SHAPES[name]
    path = fss_export.export(model, tmp_path / f"{name}.{fmt}", fmt, shot, size, batch)
    inputs = example_inputs(shot, size, batch, seed=7)  # not the export's example
    assert not torch.equal(inputs[2], example_inputs(shot, size, batch)[2])
    expected_logits, expected_mask = reference(model, inputs)
    logits, mask = run_exported(path, fmt, inputs)
    assert logits.shape == (batch, 2, *size) and mask.shape == (batch, *size)
    torch.testing.assert_close(logits, expected_logits, atol=TOLERANCE, rtol=0)
    # Pixels whose two logits are within the tolerance may flip; none other may.
    margin = expected_logits[:, 1] - expected_logits[:, 0]
    if name == "hsnet" and shot > 1:  # the vote: per-shot margins, not the mean's
        with torch.no_grad():
            per_shot = model.per_shot_logits(*inputs)
        margin = (per_shot[:, :, 1] - per_shot[:, :, 0]).abs().min(dim=1).values
    decided = margin.abs() > 2 * TOLERANCE
    assert torch.equal(mask.long()[decided], expected_mask[decided])
    assert 0.02 < expected_mask.float().mean() < 0.98  # the masks say something
    return path


@pytest.mark.parametrize("shot", [1, 2])
@pytest.mark.parametrize("name", ["hsnet", "hdmnet"])
def test_torchscript_matches_pytorch(checkpoints, name, shot, tmp_path):
    check_export(checkpoints, name, "torchscript", shot, tmp_path)


# torch.onnx's exporter: 15-30 s of CPU per file here.
@pytest.mark.parametrize(("name", "shot", "batch"), [
    ("hsnet", 1, 1), ("hsnet", 5, 2), ("hdmnet", 1, 1),
    pytest.param("hdmnet", 5, 1, marks=pytest.mark.slow)])
def test_onnx_matches_pytorch(checkpoints, name, shot, batch, tmp_path):
    path = check_export(checkpoints, name, "onnx", shot, tmp_path, batch)
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                           for d in value.type.tensor_type.shape.dim] for value in graph.input}
    # Nothing dynamic: B, K, H and W are those of the export (docs/own-images.md).
    height, width = SHAPES[name]
    assert shapes == {"query_img": [batch, 3, height, width],
                      "support_imgs": [batch, shot, 3, height, width],
                      "support_masks": [batch, shot, height, width]}


def test_explicit_nearest_resize_is_pytorchs():
    """The export's nearest resize (constant indices) picks PyTorch's source pixels at every
    size pair, including those where ONNX's Resize picks another one (65 -> 5)."""
    generator = torch.Generator().manual_seed(0)
    for source in range(1, 90, 4):
        for target in (*range(1, 70, 3), 2 * source):
            x = torch.randn(1, 2, source, source + 3, generator=generator)
            size = (target, target + 1)
            assert torch.equal(nearest_by_indices(x, size),
                               torch.nn.functional.interpolate(x, size=size, mode="nearest"))


def test_cli_exports_and_refuses_bad_shapes(checkpoints, tmp_path, capsys):
    out = tmp_path / "hsnet.pt"
    code = fss_export.main(["--checkpoint", str(checkpoints["hsnet"]), "--format", "torchscript",
                            "--shot", "2", "--size", "64", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "inputs query_img, support_imgs, support_masks for B=1, K=2, 64x64" in captured.out
    module = torch.jit.load(str(out))
    logits, mask = module(*example_inputs(2, (64, 64), seed=3))
    assert logits.shape == (1, 2, 64, 64) and set(np.unique(mask.numpy())) <= {0, 1}
    capsys.readouterr()  # torch.jit.load's deprecation warning

    bad = [
        (["--size", "60", "64"], "input size 60x64 does not suit HSNet"),
        (["--shot", "0"], "--shot 0 must be >= 1"),
        (["--out", str(tmp_path / "missing" / "x.onnx")], "the folder"),
        (["--checkpoint", str(tmp_path / "none.ckpt")], "does not exist"),
    ]
    for change, phrase in bad:
        argv = {"--checkpoint": str(checkpoints["hsnet"]), "--format": "onnx", "--shot": "1",
                "--size": ["64", "64"], "--out": str(tmp_path / "bad.onnx")}
        argv[change[0]] = change[1:] if change[0] == "--size" else change[1]
        flat = []
        for key, value in argv.items():
            flat += [key, *(value if isinstance(value, list) else [value])]
        code = fss_export.main(flat)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and phrase in err[0], (change, err)
        assert not (tmp_path / "bad.onnx").exists()
