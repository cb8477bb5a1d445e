"""Checks of the episode tensors that every few-shot model's public entry points take.

:func:`check_episode` runs once per call of ``forward``, ``predict``, ``training_loss``,
``per_shot_logits`` (HSNet), ``correlation_maps`` (HDMNet) and ``similarity``
(:class:`~fss.models.proto.PrototypeBaseline`). Every rejection is an
:class:`~fss.utils.errors.InputError` (a ``ValueError``) whose message is one sentence:
the argument, what was found, what is expected and the fix. ``docs/errors.md`` ("Model
API") lists them.

An accepted episode:

- ``query_img`` (B, 3, H, W) and ``support_imgs`` (B, K, 3, H, W), K >= 1: RGB images in
  one floating dtype on one device, ImageNet-normalised
  (:func:`fss.data.transforms.image_to_tensor`), all values finite;
- ``support_masks`` (B, K, H, W): float, bool or integer, values in {0, 1} only (a 0/255
  mask is rejected, not guessed at), each with at least one foreground pixel unless the
  caller passes ``allow_empty_support=True``. They are returned in the images' dtype.

Layout, dtype and device checks read only tensor metadata. The value checks (finite
images, {0, 1} masks, non-empty masks) reduce each tensor once and read all results on
the host in ONE synchronisation; they are skipped while ``torch.compile`` /
``torch.export``, ``torch.jit.trace`` or an ONNX export traces the model, where
data-dependent Python would break or bake the graph.

Nothing here imports Lightning, Hydra or :mod:`fss.data`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fss.utils.errors import InputError

ALLOW_EMPTY_SUPPORT = "allow_empty_support"
IGNORE_LABEL = 255
IMAGE_FIX = (
    "convert uint8 (H, W, 3) RGB arrays with fss.data.transforms.image_to_tensor, or "
    "divide by 255 and normalise with the ImageNet mean/std yourself"
)


def tracing() -> bool:
    """True while ``torch.compile`` / ``torch.export``, ``torch.jit.trace`` or an ONNX
    export traces the caller: no value check (host synchronisation) may run then."""
    return bool(
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def empty_support_kwargs(method: Callable | nn.Module) -> dict[str, bool]:
    """``{"allow_empty_support": True}`` if ``method`` (an entry point, or a model: its
    ``forward``) takes that keyword, else ``{}``.

    For loops that run whichever model on benchmark episodes, where a support can
    legitimately lose its whole object when resized.
    """
    if isinstance(method, nn.Module):
        method = method.forward
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return {}
    takes_it = any(p.name == ALLOW_EMPTY_SUPPORT or p.kind is p.VAR_KEYWORD for p in parameters)
    return {ALLOW_EMPTY_SUPPORT: True} if takes_it else {}


def check_episode(
    query_img: Tensor,
    support_imgs: Tensor,
    support_masks: Tensor,
    *,
    allow_empty_support: bool = False,
    size_check: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Check one batch of episodes; returns ``support_masks`` in the images' dtype.

    ``size_check(H, W)``, a model's own size rule, runs after the layout checks and before
    the value checks. Raises :class:`~fss.utils.errors.InputError` (see the module
    docstring).
    """
    _check_is_tensor("query_img", query_img)
    _check_is_tensor("support_imgs", support_imgs)
    _check_is_tensor("support_masks", support_masks)
    _check_image_dtype("query_img", query_img)
    _check_image_dtype("support_imgs", support_imgs)
    _check_query_layout(query_img)
    _check_support_layout(support_imgs)
    _check_supports_match_query(query_img, support_imgs)
    _check_mask_layout(support_masks, query_img, support_imgs)
    if size_check is not None:
        size_check(*query_img.shape[-2:])
    masks = support_masks.to(query_img.dtype)
    if not tracing() and query_img.device.type != "meta":
        _check_values(query_img, support_imgs, support_masks, masks, allow_empty_support)
    return masks


def check_query_mask(query_mask: Tensor, query_img: Tensor) -> None:
    """``query_mask`` (B, H, W) of ``query_img``'s B, H, W, on its device, integer, bool or
    float with values in {0, 1, 255} (255 = ignore)."""
    _check_is_tensor("query_mask", query_mask)
    batch, _, height, width = query_img.shape
    expected = (batch, height, width)
    shape = tuple(query_mask.shape)
    if shape != expected:
        if query_mask.dim() == 4 and shape[1] == 1 and (shape[0], *shape[2:]) == expected:
            hint = ", a channel dimension; pass query_mask.squeeze(1)"
        else:
            hint = "; pass one label map per query image, at its size"
        raise InputError(
            f"query_mask must be (B, H, W) = {expected} like query_img, got shape {shape}{hint}")
    if query_mask.is_complex():
        raise InputError(
            f"query_mask must be an integer, bool or float label map, got dtype {query_mask.dtype}; "
            "pass a real-valued map with 0, 1 and 255 (ignore)")
    _check_device("query_mask", query_mask, query_img)
    if tracing() or query_mask.device.type == "meta":
        return
    labels = query_mask if query_mask.dtype != torch.bool else query_mask.to(torch.uint8)
    other = (labels != 0) & (labels != 1) & (labels != IGNORE_LABEL)
    if bool(other.any()):
        raise InputError(
            f"query_mask must hold 0 (background), 1 (foreground) or {IGNORE_LABEL} (ignore), got "
            f"values {_format_values(query_mask)}; binarise the label map for the episode's "
            f"class (1 = that class, 0 = any other label, {IGNORE_LABEL} = ignore)")


# ------------------------------------------------------------------------ metadata
def _check_is_tensor(name: str, value: object) -> None:
    if not isinstance(value, Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}; convert it with "
            f"torch.as_tensor (images: fss.data.transforms.image_to_tensor)")


def _check_image_dtype(name: str, image: Tensor) -> None:
    if image.is_floating_point():
        return
    found = f"dtype {image.dtype}"
    if image.dtype == torch.uint8:
        found += " (raw 0-255 pixels)"
    raise InputError(
        f"{name} must be floating-point ImageNet-normalised RGB, got {found}; {IMAGE_FIX}")


def _check_query_layout(query_img: Tensor) -> None:
    shape, dim = tuple(query_img.shape), query_img.dim()
    if dim == 4 and shape[1] == 3:
        return
    if dim == 4 and shape[-1] == 3:
        hint = "a channels-last (B, H, W, 3) HWC layout; pass query_img.permute(0, 3, 1, 2)"
    elif dim == 3 and shape[0] == 3:
        hint = "one image without its batch dimension; pass query_img.unsqueeze(0)"
    elif dim == 3 and shape[-1] == 3:
        hint = "one (H, W, 3) HWC image; pass query_img.permute(2, 0, 1).unsqueeze(0)"
    elif dim == 4:
        hint = f"{_count(shape[1], 'channel')}; pass 3-channel RGB images"
    else:
        hint = f"a {dim}-d tensor; pass one (B, 3, H, W) batch of RGB query images"
    raise InputError(f"query_img must be (B, 3, H, W), got shape {shape}, {hint}")


def _check_support_layout(support_imgs: Tensor) -> None:
    shape, dim = tuple(support_imgs.shape), support_imgs.dim()
    if dim == 5 and shape[2] == 3:
        if shape[1] >= 1:
            return
        hint = "K = 0 shots; pass at least one support image per episode"
    elif dim == 5 and shape[-1] == 3:
        hint = ("a channels-last (B, K, H, W, 3) HWC layout; pass "
                "support_imgs.permute(0, 1, 4, 2, 3)")
    elif dim == 4 and shape[1] == 3:
        hint = "no shot dimension; pass support_imgs.unsqueeze(1) for K = 1"
    elif dim == 4 and shape[-1] == 3:
        hint = ("a (B, H, W, 3) HWC layout without a shot dimension; pass "
                "support_imgs.permute(0, 3, 1, 2).unsqueeze(1)")
    elif dim == 5:
        hint = f"{_count(shape[2], 'channel')}; pass 3-channel RGB images"
    else:
        hint = f"a {dim}-d tensor; pass K RGB support images per episode"
    raise InputError(f"support_imgs must be (B, K, 3, H, W), got shape {shape}, {hint}")


def _check_supports_match_query(query_img: Tensor, support_imgs: Tensor) -> None:
    batch, _, height, width = query_img.shape
    shape = tuple(support_imgs.shape)
    if shape[0] != batch:
        raise InputError(
            f"support_imgs must be (B, K, 3, H, W) with query_img's B = {batch}, got B = "
            f"{shape[0]} (shape {shape}); pass one set of K supports per query image")
    if shape[-2:] != (height, width):
        raise InputError(
            f"support_imgs must be (B, K, 3, H, W) at query_img's size {height}x{width}, got "
            f"{shape[-2]}x{shape[-1]} (shape {shape}); resize the supports and their masks to "
            "the query's size")
    if support_imgs.dtype != query_img.dtype:
        raise InputError(
            f"support_imgs must have query_img's dtype {query_img.dtype}, got "
            f"{support_imgs.dtype}; pass support_imgs.to(query_img.dtype)")
    _check_device("support_imgs", support_imgs, query_img)


def _check_mask_layout(support_masks: Tensor, query_img: Tensor, support_imgs: Tensor) -> None:
    batch, shots = support_imgs.shape[:2]
    height, width = query_img.shape[-2:]
    expected = (batch, shots, height, width)
    shape, dim = tuple(support_masks.shape), support_masks.dim()
    if shape != expected:
        if dim == 3 and shots == 1 and shape == (batch, height, width):
            hint = ", no shot dimension; pass support_masks.unsqueeze(1)"
        elif dim == 5 and shape[2] == 1 and (*shape[:2], *shape[3:]) == expected:
            hint = ", a channel dimension (B, K, 1, H, W); pass support_masks.squeeze(2)"
        elif dim == 5 and shape[-1] == 1 and shape[:4] == expected:
            hint = ", a trailing channel dimension (B, K, H, W, 1); pass support_masks.squeeze(-1)"
        else:
            hint = "; pass one mask per support image, at the images' size"
        raise InputError(
            f"support_masks must be (B, K, H, W) = {expected} like the images, got shape "
            f"{shape}{hint}")
    if support_masks.is_complex():
        raise InputError(
            f"support_masks must be float, bool or integer with values in {{0, 1}}, got dtype "
            f"{support_masks.dtype}; pass a real-valued binary mask")
    _check_device("support_masks", support_masks, query_img)


def _check_device(name: str, tensor: Tensor, query_img: Tensor) -> None:
    if tensor.device != query_img.device:
        raise InputError(
            f"{name} must be on query_img's device {query_img.device}, got {tensor.device}; "
            f"move it with {name}.to(query_img.device)")


# -------------------------------------------------------------------------- values
def _check_values(
    query_img: Tensor,
    support_imgs: Tensor,
    support_masks: Tensor,
    masks: Tensor,
    allow_empty_support: bool,
) -> None:
    """All value checks, read on the host in one synchronisation; the details of a
    failure are only computed when something failed."""
    flat = masks.flatten(2)  # (B, K, H·W)
    foreground = (flat == 1).sum(dim=2)  # (B, K)
    binary = foreground + (flat == 0).sum(dim=2)  # pixels in {0, 1}, per mask
    flags = torch.stack([
        ~torch.isfinite(query_img).all(),
        ~torch.isfinite(support_imgs).all(),
        (binary != flat.shape[2]).any(),
        (foreground == 0).any(),
    ]).tolist()
    query_bad, support_bad, not_binary, empty = flags
    if query_bad:
        _raise_non_finite("query_img", query_img, episode_dims=1)
    if support_bad:
        _raise_non_finite("support_imgs", support_imgs, episode_dims=2)
    if not_binary:
        episode, shot = _first(binary != flat.shape[2])
        raise InputError(
            f"support_masks must hold only 0 and 1, got values {_format_values(support_masks)} "
            f"(first at episode {episode}, shot {shot}){_mask_hint(support_masks)}")
    if empty and not allow_empty_support:
        empties = (foreground == 0).nonzero().tolist()
        episode, shot = empties[0]
        raise InputError(
            f"support_masks[{episode}, {shot}] is all zero ({len(empties)} of "
            f"{foreground.numel()} support masks empty) but every support mask needs at "
            "least one foreground pixel; replace that support, or pass "
            "allow_empty_support=True where empty supports are expected (e.g. benchmark "
            "episodes whose object vanished when resized)")


def _raise_non_finite(name: str, image: Tensor, episode_dims: int) -> None:
    bad = ~torch.isfinite(image)
    count = int(bad.sum())
    nans = int(torch.isnan(image).sum())
    where = _first(bad.flatten(episode_dims).any(dim=episode_dims))
    position = ("episode {}" if episode_dims == 1 else "episode {}, shot {}").format(*where)
    raise InputError(
        f"{name} must be finite, got {_count(count, 'non-finite value')} ({nans} NaN, "
        f"{count - nans} inf; first at {position}); fix the loading or normalisation that produced them "
        "(e.g. a division by a zero std)")


def _mask_hint(support_masks: Tensor) -> str:
    values = set(torch.unique(support_masks.float()).tolist())
    if values <= {0.0, float(IGNORE_LABEL)}:
        return (", a 0/255 image mask; binarise it with support_masks = "
                "(support_masks > 0).float() or divide it by 255")
    if values <= {0.0, 1.0, float(IGNORE_LABEL)}:
        return (f", {IGNORE_LABEL} looks like the ignore label; keep the foreground with "
                "support_masks = (support_masks == 1).float()")
    return "; binarise it, e.g. support_masks = (support_masks > 0.5).float()"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _first(flags: Tensor) -> Sequence[int]:
    """Index of the first True of a boolean tensor."""
    return flags.nonzero()[0].tolist()


def _format_values(tensor: Tensor, most: int = 6) -> str:
    values = torch.unique(tensor).tolist()
    shown = [f"{v:g}" if isinstance(v, float) else str(int(v)) for v in values[:most]]
    if len(values) > most:
        shown.append(f"... ({len(values)} distinct)")
    return "{" + ", ".join(shown) + "}"
