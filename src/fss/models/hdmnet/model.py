"""HDMNet (Peng et al., CVPR 2023): Hierarchically Decoupled Matching Network.

Pipeline for a 473² ResNet-50 episode (B queries, K shots; sizes for stride-8 features):

1. Frozen base-class PSPNet (no_grad, eval): layer0..4 and feat5 = cls[0:2] (pre-ReLU)
   for the query and for the K supports. Support images are multiplied by their mask
   before the backbone (``support_mask_mode="image"``, official) or, as BAM does, layer3
   is masked before layer4 (``"feature"``); ``use_support_mask=False`` masks nothing.
2. ``down_query`` / ``down_supp``: concat(layer3, layer2) 1536ch → 1×1 conv 256 → ReLU →
   Dropout2d(0.5) (60²). Prototype = masked average pool of the support map.
3. Two priors (max cosine to the support foreground, no min-max normalisation) from
   feat5 and layer4, in that order, averaged over shots.
4. Tokens: ``query_merge`` [256 | prototype (mean over shots) | 10·priors] → 64, ReLU;
   ``supp_merge`` [256 | own prototype] → 64, ReLU.
5. ``transformer``: self-attention pyramid (60² → 30² → 15², shared by query and
   support), one matching module per stage run coarse → fine, decoder and 2-class
   classifier (``HierarchicalTransformer``) → meta logits at 60² and the correlation maps.
6. Base-learner ensemble (``BaseLearnerEnsemble``) → final scores, upsampled bilinearly
   (``align_corners=True``) to the input size.

Training loss (``training_loss``): CE(final) + CE(meta) + ``distill_weight``·distillation,
CE with ignore index 255 at full resolution. The official code also adds the base
learner's CE, which has no gradient (frozen) and needs base-class labels: left out.

Learnable parameters, PASCAL ResNet-50 1-shot: 4,161,734 (transformer 3,309,634 = down
stages 557,120 + matching 271,296 + parse 1,872,960 + classifier 608,258; down_supp and
down_query 393,216 each; supp_merge 32,768; query_merge 32,896; gram_merge 2; cls_merge 2).
5-shot: + 27 (``kshot_rw`` 5→2→5 with biases) = 4,161,761.

Differences from the official code, by design: ``kshot_rw`` is trainable and un-permuted
correctly (see ``ensemble``); the frozen base learner's Dropout2d is off in training too
(the official code only freezes BatchNorm, so its base learner drops channels while
training); the BAM exclusion of the episode class from the base map is driven by an
explicit ``class_ids`` argument instead of the training flag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fss.models.checkpoint_io import load_official_state_dict, read_official
from fss.models.hdmnet.attention import SelfAttentionStage
from fss.models.hdmnet.distillation import correlation_distillation_loss
from fss.models.hdmnet.ensemble import BaseLearnerEnsemble, gram_distance
from fss.models.hdmnet.matching import MATCHING_MODES, MatchingStage
from fss.models.hdmnet.priors import masked_average_pool, max_cosine_prior
from fss.models.inputs import check_episode, check_query_mask
from fss.models.pspnet import (
    IGNORE_INDEX,
    PSPFeatures,
    PSPNet,
    check_input_size,
    load_pspnet_checkpoint,
)
from fss.ops import fast_paths as ops_fast_paths
from fss.ops.boxes import mask_boxes
from fss.ops.folding import FoldedCache

log = logging.getLogger(__name__)

SUPPORT_MASK_MODES = ("image", "feature")
MAX_STAGES = 4
# Per-stage settings; the official model uses the first three. The fourth (S4 ablation)
# repeats the last stage's settings: stride-2 3×3 patch embedding, 8 heads, no reduction.
STAGE_HEADS = (2, 4, 8, 8)
STAGE_SR_RATIOS = (4, 2, 1, 1)
STAGE_PATCH_SIZES = (1, 3, 3, 3)
STAGE_STRIDES = (1, 2, 2, 2)


def _support_feat5(pspnet: PSPNet, layer4: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The supports' feat5 (B·K, C, h, w) wherever the prior reads it.

    The prior multiplies support features by the nearest-resized mask, so only positions
    inside a support's mask matter: where :func:`fss.ops.boxes.mask_boxes` finds boxes
    worth pruning, feat5 (the PSPNet head's 3x3 conv over 4096 channels, the largest conv
    of the pass) is computed inside each mask's bounding box only and is 0 elsewhere.
    """
    boxes = mask_boxes(masks, layer4.shape[-2:])
    return pspnet.feat5(layer4) if boxes is None else pspnet.feat5_in_boxes(layer4, boxes)


def _parse_block(dim: int) -> nn.Sequential:
    """1×1 dim→4dim + BN, 3×3 4dim→4dim + BN, 1×1 4dim→dim + BN + ReLU (official layout:
    no activation between the first two)."""
    return nn.Sequential(
        nn.Conv2d(dim, dim * 4, kernel_size=1),
        nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, dim * 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, dim, kernel_size=1),
        nn.BatchNorm2d(dim),
        nn.ReLU(),
    )


def _classifier(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, dim * 4, kernel_size=1),
        nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, dim * 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(dim * 4),
        nn.Conv2d(dim * 4, 2, kernel_size=1),
    )


class HierarchicalTransformer(nn.Module):
    """Self-attention pyramid + matching modules + coarse-to-fine decoder + classifier.

    ``down_sample_layers[i]``: stage i (patch embed, 2 encoder layers, LN);
    ``match_layers[i]``: matching at stage i; ``parse_layers[i]``: decoder block of stage i.
    """

    def __init__(
        self,
        dim: int = 64,
        num_stages: int = 3,
        num_heads: Sequence[int] = STAGE_HEADS,
        sr_ratios: Sequence[int] = STAGE_SR_RATIOS,
        match_heads: int = 2,
        matching: str = "cosine",
        num_prior_channels: int = 2,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 1 <= num_stages <= MAX_STAGES:
            raise ValueError(f"num_stages must be in 1..{MAX_STAGES}, got {num_stages}")
        if len(num_heads) < num_stages or len(sr_ratios) < num_stages:
            raise ValueError(f"num_heads and sr_ratios need {num_stages} entries")
        self.num_stages = num_stages
        self.down_sample_layers = nn.ModuleList(
            SelfAttentionStage(
                dim,
                num_heads[i],
                sr_ratios[i],
                STAGE_PATCH_SIZES[i],
                STAGE_STRIDES[i],
                mlp_ratio=mlp_ratio,
                dropout=dropout,
            )
            for i in range(num_stages)
        )
        self.match_layers = nn.ModuleList(
            MatchingStage(dim, match_heads, num_prior_channels, matching, mlp_ratio, dropout)
            for _ in range(num_stages)
        )
        self.parse_layers = nn.ModuleList(_parse_block(dim) for _ in range(num_stages))
        self.cls = _classifier(dim)

    def forward(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_masks: torch.Tensor,
        priors: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """query (B, C, h, w); support (B·K, C, h, w); support_masks (B, K, H, W) binary;
        priors (B, P, h, w) → meta logits (B, 2, h, w) at stage-0 resolution and the
        correlation maps C' (B, h_l, w_l), coarse → fine."""
        batch, shots = support_masks.shape[:2]
        flat_masks = support_masks.flatten(0, 1).unsqueeze(1).to(support.dtype)
        query_tokens, support_tokens, query_hws, token_masks, stage_priors = [], [], [], [], []
        for stage in self.down_sample_layers:
            query_t, query_hw = stage(query)
            support_t, support_hw = stage(support)
            mask = F.interpolate(flat_masks, size=support_hw, mode="nearest")
            query_tokens.append(query_t)
            # K shots side by side along the token axis: (B, K·Ls, C).
            support_tokens.append(support_t.reshape(batch, shots * support_t.shape[1], -1))
            token_masks.append(mask.reshape(batch, -1))
            query_hws.append(query_hw)
            stage_priors.append(
                F.interpolate(priors, size=query_hw, mode="bilinear", align_corners=True)
            )
            query = query_t.transpose(1, 2).reshape(batch, -1, *query_hw)
            support = support_t.transpose(1, 2).reshape(support.shape[0], -1, *support_hw)

        correlations = []
        decoded = None
        for i in reversed(range(self.num_stages)):
            matched, correlation = self.match_layers[i](
                query_tokens[i], query_hws[i], support_tokens[i], token_masks[i], stage_priors[i]
            )
            correlations.append(correlation)
            if decoded is None:
                decoded = self.parse_layers[i](matched)
            else:
                decoded = F.interpolate(
                    decoded, size=matched.shape[-2:], mode="bilinear", align_corners=False
                )
                decoded = decoded + self.parse_layers[i](matched + decoded)
        return self.cls(decoded), correlations


@dataclass
class HDMNetOutput:
    """Feature-resolution outputs of one pass (h, w = stride-8 feature size)."""

    final: torch.Tensor  # (B, 2, h, w) ensemble scores (meta logits without the ensemble)
    meta: torch.Tensor  # (B, 2, h, w) meta-learner logits
    base: torch.Tensor | None  # (B, 1 + N_base, h, w) base-learner logits
    correlations: list[torch.Tensor]  # C' maps (B, h_l, w_l), coarse → fine


class HDMNet(nn.Module):
    """HDMNet few-shot segmenter (``fss.models`` contract: forward / predict /
    training_loss / trainable_parameters).

    Args:
        backbone: PSPNet backbone, ``resnet50`` | ``resnet101`` | ``vgg16`` |
            ``resnet_small`` (synthetic benchmark).
        weights: base-learner (PSPNet) checkpoint: ``None`` = random PSPNet; a path or a
            loaded dict: a plain ``PSPNet`` state dict, an official ``best.pth``, or a dict
            with ``state_dict`` (``weights_prefix`` selects and strips e.g. ``"model."``).
            A checkpoint whose classifier has not ``num_classes_base + 1`` outputs is
            refused.
        num_classes_base: base classes of the fold (15 PASCAL-5i, 60 COCO-20i, 15 for
            the synthetic 20-class benchmark); the base learner has one more output
            (background).
        shot: K the model is trained for (only ``kshot_rw`` depends on it; forward accepts
            any K).
        backbone_weights: ImageNet file for the PSPNet backbone when ``weights`` is None.
        support_mask_mode: ``image`` (official: support image × mask) | ``feature`` (BAM:
            layer3 × mask before layer4).
        use_support_mask: False = no masking of the support input/features at all (the
            mask still drives prototypes, priors and matching).
        num_stages: 1..4 pyramid stages (ablation S1–S4; official 3).
        matching: ``cosine`` (HDMNet matching) | ``dot`` (plain cross-attention ablation).
        use_distill, distill_weight, distill_temperature: correlation distillation.
        use_ensemble: BAM base-learner ensemble (off: the meta logits are the output and
            no merge layers exist).
        backbone_relu: apply the ReLU to feat5 before the prior. The official model takes
            feat5 = cls[0:2] BEFORE the ReLU that ends the PSPNet head, so the prior keeps
            negative activations; True computes it on the ReLU output instead (the ReLU-
            ended features that PFENet/BAM-style priors use). The base learner always
            sees its own ReLU.
        kshot_hidden: width of ``kshot_rw`` (official ``kshot_trans_dim`` 2).
        strict_size: require (H − 1) % 8 == 0 (see ``fss.models.pspnet``).
        head_channels: width of the PSPNet ``cls`` conv (default 512; 128 for
            ``resnet_small``) — must match the checkpoint.
        fast_paths: run this model's passes on the fast kernels (``True``) or on their
            straightforward references (``False``, :mod:`fss.ops`); ``None`` follows the
            process-wide switch (``fss.ops.set_fast_paths``, env ``FSS_FAST_PATHS``).

    Inputs of every entry point (``forward``, ``predict``, ``training_loss``,
    ``correlation_maps``): ``query_img`` (B, 3, H, W) and ``support_imgs`` (B, K, 3, H, W),
    floating-point and ImageNet-normalised (``fss.data.transforms.image_to_tensor``), all
    finite; ``support_masks`` (B, K, H, W), float, bool or integer with values in {0, 1}
    only. A 0/255 mask is rejected (binarise it with ``(mask > 0).float()``), and so is an
    all-zero support mask unless ``allow_empty_support=True`` (its prototype and priors
    are then zero). Bad inputs raise :class:`~fss.utils.errors.InputError` with a
    one-sentence message (:mod:`fss.models.inputs`, ``docs/errors.md``).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | Path | Mapping | None = None,
        num_classes_base: int = 15,
        shot: int = 1,
        *,
        weights_prefix: str | None = None,
        backbone_weights: str | Path | None = None,
        support_mask_mode: str = "image",
        use_support_mask: bool = True,
        num_stages: int = 3,
        matching: str = "cosine",
        use_distill: bool = True,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        use_ensemble: bool = True,
        backbone_relu: bool = False,
        kshot_hidden: int = 2,
        strict_size: bool = True,
        head_channels: int | None = None,
        embed_dim: int = 64,
        reduce_dim: int = 256,
        prior_scale: float = 10.0,
        fast_paths: bool | None = None,
    ) -> None:
        super().__init__()
        self.fast_paths = fast_paths
        if support_mask_mode not in SUPPORT_MASK_MODES:
            raise ValueError(
                f"unknown support_mask_mode {support_mask_mode!r}; accepted: {', '.join(SUPPORT_MASK_MODES)}"
            )
        if matching not in MATCHING_MODES:
            raise ValueError(
                f"unknown matching {matching!r}; accepted: {', '.join(MATCHING_MODES)}"
            )
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.shot = shot
        self.num_classes_base = num_classes_base
        self.support_mask_mode = support_mask_mode
        self.use_support_mask = use_support_mask
        self.use_distill = use_distill
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.use_ensemble = use_ensemble
        self.backbone_relu = backbone_relu
        self.prior_scale = prior_scale

        self.pspnet = PSPNet(
            backbone,
            num_classes=num_classes_base + 1,
            backbone_weights=None if weights is not None else backbone_weights,
            head_channels=head_channels,
            strict_size=strict_size,
        )
        if weights is not None:
            load_pspnet_checkpoint(self.pspnet, weights, prefix=weights_prefix)
        self.pspnet.requires_grad_(False)
        self.pspnet.eval()
        self._folded_pspnet = FoldedCache()  # not a submodule: no state-dict keys

        channels = self.pspnet.stage_channels
        feature_dim = channels[2] + channels[3]
        self.down_query = self._reduction(feature_dim, reduce_dim)
        self.down_supp = self._reduction(feature_dim, reduce_dim)
        num_priors = 2
        self.query_merge = nn.Sequential(
            nn.Conv2d(2 * reduce_dim + num_priors, embed_dim, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.supp_merge = nn.Sequential(
            nn.Conv2d(2 * reduce_dim, embed_dim, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.transformer = HierarchicalTransformer(
            dim=embed_dim, num_stages=num_stages, matching=matching, num_prior_channels=num_priors
        )
        self.ensemble = BaseLearnerEnsemble(shot, kshot_hidden) if use_ensemble else None
        self.train()  # puts the PSPNet and every BatchNorm in eval mode

    @staticmethod
    def _reduction(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.5),
        )

    # ---------------------------------------------------------------- train / eval modes
    def train(self, mode: bool = True) -> HDMNet:
        """Dropouts follow ``mode``; the PSPNet and every BatchNorm stay in eval mode."""
        super().train(mode)
        self.pspnet.eval()
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ------------------------------------------------------------------------- the pass
    def _backbone_features(self, query_img, support_imgs, support_masks):
        """Frozen features of the query and of the B·K supports (no_grad); ``support_masks``
        checked, {0, 1} in the images' dtype."""
        flat_masks = support_masks.flatten(0, 1).unsqueeze(1)  # (B·K, 1, H, W)
        flat_imgs = support_imgs.flatten(0, 1)
        layer3_mask = None
        if self.use_support_mask and self.support_mask_mode == "image":
            flat_imgs = flat_imgs * F.interpolate(
                flat_masks, size=flat_imgs.shape[-2:], mode="nearest"
            )
        elif self.use_support_mask:
            layer3_mask = flat_masks
        # The frozen PSPNet runs as its BatchNorm-folded channels-last copy (same maps up
        # to float rounding, fss.ops.folding); query and supports in one pass when no
        # feature-level mask separates them.
        pspnet = self._folded_pspnet.get(self.pspnet)
        channels_last = torch.channels_last
        with torch.no_grad():
            if layer3_mask is None:
                images = torch.cat([query_img, flat_imgs]).contiguous(memory_format=channels_last)
                layers = pspnet.run_backbone(images)
                batch = query_img.shape[0]
                query_layers = [layer[:batch] for layer in layers]
                support_layers = [layer[batch:] for layer in layers]
            else:
                query_layers = pspnet.run_backbone(
                    query_img.contiguous(memory_format=channels_last))
                support_layers = pspnet.run_backbone(
                    flat_imgs.contiguous(memory_format=channels_last), layer3_mask=layer3_mask
                )
            query = PSPFeatures(*query_layers, feat5=pspnet.feat5(query_layers[4]))
            support = PSPFeatures(
                *support_layers, feat5=_support_feat5(pspnet, support_layers[4], flat_masks))
        return query, support, flat_masks

    @staticmethod
    def _mid_level(features) -> torch.Tensor:
        """concat(layer3, layer2), layer2 resized to layer3 (VGG) → (N, C2 + C3, h, w)."""
        layer2 = features.layer2
        if layer2.shape[-2:] != features.layer3.shape[-2:]:
            layer2 = F.interpolate(
                layer2, size=features.layer3.shape[-2:], mode="bilinear", align_corners=True
            )
        return torch.cat([features.layer3, layer2], dim=1)

    def _forward_parts(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        allow_empty_support: bool = False,
    ) -> HDMNetOutput:
        """Check the episode (:func:`fss.models.inputs.check_episode`), then run it."""
        support_masks = check_episode(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        )
        return self._forward_checked(query_img, support_imgs, support_masks, class_ids)

    def _forward_checked(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> HDMNetOutput:
        """One pass over a checked episode (``support_masks`` {0, 1} in the images' dtype)."""
        with ops_fast_paths(self.fast_paths):
            batch, shots = support_imgs.shape[:2]
            query, support, flat_masks = self._backbone_features(query_img, support_imgs, support_masks)

            query_feat = self.down_query(self._mid_level(query))
            support_feat = self.down_supp(self._mid_level(support))
            size = query_feat.shape[-2:]
            small_masks = F.interpolate(
                flat_masks, size=support_feat.shape[-2:], mode="bilinear", align_corners=True
            )
            prototypes = masked_average_pool(support_feat, small_masks)  # (BK, 256, 1, 1)

            masks_5d = flat_masks.unflatten(0, (batch, shots))
            query_feat5, support_feat5 = query.feat5, support.feat5
            if self.backbone_relu:
                query_feat5, support_feat5 = F.relu(query_feat5), F.relu(support_feat5)
            priors = []
            for q, s in ((query_feat5, support_feat5), (query.layer4, support.layer4)):
                prior = max_cosine_prior(q, s.unflatten(0, (batch, shots)), masks_5d)
                if prior.shape[-2:] != size:
                    prior = F.interpolate(prior, size=size, mode="bilinear", align_corners=True)
                priors.append(prior)
            priors = torch.cat(priors, dim=1)  # (B, 2, h, w): [feat5, layer4]

            support_tokens = self.supp_merge(
                torch.cat([support_feat, prototypes.expand_as(support_feat)], dim=1)
            )
            mean_prototype = prototypes.unflatten(0, (batch, shots)).mean(dim=1)
            query_tokens = self.query_merge(
                torch.cat(
                    [query_feat, mean_prototype.expand_as(query_feat), self.prior_scale * priors], dim=1
                )
            )
            meta, correlations = self.transformer(
                query_tokens, support_tokens, masks_5d.squeeze(2), priors
            )

            if self.ensemble is None:
                return HDMNetOutput(final=meta, meta=meta, base=None, correlations=correlations)
            with torch.no_grad():
                base = self.pspnet.base_learner(query.feat5)
                distances = gram_distance(query.layer2, support.layer2.unflatten(0, (batch, shots)))
            if base.shape[-2:] != meta.shape[-2:]:
                base = F.interpolate(base, size=meta.shape[-2:], mode="bilinear", align_corners=True)
            final = self.ensemble(meta, base, distances, class_ids)
            return HDMNetOutput(final=final, meta=meta, base=base, correlations=correlations)

    @staticmethod
    def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    # ------------------------------------------------------------------------ contract
    @staticmethod
    def check_image_size(height: int, width: int, strict_size: bool = True) -> None:
        """Raises ValueError for an input size the PSPNet base learner cannot take (checked
        by the run before any stage, and by every forward pass)."""
        check_input_size(height, width, strict=strict_size)

    def forward(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> torch.Tensor:
        """query_img (B,3,H,W), support_imgs (B,K,3,H,W), support_masks (B,K,H,W) →
        logits (B,2,H,W) (ensemble scores; CE / argmax are taken on them as logits)."""
        parts = self._forward_parts(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        )
        return self._upsample(parts.final, query_img.shape[-2:])

    @torch.no_grad()
    def predict(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> torch.Tensor:
        """(B,H,W) int64 in {0, 1}."""
        logits = self(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        )
        # = argmax over the 2 classes (ties -> 0), much faster than argmax on a CPU.
        return (logits[:, 1] > logits[:, 0]).long()

    def training_loss(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        query_mask: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        *,
        allow_empty_support: bool = False,
    ) -> dict[str, torch.Tensor]:
        """query_mask (B,H,W) int64: 1 target, 0 other, 255 ignore (no other value).

        ``class_ids`` (B,) int64, optional: 0-based index of each episode's class in the
        fold's base-class list (``fss.data.folds.base_classes(...).index(class_id)``, i.e.
        the semantic label minus 1), removed from the base learner's "any base class" map
        as BAM does in training; −1 (or None) removes nothing. Pass it for training
        episodes, not for test episodes.

        Returns ``loss``, ``logits`` (B,2,H,W), ``ce_final``, ``ce_meta``, ``distill``."""
        support_masks = check_episode(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        )
        check_query_mask(query_mask, query_img)
        parts = self._forward_checked(query_img, support_imgs, support_masks, class_ids)
        size = query_img.shape[-2:]
        target = query_mask.long()
        final = self._upsample(parts.final, size)
        ce_meta = F.cross_entropy(
            self._upsample(parts.meta, size), target, ignore_index=IGNORE_INDEX
        )
        ce_final = (
            ce_meta
            if self.ensemble is None
            else F.cross_entropy(final, target, ignore_index=IGNORE_INDEX)
        )
        if self.use_distill:
            distill = correlation_distillation_loss(
                parts.correlations, target, self.distill_temperature
            )
        else:
            distill = final.new_zeros(())
        loss = ce_meta + self.distill_weight * distill
        if self.ensemble is not None:
            loss = loss + ce_final
        return {
            "loss": loss,
            "logits": final,
            "ce_final": ce_final,
            "ce_meta": ce_meta,
            "distill": distill,
        }

    def correlation_maps(
        self,
        query_img: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        *,
        allow_empty_support: bool = False,
    ) -> list[torch.Tensor]:
        """Per-stage correlation maps C' (B, h_l, w_l), coarse → fine (15², 30², 60² at 473²)."""
        return self._forward_parts(
            query_img, support_imgs, support_masks, allow_empty_support=allow_empty_support
        ).correlations

    def trainable_parameters(self) -> list[dict]:
        """Optimizer groups: the transformer at the base lr, the reduction / merge layers
        (``down_query``, ``down_supp``, ``query_merge``, ``supp_merge``, ``gram_merge``,
        ``cls_merge``, ``kshot_rw``) at 10× (``lr_scale``). The frozen PSPNet is absent."""
        fast_modules = [self.down_query, self.down_supp, self.query_merge, self.supp_merge]
        if self.ensemble is not None:
            fast_modules.append(self.ensemble)
        fast = [p for m in fast_modules for p in m.parameters() if p.requires_grad]
        return [
            {
                "params": [p for p in self.transformer.parameters() if p.requires_grad],
                "lr_scale": 1.0,
                "name": "transformer",
            },
            {"params": fast, "lr_scale": 10.0, "name": "reduce_merge"},
        ]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def from_official_checkpoint(cls, path: str | Path | Mapping, **kwargs) -> HDMNet:
        """An HDMNet in eval mode from an official checkpoint (Pbihao/HDMNet
        ``train_epoch_*.pth`` / ``final.pth``: the whole ``OneModel``, frozen PSPNet
        included; key table :mod:`fss.models.hdmnet_keys`), or from a BAM PSPNet
        ``best.pth`` (only the base learner is loaded; the meta-learner keeps its
        initialisation: the starting point of official training).

        Backbone, base-class count and shot are read from the file; ``kwargs`` go to the
        constructor and win. Unknown, missing or mis-shaped keys raise a
        :class:`~fss.models.checkpoint_io.CheckpointMismatchError` that names them.
        """
        checkpoint = read_official(path, kinds=("hdmnet", "pspnet"))
        layout = checkpoint.layout
        settings: dict = {"backbone": layout.backbone, "shot": layout.shot,
                          "kshot_hidden": layout.kshot_hidden}
        if layout.num_classes is not None:
            settings["num_classes_base"] = layout.num_classes - 1
        settings.update(kwargs)
        settings["weights"] = None
        model = cls(**settings)
        if layout.kind == "hdmnet":
            load_official_state_dict(model, "hdmnet", checkpoint.state, checkpoint.name)
        else:
            load_official_state_dict(model.pspnet, "pspnet", checkpoint.state, checkpoint.name)
            log.warning("%s is a base learner only: HDMNet's meta-learner keeps its random "
                        "initialisation (train it before testing)", checkpoint.name)
        log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
        return model.eval()
