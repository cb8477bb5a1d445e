"""Training augmentations of the official HDMNet / BAM recipes, on numpy images and labels.

Every transform is a callable ``(image, label, rng) -> (image, label)`` with

- ``image``: uint8 ``(H, W, 3)`` RGB,
- ``label``: uint8 ``(H, W)`` (any label convention; 255 = ignore),
- ``rng``: a ``numpy.random.Generator``. All randomness comes from it, so an item is a
  pure function of the generator's seed (the datasets derive it from ``(seed, epoch,
  index)``, see ``fss.data.episodes.item_rng``) and identical in any worker.

Chains (facts from the official code; this is an independent implementation):

- :func:`hdmnet_train_augmentation` — HDMNet episodes (query and each support alike):
  RandScale (PASCAL [0.9, 1.1], COCO [0.8, 1.25]) → RandRotate ±10° with p = 0.5 (image
  padded with the ImageNet mean colour, label with 255) → Gaussian blur 5×5 with p = 0.5 →
  horizontal flip with p = 0.5 → resize to a square ``size`` (473 PASCAL, 633 COCO; no crop).
- :func:`base_learner_train_augmentation` — BAM's PSPNet base-class training: RandScale
  [0.5, 2.0] → the same rotation, blur and flip → random ``crop`` (417) padded with the
  mean colour / 255 where the image is smaller.

Differences from the OpenCV originals, all below a pixel or a grey level: resampling uses
Pillow (its bilinear filter antialiases when shrinking), and BAM's crop re-draws its
window up to 30 times while it holds < 85 % of the pixels labelled 1 (a binary-mask
heuristic that, on semantic labels, only favours class 1) — not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from fss.data.transforms import IGNORE_INDEX, IMAGENET_MEAN

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# Padding colour of rotations and crops: the ImageNet mean, so padding normalises to ~0.
MEAN_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)
# Official input sizes and RandScale ranges of HDMNet's episodes.
HDMNET_SIZES = {"pascal": 473, "coco": 633}
HDMNET_SCALES = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25)}


def check_pair(image: np.ndarray, label: np.ndarray) -> None:
    """Raise a ValueError unless image is uint8 (H, W, 3) and label uint8 (H, W)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if label.dtype != np.uint8 or label.shape != image.shape[:2]:
        raise ValueError(
            f"expected a uint8 (H, W) label matching the image {image.shape[:2]}, got "
            f"{label.dtype} {label.shape}"
        )


def _resize(image: np.ndarray, label: np.ndarray, height: int, width: int):
    """Bilinear image, nearest-neighbour label (labels are never interpolated)."""
    if (height, width) == image.shape[:2]:
        return image, label
    size = (width, height)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    relabelled = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return resized, relabelled


class Compose:
    """Applies the transforms in order, each drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        check_pair(image, label)
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandScale:
    """Resize both sides by one factor drawn uniformly from ``scale`` = (low, high)."""

    def __init__(self, scale: Sequence[float]) -> None:
        low, high = (float(s) for s in scale)
        if not 0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.scale = (low, high)

    def __call__(self, image, label, rng):
        factor = rng.uniform(*self.scale)
        height, width = image.shape[:2]
        return _resize(
            image, label, max(1, round(height * factor)), max(1, round(width * factor))
        )

    def __repr__(self) -> str:
        return f"RandScale({self.scale})"


class RandRotate:
    """With probability ``p``, rotate about the image centre by an angle (degrees,
    counter-clockwise) drawn from ``angle``; the canvas keeps its size, new image pixels
    take ``padding`` and new label pixels ``ignore_label``."""

    def __init__(
        self,
        angle: Sequence[float] = (-10.0, 10.0),
        p: float = 0.5,
        padding: Sequence[int] = MEAN_RGB,
        ignore_label: int = IGNORE_INDEX,
    ) -> None:
        low, high = (float(a) for a in angle)
        if low > high:
            raise ValueError(f"angle must be (low, high) with low <= high, got {angle}")
        self.angle, self.p = (low, high), float(p)
        self.padding = tuple(int(c) for c in padding)
        self.ignore_label = int(ignore_label)

    def __call__(self, image, label, rng):
        if rng.random() >= self.p:
            return image, label
        angle = rng.uniform(*self.angle)
        height, width = image.shape[:2]
        centre = (width / 2, height / 2)
        rotated = Image.fromarray(image).rotate(
            angle, resample=Image.Resampling.BILINEAR, center=centre, fillcolor=self.padding
        )
        relabelled = Image.fromarray(label).rotate(
            angle, resample=Image.Resampling.NEAREST, center=centre, fillcolor=self.ignore_label
        )
        return np.asarray(rotated), np.asarray(relabelled)

    def __repr__(self) -> str:
        return f"RandRotate({self.angle}, p={self.p})"


# OpenCV's fixed kernels for small sizes when no sigma is given (binomial for 3 and 5).
_SMALL_KERNELS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def gaussian_kernel(size: int = 5, sigma: float | None = None) -> np.ndarray:
    """1-D normalised Gaussian. ``sigma=None`` gives what ``cv2.GaussianBlur(image, (size,
    size), 0)`` uses: its fixed table for sizes ≤ 7 ([1, 4, 6, 4, 1] / 16 for 5), else
    sigma = 0.3·((size − 1)/2 − 1) + 0.8."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if sigma is None:
        if size in _SMALL_KERNELS:
            return np.array(_SMALL_KERNELS[size])
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, size: int = 5, sigma: float | None = None) -> np.ndarray:
    """Separable Gaussian blur of a uint8 (H, W, 3) image, mirrored borders (edge pixel
    not repeated, OpenCV's default)."""
    kernel = gaussian_kernel(size, sigma)
    radius = size // 2
    mode = "reflect" if min(image.shape[:2]) > radius else "edge"
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode)
    height, width = image.shape[:2]
    rows = sum(kernel[i] * padded[i : i + height] for i in range(size))
    blurred = sum(kernel[i] * rows[:, i : i + width] for i in range(size))
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


class RandomGaussianBlur:
    """With probability ``p``, blur the image with a ``size``×``size`` Gaussian."""

    def __init__(self, size: int = 5, p: float = 0.5) -> None:
        gaussian_kernel(size)  # validates the size
        self.size, self.p = size, float(p)

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            image = gaussian_blur(image, self.size)
        return image, label

    def __repr__(self) -> str:
        return f"RandomGaussianBlur({self.size}, p={self.p})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize to ``size`` (an int for a square, or (height, width)), aspect not kept."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size}")

    def __call__(self, image, label, rng=None):
        return _resize(image, label, *self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomCrop:
    """Random ``size`` window; sides shorter than the window are first padded evenly on
    both ends (image with ``padding``, label with ``ignore_label``)."""

    def __init__(
        self,
        size: int | Sequence[int],
        padding: Sequence[int] = MEAN_RGB,
        ignore_label: int = IGNORE_INDEX,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.padding = np.array(padding, dtype=np.uint8)
        self.ignore_label = int(ignore_label)

    def __call__(self, image, label, rng):
        crop_h, crop_w = self.size
        height, width = image.shape[:2]
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            top, left = pad_h // 2, pad_w // 2
            canvas = np.empty((height + pad_h, width + pad_w, 3), dtype=np.uint8)
            canvas[:] = self.padding
            canvas[top : top + height, left : left + width] = image
            label_canvas = np.full(canvas.shape[:2], self.ignore_label, dtype=np.uint8)
            label_canvas[top : top + height, left : left + width] = label
            image, label = canvas, label_canvas
            height, width = image.shape[:2]
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        return image[window], label[window]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


def _rotate_blur_flip(rotate, rotate_p, blur_p, flip_p) -> list[Transform]:
    return [
        RandRotate(rotate, p=rotate_p),
        RandomGaussianBlur(5, p=blur_p),
        RandomHorizontalFlip(p=flip_p),
    ]


def hdmnet_train_augmentation(
    scale: Sequence[float] = HDMNET_SCALES["pascal"],
    size: int = HDMNET_SIZES["pascal"],
    rotate: Sequence[float] = (-10.0, 10.0),
    rotate_p: float = 0.5,
    blur_p: float = 0.5,
    flip_p: float = 0.5,
) -> Compose:
    """The official HDMNet training chain (see the module docstring).

    ``hdmnet_train_augmentation()`` is PASCAL-5i (473², scale [0.9, 1.1]);
    ``hdmnet_train_augmentation(HDMNET_SCALES["coco"], HDMNET_SIZES["coco"])`` is COCO-20i.
    Returns a callable ``(image uint8 (H,W,3), label uint8 (H,W), rng) -> (image (size,
    size, 3), label (size, size))``."""
    return Compose(
        [RandScale(scale), *_rotate_blur_flip(rotate, rotate_p, blur_p, flip_p), Resize(size)]
    )


def base_learner_train_augmentation(
    scale: Sequence[float] = (0.5, 2.0),
    crop: int = 417,
    rotate: Sequence[float] = (-10.0, 10.0),
    rotate_p: float = 0.5,
    blur_p: float = 0.5,
    flip_p: float = 0.5,
) -> Compose:
    """BAM's PSPNet (base learner) training chain: RandScale [0.5, 2.0], rotate / blur /
    flip as above, random ``crop``×``crop`` window (417 in BAM's configs)."""
    return Compose(
        [RandScale(scale), *_rotate_blur_flip(rotate, rotate_p, blur_p, flip_p), RandomCrop(crop)]
    )
