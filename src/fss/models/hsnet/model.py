"""HSNet: Hypercorrelation Squeeze Networks for few-shot segmentation (Min et al., ICCV 2021)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fss.models.backbones import FeatureBackbone, build_backbone
from fss.models.hsnet.correlation import hypercorrelation_pyramid, mask_features
from fss.models.hsnet.learner import HypercorrelationLearner

MIN_SIZE = 32
SIZE_MULTIPLE = 8


class HSNet(nn.Module):
    """HSNet on a frozen backbone; only the learner (~2.57M parameters) is trained.

    Args:
        backbone: ``vgg16``, ``resnet50``, ``resnet101`` (paper) or ``resnet18``, or a built
            :class:`~fss.models.backbones.FeatureBackbone`.
        weights: backbone weights, see :func:`~fss.models.backbones.build_backbone`.
        use_support_mask: multiply support features by the support mask (the paper's model).
            ``False`` is the "no support masking" ablation (Tab. 1 †).

    Shapes: ``query_img`` (B, 3, H, W), ``support_imgs`` (B, K, 3, H, W), ``support_masks``
    (B, K, H, W) in {0, 1}; H and W multiples of 8 and at least 32 (the paper uses 400×400).
    """

    def __init__(
        self,
        backbone: str | FeatureBackbone = "resnet50",
        weights: str | Path | None = None,
        use_support_mask: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights)
        self.backbone = backbone
        self.backbone.freeze()
        self.use_support_mask = use_support_mask
        counts = {level: backbone.tap_groups.count(level) for level in backbone.levels}
        if sorted(counts) != [2, 3, 4]:
            raise ValueError(f"HSNet needs taps at levels 2, 3 and 4, got {sorted(counts)}")
        self.learner = HypercorrelationLearner([counts[4], counts[3], counts[2]])

    # ------------------------------------------------------------------ model contract
    def per_shot_logits(
        self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor
    ) -> Tensor:
        """The 1-shot model applied to each support: (B, K, 2, H, W) logits.

        The query is encoded once for all K shots and the B·K supports go through the
        backbone as one batch; the learner then runs on B·K (query, support) pairs.
        """
        batch, shots, _, height, width = _validate(query_img, support_imgs, support_masks)
        support_imgs = support_imgs.flatten(0, 1)
        support_masks = support_masks.flatten(0, 1).to(support_imgs.dtype)
        # The backbone is frozen: no graph through it, which saves most of the memory.
        with torch.no_grad():
            query_features = self.backbone(query_img)
            support_features = self.backbone(support_imgs)
            if self.use_support_mask:
                support_features = mask_features(support_features, support_masks)
            pyramid = hypercorrelation_pyramid(
                query_features, support_features, self.backbone.tap_groups
            )
        logits = self.learner(pyramid)  # (B*K, 2, H/4, W/4)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
        return logits.view(batch, shots, 2, height, width)

    def forward(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor) -> Tensor:
        """Segmentation logits (B, 2, H, W) of the query (channel 1 = foreground).

        K = 1: the official output (learner logits upsampled bilinearly, align_corners=True,
        to the input size). K > 1: the mean of the K per-shot 1-shot logits, a differentiable
        aggregate for training or soft outputs. The official K-shot rule is the vote of
        :meth:`predict`, which is what evaluation should use.
        """
        return self.per_shot_logits(query_img, support_imgs, support_masks).mean(dim=1)

    @torch.no_grad()
    def predict(self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor) -> Tensor:
        """Binary query mask (B, H, W) int64 in {0, 1}.

        K = 1: argmax of the logits. K > 1 (official ``predict_mask_nshot``): sum the K
        per-shot argmax masks, divide by the episode's highest vote (floored at 1), and
        call foreground where the ratio is >= 0.5.
        """
        logits = self.per_shot_logits(query_img, support_imgs, support_masks)
        return vote(logits)

    def training_loss(
        self, query_img: Tensor, support_imgs: Tensor, support_masks: Tensor, query_mask: Tensor
    ) -> dict[str, Tensor]:
        """Mean cross-entropy of the (B, 2, H, W) logits against the binarised query mask.

        ``query_mask`` (B, H, W) int64: 1 = foreground; everything else, including the
        ignore value 255, is background, as in the official training (no ignore_index).
        Returns ``{"loss", "logits", "ce"}``.
        """
        logits = self(query_img, support_imgs, support_masks)
        if query_mask.shape != (logits.shape[0], *logits.shape[-2:]):
            raise ValueError(
                f"query_mask must be (B, H, W) = {(logits.shape[0], *logits.shape[-2:])}, "
                f"got {tuple(query_mask.shape)}"
            )
        target = (query_mask == 1).long()
        ce = F.cross_entropy(logits, target)
        return {"loss": ce, "logits": logits, "ce": ce}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The learner's parameters (the backbone is frozen)."""
        return list(self.learner.parameters())

    def train(self, mode: bool = True) -> HSNet:
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm statistics, whatever the parent asks
        return self

    # ------------------------------------------------------------------ checkpoints
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a checkpoint of the official code (juhongm999/hsnet) into this model.

        Accepts the raw DataParallel state dict (``module.hpn_learner.encoder_layer4...``) or
        a dict holding it under ``state_dict``. The backbone keys in it are loaded too (they
        are torchvision's); its classifier head is dropped.
        """
        if isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
        converted = convert_official_state_dict(state_dict)
        own = self.state_dict()
        if not any(key.startswith("backbone.") for key in converted):
            converted.update({k: v for k, v in own.items() if k.startswith("backbone.")})
        missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in converted if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"official checkpoint does not match HSNet({self.backbone.name}): "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
        self.load_state_dict(converted, strict=False)


_OFFICIAL_BLOCKS = {
    "encoder_layer4.": "squeeze_l4.",
    "encoder_layer3.": "squeeze_l3.",
    "encoder_layer2.": "squeeze_l2.",
    "encoder_layer4to3.": "mix_l43.",
    "encoder_layer3to2.": "mix_l32.",
    "decoder1.": "decoder1.",
    "decoder2.": "decoder2.",
}


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official HSNet keys to ours (``module.hpn_learner.encoder_layer4.0.conv1.weight``
    -> ``learner.squeeze_l4.0.conv1.weight``); drops the backbone's classifier head."""
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = re.sub(r"^module\.", "", key)
        if key.startswith("hpn_learner."):
            rest = key[len("hpn_learner.") :]
            for official, ours in _OFFICIAL_BLOCKS.items():
                if rest.startswith(official):
                    key = "learner." + ours + rest[len(official) :]
                    break
        elif key.startswith(("backbone.fc.", "backbone.classifier.")):
            continue
        converted[key] = value
    return converted


def vote(per_shot_logits: Tensor) -> Tensor:
    """Official K-shot voting: (B, K, 2, H, W) logits -> (B, H, W) int64 {0, 1}.

    For K = 1 this is the plain argmax.
    """
    votes = per_shot_logits.argmax(dim=2).sum(dim=1)  # (B, H, W), 0..K
    if per_shot_logits.shape[1] == 1:
        return votes
    max_vote = votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)
    return (votes.float() / max_vote >= 0.5).long()


def _validate(
    query_img: Tensor, support_imgs: Tensor, support_masks: Tensor
) -> tuple[int, int, int, int, int]:
    """Check the episode tensors; returns (B, K, 3, H, W)."""
    if query_img.dim() != 4 or query_img.shape[1] != 3:
        raise ValueError(f"query_img must be (B, 3, H, W), got {tuple(query_img.shape)}")
    batch, _, height, width = query_img.shape
    expected_support = (batch, 3, height, width)
    if (
        support_imgs.dim() != 5
        or (support_imgs.shape[0], *support_imgs.shape[2:]) != expected_support
    ):
        raise ValueError(
            f"support_imgs must be (B, K, 3, H, W) = ({batch}, K, 3, {height}, {width}) like "
            f"the query, got {tuple(support_imgs.shape)}"
        )
    shots = support_imgs.shape[1]
    if shots < 1:
        raise ValueError("support_imgs has K = 0 shots; at least one support is needed")
    if support_masks.shape != (batch, shots, height, width):
        raise ValueError(
            f"support_masks must be (B, K, H, W) = ({batch}, {shots}, {height}, {width}), "
            f"got {tuple(support_masks.shape)}"
        )
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < MIN_SIZE:
        raise ValueError(
            f"HSNet needs H and W to be multiples of {SIZE_MULTIPLE} and at least {MIN_SIZE}, "
            f"got {height}x{width}; resize the episode (the paper uses 400x400)"
        )
    return batch, shots, 3, height, width
