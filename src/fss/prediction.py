"""Segment your own images: ``fss.predict`` (this module) and ``fss-predict`` (:mod:`fss.predict_cli`).

A query image, K support images and their masks in any of the usual forms (file paths,
PIL images, numpy arrays, tensors) go through the evaluation pipeline of the model's
checkpoint and come back as a mask at the query's original size:

1. every image is resized to the model's square input size (``checkpoint_info["input"]``;
   HSNet 400, HDMNet 473 / 633 for official files), with the bilinear resize of the
   checkpoint's data protocol (:func:`fss.data.io.resize_image`: antialiased for the HSNet
   protocol, plain bilinear for PFENet / HDMNet), and ImageNet-normalised
   (:func:`fss.data.transforms.image_to_tensor`); each support mask is resized nearest
   (:func:`fss.data.io.resize_label`), as evaluation resizes labels. Supports of different
   sizes and aspect ratios are accepted: each is resized on its own, as in training;
2. the model's logits (HSNet: one per shot) are upsampled to the query's original size and
   turned into a mask by the rule of evaluation at ``eval_resolution=original``
   (:func:`fss.lightning.few_shot_module.shot_logits` / ``upsample_logits``: bilinear,
   ``align_corners=True``, then argmax, or HSNet's K-shot vote);
3. with ``probabilities=True``, the foreground probability at the original size instead:
   the softmax of the upsampled logits (HSNet, K > 1: the mean over the shots; its mask is
   the vote, which can differ from thresholding that mean at 0.5).

Bad input raises :class:`~fss.utils.errors.ConfigError` with one line that names the file
or argument (``docs/errors.md``, "Your own images").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

# Input size of models without a run description (official files; untrained models):
# the official protocols' sizes.
HSNET_SIZE = 400
HDMNET_SIZE = {15: 473, 60: 633}  # base classes: PASCAL-5i, COCO-20i
HDMNET_DEFAULT_SIZE = 473
BATCH_SIZE = 8
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError,
               Image.DecompressionBombError)

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray | torch.Tensor


# ----------------------------------------------------------------------- the model
_LOADED: dict[tuple[str, float, int], nn.Module] = {}


def load_cached(path: str | Path) -> nn.Module:
    """``fss.load_model(path)``, loaded once per file and process (reloaded when the file
    changes)."""
    from fss.checkpoints import load_model

    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass the path of a .ckpt/.pt/.pth "
                          "file (a run's checkpoints/last.ckpt or an official HSNet / HDMNet file)")
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime, stat.st_size)
    if key not in _LOADED:
        for old in [k for k in _LOADED if k[0] == key[0]]:
            del _LOADED[old]
        _LOADED[key] = load_model(resolved)
    return _LOADED[key]


def resolve_model(model_or_checkpoint: nn.Module | str | Path) -> nn.Module:
    """The few-shot model given, or loaded from the checkpoint path given."""
    from fss.models import PSPNet

    if isinstance(model_or_checkpoint, str | Path):
        model = load_cached(model_or_checkpoint)
        source = f"checkpoint {model_or_checkpoint}"
    elif isinstance(model_or_checkpoint, nn.Module):
        model, source = model_or_checkpoint, "the model"
    else:
        raise ConfigError(f"model_or_checkpoint must be a model (fss.load_model) or a checkpoint "
                          f"path, got {type(model_or_checkpoint).__name__}")
    if isinstance(model, PSPNet):
        raise ConfigError(f"{source} is a PSPNet base learner, not a few-shot model; pass an "
                          "HSNet or HDMNet checkpoint (HDMNet trains on this base learner with "
                          "`python run.py model=hdmnet base_learner.ckpt=<file>`)")
    return model


def model_name(model: nn.Module) -> str:
    """``hsnet``, ``hdmnet`` (or the run description's model name, else the class name)."""
    info = getattr(model, "checkpoint_info", None)
    if isinstance(info, dict) and info.get("model", {}).get("name"):
        return str(info["model"]["name"])
    return type(model).__name__.lower()


def backbone_name(model: nn.Module) -> str | None:
    info = getattr(model, "checkpoint_info", None)
    if isinstance(info, dict) and info.get("backbone"):
        return str(info["backbone"])
    name = getattr(getattr(model, "backbone", None), "name", None)
    return name or getattr(getattr(model, "pspnet", None), "backbone_name", None)


@dataclass(frozen=True)
class InputSpec:
    """How images are prepared for a model: its square input size and the bilinear resize
    of its data protocol (``antialias``: PIL's, as the HSNet protocol)."""

    size: int
    antialias: bool


def input_spec(model: nn.Module, size: int | None = None) -> InputSpec:
    """The input size and resize of ``model``: from its run description
    (``model.checkpoint_info``), else the official protocol of its class; ``size`` (if
    given) replaces the size."""
    from fss.models import HDMNet, HSNet

    info = getattr(model, "checkpoint_info", None)
    protocol = None
    if isinstance(info, dict):
        size = size or (info.get("input") or {}).get("image_size")
        protocol = (info.get("data") or {}).get("protocol")
    if size is None:
        if isinstance(model, HSNet):
            size = HSNET_SIZE
        elif isinstance(model, HDMNet):
            size = HDMNET_SIZE.get(int(model.num_classes_base), HDMNET_DEFAULT_SIZE)
        else:
            raise ConfigError(f"cannot tell the input size of a {type(model).__name__} without a "
                              "run description (checkpoint_info); load it with fss.load_model")
    if protocol is not None:
        antialias = protocol == "hsnet"
    else:  # synthetic data (rendered at size) or an official file: the model's protocol
        antialias = isinstance(model, HSNet)
    return InputSpec(int(size), antialias)


def check_input_size(model: nn.Module, height: int, width: int) -> None:
    """ConfigError if ``model`` cannot take ``height`` x ``width`` inputs (its size rule)."""
    from fss.models import HDMNet, HSNet
    from fss.models.pspnet import check_input_size as check_pspnet_size

    try:
        if isinstance(model, HSNet):
            model.check_image_size(height, width)
        elif isinstance(model, HDMNet):
            check_pspnet_size(height, width, strict=model.pspnet.strict_size)
    except ValueError as error:
        raise ConfigError(f"input size {height}x{width} does not suit {type(model).__name__}: "
                          f"{error}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; ConfigError for CUDA on a machine without it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r} is not a device ({error}); use cpu or cuda") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ConfigError(f"device={device!r} is not supported; use cpu or cuda")
    return resolved


# ------------------------------------------------------------------------ images
def describe(value: Any, fallback: str) -> str:
    """How messages name an input: its path, a PIL image's file name, else ``fallback``."""
    if isinstance(value, str | Path):
        return str(value)
    filename = getattr(value, "filename", None)
    return str(filename) if filename else fallback


def open_image_file(path: str | Path, what: str) -> Image.Image:
    """The image file ``path`` opened (its header read; pixels decoded on first use);
    ConfigError if missing or not an image."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    try:
        return Image.open(path)
    except _PIL_ERRORS as error:
        raise ConfigError(f"{what} {path} is not an image PIL can read ({error}); pass a PNG, "
                          "JPEG, BMP, TIFF or WebP file") from None


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """The decoded, upright (EXIF orientation applied) image."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except _PIL_ERRORS as error:
        raise ConfigError(f"{name} cannot be decoded ({error}); replace the file") from None


def load_image(value: ImageInput, name: str = "image", what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image given as a path, a PIL image, a uint8 (H, W, 3)
    numpy array (also (H, W) grey or (H, W, 4) RGBA) or a (3, H, W) tensor (float in
    [0, 1], taken as 8-bit pixels: ``round(x * 255)``, or uint8). ``name`` and ``what``
    (e.g. "query image") name it in messages."""
    if isinstance(value, str | Path):
        with open_image_file(value, what) as image:
            return np.array(_decoded(image, str(value)).convert("RGB"))
    if isinstance(value, Image.Image):
        return np.array(_decoded(value, name).convert("RGB"))
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ConfigError(f"{name} must be a (3, H, W) RGB tensor, got shape "
                              f"{tuple(tensor.shape)}")
        if tensor.is_floating_point():
            low, high = float(tensor.min()), float(tensor.max())
            if not (0.0 <= low and high <= 1.0):
                raise ConfigError(f"{name} must hold values in [0, 1] (RGB / 255), got "
                                  f"[{low:g}, {high:g}]; pass the image before normalising it")
            tensor = (tensor * 255).round()
        elif tensor.dtype != torch.uint8:
            raise ConfigError(f"{name} must be a float tensor in [0, 1] or uint8, got "
                              f"{tensor.dtype}")
        return tensor.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise ConfigError(f"{name} must be a uint8 (H, W, 3) RGB array, got dtype {value.dtype}")
        if value.ndim == 2:
            return np.repeat(value[:, :, None], 3, axis=2)
        if value.ndim == 3 and value.shape[2] in (3, 4):
            return np.ascontiguousarray(value[:, :, :3])
        raise ConfigError(f"{name} must be a uint8 (H, W, 3) RGB array, got shape {value.shape}")
    raise ConfigError(f"{name} must be a path, PIL image, numpy array or tensor, got "
                      f"{type(value).__name__}")


def load_mask(value: ImageInput, name: str, mask_value: int | None = None) -> np.ndarray:
    """(H, W) uint8 {0, 1}: pixels != 0 (or == ``mask_value``) are foreground.

    A path or PIL image is read as stored: a palette PNG gives its indices, a greyscale one
    its values; a colour image counts a pixel as non-zero when any colour channel is (with
    ``mask_value`` it must be grey: every channel equal).
    """
    if isinstance(value, str | Path):
        with open_image_file(value, "support mask") as image:
            return load_mask(_decoded(image, str(value)), str(value), mask_value)
    if isinstance(value, Image.Image):
        image = _decoded(value, name)
        if image.mode == "1":
            image = image.convert("L")
        array = np.array(image)
        if array.ndim == 3:
            channels = 1 if image.mode in ("LA", "La", "PA") else 3  # alpha left out
            colour = array[:, :, :channels]
            if mask_value is None:
                return (colour != 0).any(axis=2).astype(np.uint8)
            if not (colour == colour[:, :, :1]).all():
                raise ConfigError(f"mask {name} is a colour image (PIL mode {image.mode}); a "
                                  "mask value needs a single-channel label map (PNG mode P or L)")
            array = colour[:, :, 0]
    elif isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise ConfigError(f"mask {name} must be a path, PIL image, numpy array or tensor, got "
                          f"{type(value).__name__}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ConfigError(f"mask {name} must be (H, W), got shape {array.shape}")
    if mask_value is not None:
        return (array == mask_value).astype(np.uint8)
    values = np.unique(array)
    if values.size > 2:
        log.warning("mask %s holds %d distinct values (%s ...); every non-zero pixel counts as "
                    "the object: pass a mask value for a label map (fss-predict --mask-value "
                    "V), or save masks as PNG (JPEG leaves faint non-zero pixels at edges)",
                    name, values.size, ", ".join(str(v) for v in values[:4].tolist()))
    return (array != 0).astype(np.uint8)


# ---------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class Support:
    """One support as read: its name for messages, (H, W, 3) uint8 image and (H, W) uint8
    {0, 1} mask at the image's size, with some foreground."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def read_supports(
    supports: Sequence[ImageInput],
    masks: Sequence[ImageInput],
    *,
    mask_value: int | None = None,
    resize_mask: bool = False,
) -> list[Support]:
    """The supports and their masks read and checked (the checks that need no model): one
    mask per image, at its size (or stretched with ``resize_mask``), not empty."""
    from fss.data.io import resize_label

    if isinstance(supports, str | Path | np.ndarray | torch.Tensor | Image.Image):
        supports = [supports]
    if isinstance(masks, str | Path | np.ndarray | torch.Tensor | Image.Image):
        masks = [masks]
    supports, masks = list(supports), list(masks)
    if not supports:
        raise ConfigError("no support image: pass at least one support image and its mask")
    if len(supports) != len(masks):
        raise ConfigError(f"{len(supports)} support images but {len(masks)} masks; pass one "
                          "mask per support image")
    if mask_value is not None and (isinstance(mask_value, bool) or not isinstance(
            mask_value, int | np.integer)):
        raise ConfigError(f"mask_value={mask_value!r} must be an integer label value")
    read = []
    for index, (support, mask) in enumerate(zip(supports, masks, strict=True)):
        image_name = describe(support, f"support image {index + 1}")
        mask_name = describe(mask, f"support mask {index + 1}")
        image = load_image(support, image_name, "support image")
        label = load_mask(mask, mask_name, mask_value)
        if label.shape != image.shape[:2]:
            if not resize_mask:
                raise ConfigError(
                    f"the support mask {mask_name} is {label.shape[1]}x{label.shape[0]} but "
                    f"its image {image_name} is {image.shape[1]}x{image.shape[0]}; pass the "
                    "mask made for that image, or resize_mask=True (fss-predict "
                    "--resize-mask) to stretch it to the image (nearest)")
            label = resize_label(label, image.shape[:2])
        if not label.any():
            rule = "non-zero" if mask_value is None else f"equal to {mask_value}"
            raise ConfigError(
                f"the support mask for {image_name} is empty: no pixel of {mask_name} is "
                f"{rule}; pass the mask of the object to segment"
                + ("" if mask_value is not None else
                   " (or a mask value for a label map: fss-predict --mask-value V)"))
        read.append(Support(image_name, image, label))
    return read


class Predictor:
    """A model on its device with one prepared support set (:func:`read_supports`); call
    :meth:`run` per batch of query images (any sizes). ``fss.predict`` and ``fss-predict``
    are thin layers over it. ``size`` replaces the model's input size (:func:`input_spec`).
    """

    def __init__(
        self,
        model: nn.Module,
        supports: Sequence[Support],
        *,
        device: str | torch.device = "cpu",
        size: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model
        self.spec = input_spec(model, size)
        check_input_size(model, self.spec.size, self.spec.size)
        self.support_images, self.support_masks = self._prepare(supports)
        self.model.to(self.device)

    def _prepare(self, supports: Sequence[Support]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, K, 3, S, S) normalised images and (1, K, S, S) float {0, 1} masks."""
        from fss.data.io import resize_label

        size = (self.spec.size, self.spec.size)
        images, masks = [], []
        for support in supports:
            small = resize_label(support.mask, size)
            if not small.any():
                height, width = support.mask.shape
                raise ConfigError(
                    f"the support mask for {support.name} is empty once resized to the model's "
                    f"{size[1]}x{size[0]} input (its foreground, {int(support.mask.sum())} of "
                    f"{width}x{height} pixels, vanishes); crop the support around its object or "
                    "use one where the object is larger")
            images.append(self._input_tensor(support.image))
            masks.append(torch.from_numpy(np.ascontiguousarray(small)).float())
        return torch.stack(images)[None], torch.stack(masks)[None]

    def _input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) normalised, resized as the checkpoint's protocol."""
        from fss.data.io import resize_image
        from fss.data.transforms import image_to_tensor

        size = (self.spec.size, self.spec.size)
        # torch.from_numpy wants a writable array (PIL's are read-only views).
        resized = np.require(resize_image(image, size, self.spec.antialias), requirements="CW")
        return image_to_tensor(resized)

    @property
    def shots(self) -> int:
        return self.support_images.shape[1]

    @torch.no_grad()
    def run(
        self, images: Sequence[np.ndarray], probabilities: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per (H, W, 3) uint8 query: its (H, W) uint8 {0, 1} mask and, with
        ``probabilities``, its (H, W) float32 foreground probability (else None)."""
        from fss.lightning.few_shot_module import shot_logits, upsample_logits

        if not images:
            return []
        query = torch.stack([self._input_tensor(image) for image in images]).to(self.device)
        batch = query.shape[0]
        support_imgs = self.support_images.to(self.device).expand(batch, -1, -1, -1, -1)
        support_masks = self.support_masks.to(self.device).expand(batch, -1, -1, -1)
        was_training = self.model.training
        self.model.eval()
        try:
            logits, combine = shot_logits(self.model, query, support_imgs, support_masks,
                                          allow_empty_support=False)
        finally:
            self.model.train(was_training)
        results = []
        for sample_logits, image in zip(logits, images, strict=True):
            upsampled = upsample_logits(sample_logits.float(), image.shape[:2])  # (K, 2, H, W)
            mask = combine(upsampled[None])[0].to(torch.uint8).cpu().numpy()
            probability = None
            if probabilities:
                probability = upsampled.softmax(dim=1)[:, 1].mean(dim=0)
                probability = probability.cpu().numpy().astype(np.float32)
            results.append((mask, probability))
        return results


def predict(
    model_or_checkpoint: nn.Module | str | Path,
    query: ImageInput | Sequence[ImageInput],
    supports: Sequence[ImageInput],
    masks: Sequence[ImageInput],
    *,
    mask_value: int | None = None,
    resize_mask: bool = False,
    device: str | torch.device = "cpu",
    probabilities: bool = False,
) -> np.ndarray | list[np.ndarray]:
    """Segment ``query`` like the objects that ``masks`` mark in ``supports``.

    Args:
        model_or_checkpoint: a model returned by :func:`fss.load_model` (HSNet, HDMNet), or
            the path of a checkpoint (a run's ``.ckpt`` or an official HSNet / HDMNet file;
            loaded once per process). The model is moved to ``device`` and run in eval mode.
        query: one image, or a list of images (then a list of results, computed in batches
            of :data:`BATCH_SIZE`). An image is a path, a PIL image, a uint8 (H, W, 3) RGB
            numpy array or a (3, H, W) float tensor in [0, 1]; any size.
        supports: K >= 1 support images (same types; any sizes, each resized on its own).
        masks: K masks, one per support at its image's size: a path, PIL image, (H, W) numpy
            array or tensor; pixels != 0 are the object, or == ``mask_value`` for a label map.
        resize_mask: stretch a mask of another size to its image (nearest) instead of
            refusing it.
        device: ``cpu`` or ``cuda``.
        probabilities: return the foreground probability instead of the mask.

    Returns:
        per query, an (H, W) uint8 array in {0, 1} at its original size, or with
        ``probabilities`` an (H, W) float32 array in [0, 1].

    Raises :class:`~fss.utils.errors.ConfigError` (one line naming the input) for a missing
    or unreadable file, an empty support mask, a mask of another size than its image, a
    device this machine lacks.
    """
    model = resolve_model(model_or_checkpoint)
    read = read_supports(supports, masks, mask_value=mask_value, resize_mask=resize_mask)
    predictor = Predictor(model, read, device=device)
    single = not isinstance(query, list | tuple)
    queries = [query] if single else list(query)
    results: list[np.ndarray] = []
    for start in range(0, len(queries), BATCH_SIZE):
        chunk = queries[start:start + BATCH_SIZE]
        images = [load_image(q, describe(q, f"query {start + i + 1}"), "query image")
                  for i, q in enumerate(chunk)]
        for mask, probability in predictor.run(images, probabilities):
            results.append(probability if probabilities else mask)
    return results[0] if single else results
