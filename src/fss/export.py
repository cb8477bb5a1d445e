"""``fss-export``: an HSNet or HDMNet checkpoint as an ONNX or TorchScript file.

The exported graph takes one batch of episodes at ONE fixed shape, chosen at export:

- ``query_img`` (B, 3, H, W) float32, RGB ImageNet-normalised (as
  :func:`fss.data.transforms.image_to_tensor`), resized to H x W (``--size``);
- ``support_imgs`` (B, K, 3, H, W) float32, the same;
- ``support_masks`` (B, K, H, W) float32 in {0, 1}, each with some foreground;

and returns ``logits`` (B, 2, H, W) float32 (channel 1 = foreground; HSNet, K > 1: the mean
of the per-shot logits, as its ``forward``) and ``mask`` (B, H, W) int64 in {0, 1} (the
rule of evaluation: argmax, HSNet's K-shot vote). No input dimension is dynamic: B
(``--batch``, default 1), K (``--shot``) and H x W (``--size``) are fixed, because the
models' Python loops over the batch and the shots and their size-dependent layout
choices are unrolled / specialised when traced. Export one file per shape you need.

The graph is the models' straightforward path: the CPU fast paths of inference (support
boxes read on the host, pruned products, BatchNorm-folded backbone copies) decide on
the mask's values in Python, which a trace would freeze for the example inputs; they are
switched off while exporting (``fss.ops.fast_paths(False)``, see
:func:`straightforward_paths`). The result matches the PyTorch model within float rounding
(``tests/export/test_export.py``: 1e-4 on random inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.utils.errors import ConfigError, InputError

FORMATS = ("onnx", "torchscript")
INPUT_NAMES = ("query_img", "support_imgs", "support_masks")
OUTPUT_NAMES = ("logits", "mask")
ONNX_OPSET = 18
EXIT_BAD_INPUT = 2


class EpisodeGraph(nn.Module):
    """The exported function: (query_img, support_imgs, support_masks) -> (logits, mask),
    see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # A frozen copy: the graph is traced without autograd, and its constants must not
        # ask for gradients when the exported file runs (the model given stays as it is).
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if hasattr(self.model, "fast_paths"):  # a model's own setting wins over the switch
            self.model.fast_paths = False

    def forward(self, query_img: Tensor, support_imgs: Tensor,
                support_masks: Tensor) -> tuple[Tensor, Tensor]:
        from fss.lightning.few_shot_module import shot_logits

        logits, combine = shot_logits(self.model, query_img, support_imgs, support_masks)
        return logits.mean(dim=1), combine(logits)


@contextlib.contextmanager
def straightforward_paths() -> Iterator[None]:
    """Run the models on their straightforward code while the context is open: every
    kernel of :mod:`fss.ops` on its reference (``fss.ops.fast_paths(False)``: no support box
    read on the host, no pruned product, no folded backbone copy, no per-sample loops), and
    nearest resizes as gathers with PyTorch's indices (:func:`nearest_by_indices`).
    """
    from fss.ops import fast_paths

    plain_interpolate = F.interpolate

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        if mode == "nearest" and size is not None and input.dim() == 4:
            return nearest_by_indices(input, size)
        return plain_interpolate(input, size, scale_factor, mode, align_corners,
                                 recompute_scale_factor, antialias)

    F.interpolate = interpolate
    try:
        with fast_paths(False):
            yield
    finally:
        F.interpolate = plain_interpolate


def nearest_indices(source: int, target: int) -> Tensor:
    """The source index of each of ``target`` outputs of PyTorch's nearest resize:
    ``min(floor(i * (source / target)), source - 1)``, the scale a float32 division, as
    its CPU kernel computes it (so the rounding is the same)."""
    scale = torch.tensor(source, dtype=torch.float32) / torch.tensor(target, dtype=torch.float32)
    positions = torch.arange(target, dtype=torch.float32) * scale
    return positions.floor().long().clamp(max=source - 1)


def nearest_by_indices(input: Tensor, size) -> Tensor:
    """``F.interpolate(input, size, mode="nearest")`` of an (N, C, H, W) tensor as two
    gathers with constant indices.

    ONNX's Resize computes the source position from its own float scale (target / source)
    and can land one pixel before PyTorch's (65 -> 5 rows: source rows 0, 12, 25, 39, 51
    instead of 0, 13, 26, 39, 52; https://github.com/onnx/onnx/issues/3816,
    https://github.com/microsoft/onnxruntime/issues/28085). The support masks of HDMNet go
    through such resizes, so the export indexes explicitly.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rows = nearest_indices(input.shape[-2], height).to(input.device)
    columns = nearest_indices(input.shape[-1], width).to(input.device)
    return input.index_select(-2, rows).index_select(-1, columns)


def example_inputs(shot: int, size: tuple[int, int], batch: int = 1,
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random inputs of the exported shape: normalised-range images and masks whose
    foreground is a random rectangle per support (never empty)."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, height, width, generator=generator)
    supports = torch.randn(batch, shot, 3, height, width, generator=generator)
    masks = torch.zeros(batch, shot, height, width)
    for b in range(batch):
        for k in range(shot):
            top, left = (int(torch.randint(0, max(1, n // 2), (1,), generator=generator))
                         for n in (height, width))
            bottom = top + 1 + int(torch.randint(0, height - top, (1,), generator=generator))
            right = left + 1 + int(torch.randint(0, width - left, (1,), generator=generator))
            masks[b, k, top:bottom, left:right] = 1
    return query, supports, masks


def export(model: nn.Module, path: str | Path, fmt: str, shot: int, size: tuple[int, int],
           batch: int = 1) -> Path:
    """Writes ``model`` as ``fmt`` (``onnx`` | ``torchscript``) for (batch, shot, size)
    inputs to ``path``; returns the path."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    path = Path(path)
    graph = EpisodeGraph(model).eval()
    inputs = example_inputs(shot, size, batch)
    with straightforward_paths(), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns of every Python branch on a shape; the shape is fixed by design.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated by PyTorch (docs/own-images.md); asked for, it is written.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        _check_runs(graph, inputs)
        if fmt == "onnx":
            _export_onnx(graph, inputs, path)
        else:
            traced = torch.jit.trace(graph, inputs, check_trace=False)
            torch.jit.save(traced, str(path))
    return path


def _check_runs(graph: EpisodeGraph, inputs: tuple[Tensor, Tensor, Tensor]) -> None:
    """The model's size rule, then one eager pass (its episode checks)."""
    from fss.prediction import check_input_size

    check_input_size(graph.model, *inputs[0].shape[-2:])
    try:
        graph(*inputs)
    except InputError as error:
        raise ConfigError(f"the export shape does not suit the model: {error}") from None


def _export_onnx(graph: EpisodeGraph, inputs: tuple[Tensor, Tensor, Tensor], path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx and onnxscript packages: pip install "
                          "onnx onnxscript (or the fss[dev] extra)") from None
    # The exporter of torch.export graphs: the TorchScript-based one cannot export PSPNet's
    # adaptive pooling at sizes whose feature map is not a multiple of the bins (HDMNet).
    program = torch.onnx.export(graph, inputs, input_names=list(INPUT_NAMES),
                                output_names=list(OUTPUT_NAMES), opset_version=ONNX_OPSET,
                                dynamo=True, external_data=False, verbose=False)
    program.save(str(path))


# ------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fss-export",
        description="Export an HSNet or HDMNet checkpoint to ONNX or TorchScript for one "
                    "fixed input shape (batch, shots, size); see docs/own-images.md.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a run's checkpoint or an official HSNet / HDMNet file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--shot", required=True, type=int, metavar="K", help="support images per episode")
    p.add_argument("--size", required=True, type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width (e.g. the checkpoint's: 400 400 for HSNet)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="episodes per call (default 1)")
    p.add_argument("--out", required=True, metavar="FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.shot < 1:
            raise ConfigError(f"--shot {args.shot} must be >= 1")
        if args.batch < 1:
            raise ConfigError(f"--batch {args.batch} must be >= 1")
        if min(args.size) < 1:
            raise ConfigError(f"--size {args.size[0]} {args.size[1]} must be positive")
        out = Path(args.out).expanduser()
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
        from fss.prediction import model_name, resolve_model

        model = resolve_model(args.checkpoint)
        if model_name(model) not in ("hsnet", "hdmnet"):
            raise ConfigError(f"--checkpoint {args.checkpoint} holds the {model_name(model)} "
                              "model; fss-export takes HSNet and HDMNet checkpoints")
        export(model, out, args.format, args.shot, tuple(args.size), args.batch)
    except (ConfigError, InputError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"fss-export: wrote {out} ({args.format}; inputs {', '.join(INPUT_NAMES)} for "
          f"B={args.batch}, K={args.shot}, {args.size[0]}x{args.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
