"""Reading, checking, resizing and writing the images and label maps of the real datasets.

Every failure raises :class:`~fss.utils.errors.DataError` with one line that names the
file and says what to do; nothing is skipped silently.

Resizing follows the official code of each protocol: images bilinear (PIL's, which
antialiases when shrinking, as torchvision's ``Resize`` on PIL images in HSNet; or plain
bilinear without antialiasing, as ``cv2.INTER_LINEAR`` in PFENet/BAM/HDMNet), label maps
nearest with the source pixel ``floor(i * in / out)`` (``F.interpolate(mode="nearest")``
and ``cv2.INTER_NEAREST`` both use it). Training augmentations live in ``fss.data.augment``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fss.data.transforms import IGNORE_INDEX
from fss.utils.errors import DataError

# ------------------------------------------------------------------------------ checks


def require_dir(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a folder, else a DataError naming it and the command that makes it."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} not found: expected the folder {path}; {hint}")
    return path


def require_file(path: Path, what: str, hint: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: expected the file {path}; {hint}")
    return path


# ----------------------------------------------------------------------------- reading


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (any mode PIL reads)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing image {path} (its label map exists or a list names it); "
                        "re-run the prepare command for this dataset")
    try:
        with Image.open(path) as image:
            image.load()
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt image {path} ({error}); replace the file or re-run the "
                        "prepare command") from None


def read_label(path: Path, num_classes: int | None = None, what: str = "label map") -> np.ndarray:
    """(H, W) uint8 of a single-channel index PNG (palette or greyscale).

    With ``num_classes``, every value must be in ``0..num_classes`` or 255 (0 background,
    ``c + 1`` for class ``c``, 255 ignore); otherwise the file and the bad values are named.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what} {path} (its image exists or a list names it); "
                        "re-run the prepare command for this dataset")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                image = image.convert("L")
            if image.mode not in ("P", "L"):
                raise DataError(f"{what} {path} has PIL mode {image.mode}; expected a "
                                "single-channel index PNG (mode P or L), as the prepare "
                                "command writes")
            label = np.array(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt {what} {path} ({error}); replace the file or re-run the "
                        "prepare command") from None
    if num_classes is not None:
        check_label_values(label, num_classes, path)
    return label


def check_label_values(label: np.ndarray, num_classes: int, path: Path | str) -> None:
    """DataError if ``label`` holds a value outside ``0..num_classes`` and 255."""
    valid = np.zeros(256, dtype=bool)
    valid[: num_classes + 1] = True
    valid[IGNORE_INDEX] = True
    if not valid[label].all():
        bad = sorted(set(np.unique(label).tolist()) - set(np.flatnonzero(valid).tolist()))
        raise DataError(f"label map {path} has values {bad} outside 0..{num_classes} and "
                        f"{IGNORE_INDEX} (0 = background, c + 1 = class c); it does not belong "
                        "to this dataset or was written wrongly")


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise DataError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                        f"map {label_path} is {label.shape[1]}x{label.shape[0]}")


# ---------------------------------------------------------------------------- resizing


def resize_image(image: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (see the module docstring)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if antialias:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return tensor[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each of ``target`` output positions: ``floor(i * source / target)``."""
    return np.minimum((np.arange(target) * source) // target, source - 1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> (h, w), nearest (see the module docstring)."""
    height, width = size
    if label.shape[:2] == (height, width):
        return label
    rows = nearest_indices(label.shape[0], height)
    cols = nearest_indices(label.shape[1], width)
    return label[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- writing


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC palette (bit-interleaved class index), flat RGB list."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend((red, green, blue))
    return palette


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")


def save_label_png(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 index PNG atomically (a file that exists is always complete)."""
    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(label.astype(np.uint8)))
    if palette is not None:
        image.putpalette(palette)  # L -> P, the values become the palette indices
    handle, temporary = _atomic_target(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically."""
    path = Path(path)
    handle, temporary = _atomic_target(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
