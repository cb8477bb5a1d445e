"""Inference copies of frozen backbones: BatchNorm folded into the convolutions, channels-last.

Fast: :meth:`FoldedCache.get` serves the folded copy; reference: the module itself.

A frozen backbone in eval mode computes ``bn(conv(x))`` with fixed statistics, which is one
convolution with rescaled weights and a bias. Folding removes every BatchNorm pass over the
feature maps, and channels-last weights let oneDNN / cuDNN run their NHWC kernels without
reordering. The result differs from the unfolded module by float rounding only (~1e-6
relative on ResNet-50 features).

:class:`FoldedCache` keeps one folded copy per source module and rebuilds it whenever the
source's parameters or buffers change (new weights loaded, moved to another device or
dtype), so the owner never serves stale weights. The copy is not a registered submodule: it
is absent from the state dict and from ``parameters()``.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from fss.ops.config import FAST, REFERENCE, choose_impl

IMPLS = (FAST, REFERENCE)


def fold_conv_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``norm`` into ``conv`` in place (``conv`` gains a bias)."""
    if not norm.track_running_stats or norm.running_var is None:
        raise ValueError("only BatchNorm layers with running statistics can be folded")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=False)


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every (Conv2d -> BatchNorm2d) pair folded.

    Pairs are found by structure: consecutive entries of an ``nn.Sequential``, and the
    ``convN`` / ``bnN`` attributes of a block (torchvision and PSPNet ResNets). A BatchNorm
    is only folded when its conv output feeds nothing else, which holds for these layouts.
    Folded BatchNorms become ``nn.Identity``.
    """
    folded = copy.deepcopy(module).eval()
    for parent in list(folded.modules()):
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (_, previous), (name, child) in itertools.pairwise(children):
                if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d):
                    fold_conv_batchnorm(previous, child)
                    setattr(parent, name, nn.Identity())
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and name.startswith("bn"):
                conv = getattr(parent, "conv" + name[2:], None)
                if isinstance(conv, nn.Conv2d):
                    fold_conv_batchnorm(conv, child)
                    setattr(parent, name, nn.Identity())
    return folded.to(memory_format=torch.channels_last)


def tensors_key(tensors) -> tuple:
    """Identifies the current contents of ``tensors``: storage, in-place version, device and
    dtype of each. It changes whenever a tensor is replaced or modified in place (optimizer
    steps, ``load_state_dict``, ``.to``), so values derived from them can be cached on it."""
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


class FoldedCache:
    """The folded, channels-last copy of a frozen module, rebuilt when the module changes
    (``fast``); the module itself under ``reference``."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._module: nn.Module | None = None

    def get(self, source: nn.Module, *, impl: str | None = None) -> nn.Module:
        if choose_impl(impl, IMPLS) == REFERENCE:
            return source
        key = tensors_key(itertools.chain(source.parameters(), source.buffers()))
        if key != self._key or self._module is None:
            self._module = fold_batchnorms(source)
            self._key = key
        return self._module
