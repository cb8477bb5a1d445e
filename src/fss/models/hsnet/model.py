"""HSNet: Hypercorrelation Squeeze Networks for few-shot segmentation (Min et al., ICCV 2021)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.backbones import FeatureBackbone, build_backbone
from fss.models.checkpoint_io import load_official_state_dict, read_official, unwrap_state_dict
from fss.models.hsnet.correlation import hypercorrelation_pyramid, mask_features
from fss.models.hsnet.learner import HypercorrelationLearner
from fss.models.inputs import check_episode, check_query_mask
from fss.ops import fast_paths as ops_fast_paths
from fss.ops.folding import FoldedCache
from fss.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MIN_SIZE = 32
SIZE_MULTIPLE = 8
TAPS = ("all", "shallow", "deep")
# Accepted pyramid_levels (backbone levels, deepest always kept): the paper's C(1:3), its
# C(2:3) (layer3 + layer4 for ResNets) and C(3) (layer4 only).
PYRAMIDS = ((2, 3, 4), (3, 4), (4,))


class HSNet(nn.Module):
    """HSNet on a frozen backbone; only the learner (~2.57M parameters) is trained.

    Args:
        backbone: ``vgg16``, ``resnet50``, ``resnet101`` (paper) or ``resnet18``, or a built
            :class:`~fss.models.backbones.FeatureBackbone`.
        weights: backbone weights, see :func:`~fss.models.backbones.build_backbone`.
        use_support_mask: multiply support features by the support mask (the paper's model).
            ``False`` is the "no support masking" ablation (Tab. 1 †).

    The paper's ablations (every default is the paper's model):
        kernel: the 4D convolution, ``center_pivot``, ``dense`` (the original 4D conv) or
            ``separable`` (Yang & Ramanan's); see ``fss.models.hsnet.conv4d_variants``.
        taps: correlations per pyramid level: ``all`` tapped layers (hypercorrelation),
            or a single one, ``shallow`` (the level's first tap, e.g. layer3.0) or ``deep``
            (its last, e.g. layer3.22 of resnet101).
        pyramid_levels: backbone levels correlated: ``(2, 3, 4)``; ``(3, 4)`` is the paper's
            C(2:3) and ``(4,)`` its C(3) (the deepest levels only).
        layers_per_block: 4D convs per squeezing / mixing block (paper: 3).
        finetune_backbone: train the backbone too (paper Fig. 9), its BatchNorm statistics
            still frozen, at the optimizer's lr x ``backbone_lr_scale`` (1e-3 x 0.01 = 1e-5).

    fast_paths: run this model's passes on the fast kernels (``True``) or on their
    straightforward references (``False``, :mod:`fss.ops`); ``None`` follows the
    process-wide switch (``fss.ops.set_fast_paths``, env ``FSS_FAST_PATHS``).

    Inputs of every entry point (``forward``, ``predict``, ``per_shot_logits``,
    ``training_loss``): ``query_img`` (B, 3, H, W) and ``support_imgs`` (B, K, 3, H, W),
    floating-point and ImageNet-normalised (``fss.data.transforms.image_to_tensor``), all
    finite; ``support_masks`` (B, K, H, W), float, bool or integer with values in {0, 1}
    only; H and W multiples of 8 and at least 32 (the paper uses 400×400). A 0/255 mask is
    rejected (binarise it with ``(mask > 0).float()``), and so is an all-zero support mask
    unless ``allow_empty_support=True`` (its masked features are then all zero). Bad inputs
    raise :class:`~fss.utils.errors.InputError` with a one-sentence message
    (:mod:`fss.models.inputs`, ``docs/errors.md``).
    """

    def __init__(
        self,
        backbone: str | FeatureBackbone = "resnet50",
        weights: str | Path | None = None,
        use_support_mask: bool = True,
        kernel: str = "center_pivot",
        taps: str = "all",
        pyramid_levels: Sequence[int] = (2, 3, 4),
        layers_per_block: int = 3,
        finetune_backbone: bool = False,
        backbone_lr_scale: float = 0.01,
        fast_paths: bool | None = None,
    ) -> None:
        super().__init__()
        self.fast_paths = fast_paths
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights)
        self.backbone = backbone
        self.backbone.freeze()
        self._folded_backbone = FoldedCache()  # not a submodule: no state-dict keys
        self.finetune_backbone = bool(finetune_backbone)
        self.backbone_lr_scale = float(backbone_lr_scale)
        if self.finetune_backbone:
            # Gradients, but the frozen flag keeps BatchNorm in eval mode (paper Fig. 9).
            self.backbone.requires_grad_(True)
        self.use_support_mask = use_support_mask
        if sorted(set(backbone.tap_groups)) != [2, 3, 4]:
            raise ValueError(
                f"HSNet needs taps at levels 2, 3 and 4, got {sorted(set(backbone.tap_groups))}"
            )
        self.tap_indices = select_taps(backbone.tap_groups, taps, pyramid_levels)
        self.tap_groups = [backbone.tap_groups[i] for i in self.tap_indices]
        counts = [self.tap_groups.count(level) for level in sorted(set(self.tap_groups), reverse=True)]
        self.learner = HypercorrelationLearner(counts, kernel, layers_per_block)

    # ------------------------------------------------------------------ model contract
    def per_shot_logits(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> Tensor:
        """The 1-shot model applied to each support: (B, K, 2, H, W) logits.

        The query is encoded once for all K shots and the B·K supports go through the
        backbone as one batch; the learner then runs on B·K (query, support) pairs.
        """
        masks = _validate(query_img, support_imgs, support_masks, allow_empty_support)
        return self._per_shot_logits(query_img, support_imgs, masks)

    def _per_shot_logits(self, query_img: Tensor, support_imgs: Tensor, masks: Tensor) -> Tensor:
        """:meth:`per_shot_logits` of a checked episode (``masks`` in the images' dtype)."""
        with ops_fast_paths(self.fast_paths):
            batch, shots, _, height, width = support_imgs.shape
            support_imgs = support_imgs.flatten(0, 1)
            support_masks = masks.flatten(0, 1)
            # The backbone is frozen: no graph through it, which saves most of the memory.
            with contextlib.nullcontext() if self.finetune_backbone else torch.no_grad():
                query_features, support_features = self._encode(query_img, support_imgs)
                if self.use_support_mask:
                    support_features = mask_features(support_features, support_masks)
                # The learner's first 4D convs read large, partly masked-out levels as
                # boxes (fss.ops.correlation.BoxedCorrelation) instead of mostly-zero
                # tensors, in inference and in training. A compiled learner gets dense
                # levels: each episode's boxes would be new constants, a recompile each.
                compiled = getattr(self.learner, "_compiled_call_impl", None) is not None
                pyramid = hypercorrelation_pyramid(
                    query_features, support_features, self.tap_groups, boxed=not compiled)
            logits = self.learner(pyramid)  # (B*K, 2, H/4, W/4)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
            return logits.view(batch, shots, 2, height, width)

    def _encode(self, query_img: Tensor, support_imgs: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Taps of the B queries and the B·K supports from ONE backbone pass over all images.

        A frozen backbone runs as its BatchNorm-folded channels-last copy
        (:mod:`fss.ops.folding`): same maps up to float rounding, no BatchNorm passes.
        """
        images = torch.cat([query_img, support_imgs])
        backbone = self.backbone
        if not self.finetune_backbone:
            backbone = self._folded_backbone.get(self.backbone)
            images = images.contiguous(memory_format=torch.channels_last)
        features = self._taps(backbone(images))
        batch = query_img.shape[0]
        return [f[:batch] for f in features], [f[batch:] for f in features]

    @staticmethod
    def check_image_size(height: int, width: int) -> None:
        """Raises :class:`~fss.utils.errors.InputError` for an input size HSNet cannot take
        (checked by the run before any stage, and by every forward pass)."""
        _check_size(height, width)

    def forward(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> Tensor:
        """Segmentation logits (B, 2, H, W) of the query (channel 1 = foreground).

        K = 1: the official output (learner logits upsampled bilinearly, align_corners=True,
        to the input size). K > 1: the mean of the K per-shot 1-shot logits, a differentiable
        aggregate for training or soft outputs. The official K-shot rule is the vote of
        :meth:`predict`, which is what evaluation should use.
        """
        return self.per_shot_logits(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        ).mean(dim=1)

    @torch.no_grad()
    def predict(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> Tensor:
        """Binary query mask (B, H, W) int64 in {0, 1}.

        K = 1: argmax of the logits. K > 1 (official ``predict_mask_nshot``): sum the K
        per-shot argmax masks, divide by the episode's highest vote (floored at 1), and
        call foreground where the ratio is >= 0.5.
        """
        logits = self.per_shot_logits(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        )
        return self.combine_shots(logits)

    @staticmethod
    def combine_shots(per_shot_logits: Tensor) -> Tensor:
        """HSNet's K-shot rule: (B, K, 2, H, W) per-shot logits at any size -> (B, H, W)
        int64 {0, 1}, the vote of :func:`vote` (used by :meth:`predict` and by evaluation
        at the original label size)."""
        return vote(per_shot_logits)

    def training_loss(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        query_mask: Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> dict[str, Tensor]:
        """Mean cross-entropy of the (B, 2, H, W) logits against the binarised query mask.

        ``query_mask`` (B, H, W) int64 in {0, 1, 255}: 1 = foreground; everything else,
        including the ignore value 255, is background, as in the official training (no
        ignore_index). Returns ``{"loss", "logits", "ce"}``.
        """
        masks = _validate(query_img, support_imgs, support_masks, allow_empty_support)
        check_query_mask(query_mask, query_img)
        logits = self._per_shot_logits(query_img, support_imgs, masks).mean(dim=1)
        target = (query_mask == 1).long()
        ce = F.cross_entropy(logits, target)
        return {"loss": ce, "logits": logits, "ce": ce}

    def _taps(self, features: list[Tensor]) -> list[Tensor]:
        """The backbone taps this model correlates (all of them for the paper's model)."""
        if len(self.tap_indices) == len(features):
            return features
        return [features[i] for i in self.tap_indices]

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """The learner's parameters (the backbone is frozen); with ``finetune_backbone``,
        two groups: the learner's, and the backbone's with ``lr_scale`` (see
        ``fss.lightning.optim.parameter_groups``)."""
        if not self.finetune_backbone:
            return list(self.learner.parameters())
        return [
            {"params": list(self.learner.parameters())},
            {"params": list(self.backbone.parameters()), "lr_scale": self.backbone_lr_scale},
        ]

    def train(self, mode: bool = True) -> HSNet:
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm statistics, whatever the parent asks
        return self

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_official_checkpoint(
        cls, path: str | Path | Mapping, backbone: str | None = None, **kwargs
    ) -> HSNet:
        """An HSNet in eval mode with the weights of an official ``best_model.pt``
        (juhongm999/hsnet: the DataParallel state dict, backbone included; key table
        :mod:`fss.models.hsnet_keys`).

        The backbone is read from the file (``backbone``, if given, must agree); ``kwargs``
        go to the constructor. Unknown, missing or mis-shaped keys raise a
        :class:`~fss.models.checkpoint_io.CheckpointMismatchError` that names them.
        """
        checkpoint = read_official(path, kinds=("hsnet",))
        layout = checkpoint.layout
        if backbone is not None and backbone != layout.backbone:
            raise ConfigError(f"{checkpoint.name} is an official HSNet {layout.backbone} "
                              f"checkpoint, not {backbone}: pass backbone={layout.backbone}")
        model = cls(layout.backbone, weights=None, **kwargs)
        load_official_state_dict(model, "hsnet", checkpoint.state, checkpoint.name)
        log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
        return model.eval()

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the official HSNet state dict (``module.hpn_learner.encoder_layer4...``, or a
        dict holding it under ``state_dict``) into this model, backbone included; every key
        must match (see :mod:`fss.models.checkpoint_io`)."""
        load_official_state_dict(self, "hsnet", unwrap_state_dict(state_dict))


def select_taps(tap_groups: Sequence[int], taps: str, pyramid_levels: Sequence[int]) -> list[int]:
    """Indices of the backbone taps correlated by an HSNet with these options.

    Args:
        tap_groups: pyramid level of each backbone tap, in depth order.
        taps: ``all``, ``shallow`` (first tap of each level) or ``deep`` (last tap).
        pyramid_levels: the levels kept, one of :data:`PYRAMIDS`.
    """
    if taps not in TAPS:
        raise ConfigError(f"model.net.taps={taps!r} is not supported; accepted: {', '.join(TAPS)}")
    levels = tuple(sorted(int(level) for level in pyramid_levels))
    if levels not in PYRAMIDS:
        accepted = " | ".join(str(list(p)) for p in PYRAMIDS)
        raise ConfigError(f"model.net.pyramid_levels={list(pyramid_levels)} is not supported; "
                          f"accepted: {accepted} (the paper's C(1:3), C(2:3), C(3))")
    indices = []
    for level in levels:
        of_level = [i for i, group in enumerate(tap_groups) if group == level]
        if taps == "all":
            indices += of_level
        else:
            indices.append(of_level[0] if taps == "shallow" else of_level[-1])
    return indices


def vote(per_shot_logits: Tensor) -> Tensor:
    """Official K-shot voting: (B, K, 2, H, W) logits -> (B, H, W) int64 {0, 1}.

    For K = 1 this is the plain argmax.
    """
    # argmax over the 2 classes (ties -> background, as argmax's first index); the
    # comparison is ~300x faster than argmax over this strided size-2 dim on a CPU.
    votes = (per_shot_logits[:, :, 1] > per_shot_logits[:, :, 0]).sum(dim=1)  # (B, H, W), 0..K
    if per_shot_logits.shape[1] == 1:
        return votes
    max_vote = votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)
    return (votes.float() / max_vote >= 0.5).long()


def _validate(
    query_img: Tensor, support_imgs: Tensor, support_masks: Tensor, allow_empty_support: bool
) -> Tensor:
    """The shared episode checks (:func:`fss.models.inputs.check_episode`) and HSNet's size
    rule; returns the support masks in the images' dtype."""
    return check_episode(
        query_img,
        support_imgs,
        support_masks,
        allow_empty_support=allow_empty_support,
        size_check=_check_size,
    )


def _check_size(height: int, width: int) -> None:
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < MIN_SIZE:
        raise InputError(
            f"query_img and the supports must be H x W with H and W multiples of {SIZE_MULTIPLE} "
            f"and at least {MIN_SIZE} for HSNet, got {height}x{width}; resize the episode (the "
            "paper uses 400x400)"
        )
