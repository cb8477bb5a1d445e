"""``fss-predict``: masks for your own query images from support images and their masks.

A thin layer over :class:`fss.prediction.Predictor` (the ``fss.predict`` API). Per query
``<name>.<ext>`` it writes, into ``--out``:

- ``<name>_mask.png``: the mask at the query's size, 0 (background) / 255 (object);
- ``<name>_overlay.png``: the query with the object tinted;
- with ``--probabilities``: ``<name>_prob.npy`` (float32 foreground probability) and
  ``<name>_prob.png`` (the same as a 16-bit greyscale PNG, ``round(p * 65535)``).

Exit status: 0 when every query was written; 2 for bad input (one line on stderr, nothing
run: a missing or unreadable file, an empty support mask, a mask of another size than its
image, a checkpoint of another model than ``--model``, ``--device cuda`` without CUDA);
1 when some queries failed during prediction (nothing is written for them; the others are,
and stderr lists the failed ones).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fss.utils.errors import ConfigError, InputError

log = logging.getLogger("fss.predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
OUTPUT_SUFFIXES = ("_mask", "_overlay", "_prob")  # fss-predict's own files, never queries
MODELS = ("hsnet", "hdmnet")
DEFAULT_BACKBONE = "resnet50"
TINT = np.array([255, 40, 40], dtype=np.float32)
TINT_ALPHA = 0.5
EXIT_FAILED_QUERIES = 1
EXIT_BAD_INPUT = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fss-predict",
        description="Segment query images like the objects marked in support images "
                    "(few-shot segmentation with a trained HSNet or HDMNet).",
        epilog="Exit status: 0 all written, 1 some queries failed (listed; nothing written "
               "for them), 2 bad input (one line, nothing run). See docs/own-images.md.")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="a run's checkpoint (e.g. <run dir>/checkpoints/last.ckpt) or an "
                        "official HSNet best_model.pt / HDMNet train_epoch_*.pth")
    p.add_argument("--support", nargs=2, action="append", metavar=("IMG", "MASK"), default=[],
                   required=True, help="a support image and its mask (repeat for K shots)")
    p.add_argument("--query", nargs="+", action="extend", metavar="IMG_OR_DIR", default=[],
                   required=True, help="query images and/or folders of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--mask-value", type=int, metavar="V",
                   help="masks are label maps: pixels == V are the object (default: non-zero)")
    p.add_argument("--resize-mask", action="store_true",
                   help="stretch a mask of another size than its image to it (nearest) "
                        "instead of refusing it")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <name>_prob.npy (float32) and <name>_prob.png (16-bit)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="queries per forward pass (default 8)")
    p.add_argument("--size", type=int, metavar="S",
                   help="input size (default: the checkpoint's; official files and untrained "
                        "models: HSNet 400, HDMNet 473 / 633 on COCO)")
    p.add_argument("--model", choices=MODELS,
                   help="the model the checkpoint must hold (checked), or the untrained model "
                        "to build without --checkpoint")
    p.add_argument("--backbone", metavar="B",
                   help=f"the backbone the checkpoint must have (checked), or the untrained "
                        f"model's (default {DEFAULT_BACKBONE})")
    p.add_argument("--allow-untrained", action="store_true",
                   help="without --checkpoint: run --model on untrained weights (the masks are "
                        "meaningless; a check of the command only)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        job = prepare(args)
    except (ConfigError, InputError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return job()


# ------------------------------------------------------------------------ checks
def prepare(args: argparse.Namespace) -> Callable[[], int]:
    """Every check, cheapest first, then the model and the supports; returns the job that
    predicts and writes. ConfigError / InputError for bad input."""
    from fss.prediction import open_image_file, read_supports, resolve_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.size is not None and args.size < 1:
        raise ConfigError(f"--size {args.size} must be a positive number of pixels")
    if args.mask_value is not None and args.mask_value < 0:
        raise ConfigError(f"--mask-value {args.mask_value} must be >= 0 (a label value)")
    device = resolve_device(args.device)
    if args.checkpoint is None:
        _check_untrained_request(args)
    elif not Path(args.checkpoint).expanduser().is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint} does not exist; pass a run's "
                          "checkpoint (<run dir>/checkpoints/last.ckpt) or an official file")
    for image, mask in args.support:
        open_image_file(image, "support image").close()
        open_image_file(mask, "support mask").close()
    queries = list_queries(args.query)
    for query in queries:
        open_image_file(query, "query image").close()
    names = output_names(queries)
    supports = read_supports([image for image, _ in args.support],
                             [mask for _, mask in args.support], mask_value=args.mask_value,
                             resize_mask=args.resize_mask)
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be created ({error.strerror}); pass a writable "
                          "folder") from None

    model = load(args)
    from fss.prediction import Predictor, backbone_name, model_name

    predictor = Predictor(model, supports, device=device, size=args.size)
    print(f"fss-predict: {model_name(model)} on {backbone_name(model)}, "
          f"{predictor.spec.size}x{predictor.spec.size} input, {predictor.shots}-shot, "
          f"{len(queries)} {'query' if len(queries) == 1 else 'queries'} -> {out}")
    folders = any(Path(q).expanduser().is_dir() for q in args.query)
    return lambda: predict_all(predictor, queries, names, out, args, progress=folders)


def _check_untrained_request(args: argparse.Namespace) -> None:
    if args.model is None:
        raise ConfigError("no --checkpoint: pass --checkpoint CKPT (a run's checkpoint or an "
                          "official HSNet / HDMNet file), or --model hsnet|hdmnet "
                          "--allow-untrained to check the command on untrained weights")
    if not args.allow_untrained:
        raise ConfigError(f"no --checkpoint: --model {args.model} would run untrained weights, "
                          "whose masks are meaningless; pass --checkpoint CKPT, or add "
                          "--allow-untrained to run them anyway")


def list_queries(entries: Sequence[str]) -> list[Path]:
    """The query files: each entry a file, or a folder whose image files (by suffix, not
    recursive, fss-predict's own outputs left out) are taken in name order."""
    queries: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.stem.endswith(OUTPUT_SUFFIXES))
            if not found:
                raise ConfigError(f"query folder {path} holds no image file "
                                  f"({', '.join(IMAGE_SUFFIXES)})")
            queries += found
        elif path.exists():
            queries.append(path)
        else:
            raise ConfigError(f"query image {path} does not exist")
    return list(dict.fromkeys(queries))


def output_names(queries: Sequence[Path]) -> list[str]:
    """The output name of each query (its file name without the suffix); ConfigError when
    two queries would write the same files."""
    seen: dict[str, Path] = {}
    for query in queries:
        other = seen.setdefault(query.stem, query)
        if other != query:
            raise ConfigError(f"queries {other} and {query} would both write "
                              f"{query.stem}_mask.png; rename one or run them separately")
    return [query.stem for query in queries]


def load(args: argparse.Namespace):
    """The model of ``--checkpoint`` (checked against ``--model`` / ``--backbone``), or an
    untrained ``--model`` (with ``--allow-untrained``)."""
    from fss.prediction import backbone_name, model_name, resolve_model

    if args.checkpoint is not None:
        model = resolve_model(args.checkpoint)
        found, backbone = model_name(model), backbone_name(model)
        if args.model is not None and found != args.model:
            raise ConfigError(f"--checkpoint {args.checkpoint} holds the {found} model "
                              f"({backbone}), not --model {args.model}; drop --model (the "
                              f"checkpoint says what it holds) or pass a checkpoint of {args.model}")
        if args.backbone is not None and backbone != args.backbone:
            raise ConfigError(f"--checkpoint {args.checkpoint} holds the {found} model on "
                              f"{backbone}, not --backbone {args.backbone}; drop --backbone or "
                              "pass a matching checkpoint")
        return model
    from fss.models import HDMNet, HSNet

    backbone = args.backbone or DEFAULT_BACKBONE
    try:
        if args.model == "hsnet":
            model = HSNet(backbone, weights=None)
        else:
            model = HDMNet(backbone, weights=None, strict_size=args.size is None)
    except ValueError as error:
        raise ConfigError(f"--backbone {backbone} does not suit --model {args.model}: "
                          f"{error}") from None
    log.warning("untrained weights (--allow-untrained, no --checkpoint): the masks are "
                "meaningless, a check of the command only")
    return model.eval()


# ----------------------------------------------------------------------- the job
def predict_all(predictor, queries: Sequence[Path], names: Sequence[str], out: Path,
                args: argparse.Namespace, progress: bool) -> int:
    """Predicts and writes every query, batch by batch; returns the exit status."""
    from tqdm import tqdm

    from fss.prediction import load_image

    failed: list[tuple[Path, str]] = []
    written = 0
    bar = tqdm(total=len(queries), unit="image", disable=not progress, file=sys.stderr,
               desc="fss-predict")
    for start in range(0, len(queries), args.batch_size):
        decoded = []
        for query, name in zip(queries[start:start + args.batch_size],
                               names[start:start + args.batch_size], strict=True):
            try:
                decoded.append((query, name, load_image(query, str(query), "query image")))
            except Exception as error:  # noqa: BLE001 - reported per query, the run goes on
                failed.append((query, _one_line(error)))
        for (query, name, image), result in zip(decoded, _run(predictor, decoded, args),
                                                strict=True):
            if isinstance(result, Exception):
                failed.append((query, _one_line(result)))
                continue
            try:
                write_outputs(out, name, image, *result)
                written += 1
            except OSError as error:
                failed.append((query, f"cannot write to {out}: {error.strerror or error}"))
        bar.update(min(args.batch_size, len(queries) - start))
    bar.close()
    print(f"fss-predict: wrote {written} of {len(queries)} masks to {out}")
    if failed:
        listed = "; ".join(f"{query} ({reason})" for query, reason in failed)
        print(f"error: {len(failed)} of {len(queries)} queries failed, nothing written for "
              f"them: {listed}", file=sys.stderr)
        return EXIT_FAILED_QUERIES
    return 0


def _run(predictor, decoded, args) -> list:
    """Results of one batch; when the batch fails, each query alone, so that one bad query
    does not take the others with it (its error is its result)."""
    images = [image for _, _, image in decoded]
    try:
        return predictor.run(images, args.probabilities)
    except Exception as error:  # noqa: BLE001
        if len(images) == 1:
            return [error]
    results = []
    for image in images:
        try:
            results += predictor.run([image], args.probabilities)
        except Exception as error:  # noqa: BLE001
            results.append(error)
    return results


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, ConfigError | InputError) else f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------- outputs
def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with the mask's pixels tinted."""
    tinted = image.astype(np.float32)
    selected = mask.astype(bool)
    tinted[selected] = (1 - TINT_ALPHA) * tinted[selected] + TINT_ALPHA * TINT
    return tinted.round().clip(0, 255).astype(np.uint8)


def write_outputs(out: Path, name: str, image: np.ndarray, mask: np.ndarray,
                  probability: np.ndarray | None) -> list[Path]:
    """Writes the query's files (each atomically); on a failure removes those written."""
    from PIL import Image

    files: list[tuple[str, Callable[[BinaryIO], None]]] = [
        (f"{name}_mask.png", lambda f: Image.fromarray(mask * 255).save(f, "PNG")),
        (f"{name}_overlay.png", lambda f: Image.fromarray(overlay(image, mask)).save(f, "PNG")),
    ]
    if probability is not None:
        levels = np.round(np.clip(probability, 0, 1) * 65535).astype(np.uint16)
        files += [
            (f"{name}_prob.npy", lambda f: np.save(f, probability.astype(np.float32))),
            (f"{name}_prob.png", lambda f: Image.fromarray(levels).save(f, "PNG")),
        ]
    done: list[Path] = []
    try:
        for filename, writer in files:
            done.append(_atomic_write(out / filename, writer))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return done


def _atomic_write(path: Path, writer: Callable[[BinaryIO], None]) -> Path:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(descriptor)
    try:
        with open(temporary, "wb") as handle:
            writer(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


if __name__ == "__main__":
    sys.exit(main())
