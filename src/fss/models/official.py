"""Checkpoints of the official implementations, loaded into this package's models.

Three files are recognised by their key layout (not by their name):

- ``hsnet``: juhongm999/hsnet ``best_model.pt``, the bare ``state_dict`` of
  ``nn.DataParallel(HypercorrSqueezeNetwork)``: ``module.backbone.*`` (the whole torchvision
  vgg16 / resnet50 / resnet101, classifier head included) and ``module.hpn_learner.*``.
- ``hdmnet``: Pbihao/HDMNet ``train_epoch_*.pth`` / ``train5_epoch_*.pth`` / ``final.pth``,
  ``{"epoch", "state_dict", "optimizer"}`` of the DDP-wrapped ``OneModel``: its frozen PSPNet
  parts (``layer0..4``, ``ppm``, ``cls.0/1``, ``base_learnear.2``), ``down_query`` /
  ``down_supp`` / ``query_merge`` / ``supp_merge``, ``transformer.mix_transformer.*``,
  ``gram_merge``, ``cls_merge`` and, for K > 1, ``kshot_rw``.
- ``pspnet``: chunbolang/BAM ``best.pth`` (also HDMNet's ``initmodel/PSPNet/...``), the base
  learner: ``{"epoch", "state_dict", "optimizer"}`` with ``layer0..4``, their duplicates under
  ``encoder.0..4`` (the same modules registered twice), ``ppm`` and ``cls``.

The ``module.`` prefix of (Distributed)DataParallel is optional. Loading is exact: every
key of the file must map onto a parameter or buffer of the model and every parameter or
buffer must be in the file, with the same shape; otherwise a :class:`CheckpointMismatchError`
names the keys (as written in the file) and the shapes. The only keys left out on purpose
are the torchvision classifier head of HSNet's backbone (``fc.*`` / ``classifier.*``, never
used) and BAM's ``encoder.*`` duplicates (checked to be identical to ``layerN.*``). A
missing ``num_batches_tracked`` (files from torch < 0.4.1) is tolerated: it does not change
any output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

OFFICIAL_KINDS = ("hsnet", "hdmnet", "pspnet")
PARALLEL_PREFIX = "module."
MAX_NAMED_KEYS = 12

# (prefix in the official file, prefix in this package's model), first match wins.
_HSNET_PREFIXES = (
    ("hpn_learner.encoder_layer4to3.", "learner.mix_l43."),
    ("hpn_learner.encoder_layer3to2.", "learner.mix_l32."),
    ("hpn_learner.encoder_layer4.", "learner.squeeze_l4."),
    ("hpn_learner.encoder_layer3.", "learner.squeeze_l3."),
    ("hpn_learner.encoder_layer2.", "learner.squeeze_l2."),
    ("hpn_learner.decoder1.", "learner.decoder1."),
    ("hpn_learner.decoder2.", "learner.decoder2."),
    ("backbone.", "backbone."),
)
# The torchvision classifier head inside the official HSNet backbone: never used.
_HSNET_UNUSED = ("backbone.fc.", "backbone.classifier.")

_PSPNET_PARTS = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.", "ppm.")
_HDMNET_PREFIXES = (
    *((part, "pspnet." + part) for part in _PSPNET_PARTS),
    ("cls.0.", "pspnet.cls.0."),
    ("cls.1.", "pspnet.cls.1."),
    ("base_learnear.2.", "pspnet.cls.4."),  # sic: the official attribute name
    ("down_query.", "down_query."),
    ("down_supp.", "down_supp."),
    ("query_merge.", "query_merge."),
    ("supp_merge.", "supp_merge."),
    ("transformer.mix_transformer.", "transformer."),
    ("gram_merge.", "ensemble.gram_merge."),
    ("cls_merge.", "ensemble.cls_merge."),
    ("kshot_rw.", "ensemble.kshot_rw."),
)
_PSPNET_PREFIXES = (*((part, part) for part in _PSPNET_PARTS), ("cls.", "cls."))
# BAM's PSPNet registers layer0..4 a second time as encoder.0..4.
_PSPNET_DUPLICATES = tuple((f"encoder.{i}.", f"layer{i}.") for i in range(5))

PREFIXES = {"hsnet": _HSNET_PREFIXES, "hdmnet": _HDMNET_PREFIXES, "pspnet": _PSPNET_PREFIXES}


class CheckpointMismatchError(ConfigError):
    """A checkpoint's keys or shapes do not match the model; the message names them."""


@dataclass(frozen=True)
class OfficialLayout:
    """What an official file holds, read from its keys and shapes.

    ``num_classes``: PSPNet outputs (background + base classes: 16 PASCAL, 61 COCO);
    ``shot`` / ``kshot_hidden``: HDMNet's K-shot reweighting (``kshot_rw``), 1 when absent.
    """

    kind: str
    backbone: str | None
    num_classes: int | None = None
    shot: int = 1
    kshot_hidden: int = 2

    def describe(self) -> str:
        origin = {"hsnet": "HSNet (juhongm999/hsnet)", "hdmnet": "HDMNet (Pbihao/HDMNet)",
                  "pspnet": "BAM PSPNet base learner (chunbolang/BAM)"}[self.kind]
        details = [f"backbone {self.backbone}"]
        if self.num_classes is not None:
            details.append(f"{self.num_classes} base-learner classes")
        if self.kind == "hdmnet":
            details.append(f"{self.shot}-shot")
        return f"official {origin} checkpoint, {', '.join(details)}"


# ----------------------------------------------------------------------------- reading
def read_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` on the CPU, memory-mapped when the file allows it.

    The safe loader (``weights_only``) is tried first; a file it refuses (pickled
    objects, e.g. Lightning hyper-parameters) is loaded with full unpickling, which runs
    code from the file: load only checkpoints you trust.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass the path of a .ckpt/.pt/.pth file")
    attempts = ({"weights_only": True, "mmap": True}, {"weights_only": True},
                {"weights_only": False})
    error: Exception | None = None
    for options in attempts:
        try:
            loaded = torch.load(path, map_location="cpu", **options)
        except Exception as failure:  # unpickling errors have many types
            error = failure
            continue
        if not options["weights_only"]:
            log.warning("%s was unpickled with full trust (the safe loader refused it: %s)",
                        path, error)
        return loaded
    raise ConfigError(f"checkpoint {path} cannot be read by torch.load: {error}")


def unwrap_state_dict(loaded: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor state dict inside a loaded file (``{"state_dict": ...}`` or bare)."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ConfigError(f"{source}: state-dict entries that are not tensors: "
                          f"{_names(not_tensors)}")
    return dict(state)


def strip_parallel_prefix(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Removes the DataParallel/DDP ``module.`` prefix when every key has it."""
    if state and all(key.startswith(PARALLEL_PREFIX) for key in state):
        return {key[len(PARALLEL_PREFIX):]: v for key, v in state.items()}, PARALLEL_PREFIX
    return dict(state), ""


# --------------------------------------------------------------------------- detection
def detect_layout(state: Mapping[str, Tensor]) -> OfficialLayout | None:
    """The official layout of a state dict (``module.`` optional), or None."""
    state, _ = strip_parallel_prefix(state)
    if any(key.startswith("hpn_learner.") for key in state):
        return OfficialLayout("hsnet", _hsnet_backbone(state))
    if any(key.startswith("transformer.mix_transformer.") for key in state):
        classifier = state.get("base_learnear.2.weight")
        kshot = state.get("kshot_rw.0.weight")  # (hidden, shot, 1, 1)
        return OfficialLayout(
            "hdmnet",
            _pspnet_backbone(state),
            num_classes=None if classifier is None else int(classifier.shape[0]),
            shot=1 if kshot is None else int(kshot.shape[1]),
            kshot_hidden=2 if kshot is None else int(kshot.shape[0]),
        )
    if "ppm.features.0.1.weight" in state and "cls.4.weight" in state:
        return OfficialLayout("pspnet", _pspnet_backbone(state),
                              num_classes=int(state["cls.4.weight"].shape[0]))
    return None


def _blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of residual blocks under ``prefix`` (``backbone.layer3.``)."""
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state
               if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return max(indices) + 1 if indices else 0


def _hsnet_backbone(state: Mapping[str, Tensor]) -> str | None:
    if "backbone.features.0.weight" in state:
        return "vgg16"
    return {2: "resnet18", 6: "resnet50", 23: "resnet101"}.get(_blocks(state, "backbone.layer3."))


def _pspnet_backbone(state: Mapping[str, Tensor]) -> str | None:
    if "layer1.0.conv1.weight" not in state:
        return "vgg16" if "layer4.0.weight" in state else None
    stem = state.get("layer0.0.weight")
    if stem is not None and stem.shape[0] == 16:
        return "resnet_small"  # this package's synthetic-benchmark trunk
    return {6: "resnet50", 23: "resnet101"}.get(_blocks(state, "layer3."))


# ----------------------------------------------------------------------------- mapping
def official_to_ours(kind: str, key: str) -> str | None:
    """Our name of an official key (without ``module.``), None if it has none."""
    for official, ours in PREFIXES[kind]:
        if key.startswith(official):
            return ours + key[len(official):]
    return None


def ours_to_official(kind: str, key: str) -> str:
    """The official name of one of our keys (the inverse of :func:`official_to_ours`)."""
    for official, ours in PREFIXES[kind]:
        if key.startswith(ours) and official_to_ours(kind, official + key[len(ours):]) == key:
            return official + key[len(ours):]
    return f"<no official name for {key}>"


def convert_state_dict(
    kind: str, state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Official state dict (``module.`` optional) → (ours, unknown keys, unused keys).

    Unknown keys are named as in the file. Unused keys are the ones dropped on purpose
    (HSNet's classifier head, BAM's ``encoder.*`` duplicates); a duplicate that differs
    from its original is reported as unknown.
    """
    stripped, prefix = strip_parallel_prefix(state)
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    unused: list[str] = []
    for key, value in stripped.items():
        if kind == "hsnet" and key.startswith(_HSNET_UNUSED):
            unused.append(prefix + key)
            continue
        duplicate = _duplicate_of(kind, key)
        if duplicate is not None:
            original = stripped.get(duplicate)
            if original is not None and original.shape == value.shape and torch.equal(original, value):
                unused.append(prefix + key)
            else:
                unknown.append(prefix + key)
            continue
        ours = official_to_ours(kind, key)
        if ours is None:
            unknown.append(prefix + key)
        else:
            converted[ours] = value
    return converted, unknown, unused


def _duplicate_of(kind: str, key: str) -> str | None:
    if kind != "pspnet":
        return None
    for duplicate, original in _PSPNET_DUPLICATES:
        if key.startswith(duplicate):
            return original + key[len(duplicate):]
    return None


def load_official_state_dict(
    model: nn.Module, kind: str, state: Mapping[str, Tensor], source: str = "checkpoint"
) -> None:
    """Loads an official state dict into ``model`` exactly (see the module docstring)."""
    _, prefix = strip_parallel_prefix(state)
    converted, unknown, unused = convert_state_dict(kind, state)
    own = model.state_dict()
    missing = [prefix + ours_to_official(kind, k) for k in own
               if k not in converted and not k.endswith("num_batches_tracked")]
    unknown += [prefix + ours_to_official(kind, k) for k in converted if k not in own]
    shapes = [f"{prefix}{ours_to_official(kind, k)} file {tuple(v.shape)} vs model "
              f"{tuple(own[k].shape)}" for k, v in converted.items()
              if k in own and v.shape != own[k].shape]
    if missing or unknown or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the file: {_names(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} unknown to the model: {_names(unknown)}")
        if shapes:
            parts.append(f"{len(shapes)} with another shape: {_names(shapes, '; ')}")
        raise CheckpointMismatchError(
            f"{source} does not match {_model_name(model)}: " + "; ".join(parts)
            + ". Check the backbone / shot / class count, or that the file is the one meant"
        )
    if unused:
        log.info("%s: %d keys not used by design (e.g. %s)", source, len(unused), unused[0])
    with torch.no_grad():
        model.load_state_dict(converted, strict=False)


def _names(keys: list[str], separator: str = ", ") -> str:
    shown = separator.join(keys[:MAX_NAMED_KEYS])
    return shown + (f"{separator}... ({len(keys) - MAX_NAMED_KEYS} more)"
                    if len(keys) > MAX_NAMED_KEYS else "")


def _model_name(model: nn.Module) -> str:
    backbone = getattr(getattr(model, "backbone", None), "name", None)
    backbone = backbone or getattr(getattr(model, "pspnet", model), "backbone_name", None)
    return f"{type(model).__name__}({backbone})" if backbone else type(model).__name__


# ---------------------------------------------------------------------------- building
@dataclass(frozen=True)
class OfficialCheckpoint:
    """An official file read once: its state dict, layout and a name for messages."""

    state: dict[str, Tensor]
    layout: OfficialLayout
    name: str


def read_official(source: str | Path | Mapping | OfficialCheckpoint) -> OfficialCheckpoint:
    """Reads (if needed) and recognises an official file or an already loaded object."""
    if isinstance(source, OfficialCheckpoint):
        return source
    name = str(source) if isinstance(source, str | Path) else "the state dict"
    loaded = read_checkpoint_file(source) if isinstance(source, str | Path) else source
    state = unwrap_state_dict(loaded, name)
    layout = detect_layout(state)
    if layout is None:
        raise ConfigError(f"{name} is not an official HSNet, HDMNet or BAM PSPNet checkpoint "
                          f"(its keys start like {_names(sorted(state)[:3])})")
    if layout.backbone is None:
        raise ConfigError(f"{name}: cannot tell the backbone of this {layout.kind} checkpoint "
                          "(expected the keys of vgg16, resnet50 or resnet101)")
    return OfficialCheckpoint(state, layout, name)


_IMPORTERS = {
    "hsnet": "HSNet.from_official_checkpoint",
    "hdmnet": "HDMNet.from_official_checkpoint",
    "pspnet": "PSPNet.from_official_checkpoint (or HDMNet.from_official_checkpoint for an "
              "HDMNet on this base learner)",
}


def _expect_kind(checkpoint: OfficialCheckpoint, kinds: tuple[str, ...]) -> None:
    kind = checkpoint.layout.kind
    if kind not in kinds:
        raise ConfigError(f"{checkpoint.name} is an {checkpoint.layout.describe()}; load it "
                          f"with {_IMPORTERS[kind]}")


Source = str | Path | Mapping | OfficialCheckpoint


def hsnet_from_official(source: Source, backbone: str | None = None, **kwargs: Any) -> nn.Module:
    """An HSNet in eval mode with the weights of an official ``best_model.pt``.

    ``backbone`` is read from the file; when given it must agree. ``kwargs`` go to
    :class:`~fss.models.HSNet` (e.g. ``use_support_mask``).
    """
    from fss.models.hsnet.model import HSNet

    checkpoint = read_official(source)
    layout = checkpoint.layout
    _expect_kind(checkpoint, ("hsnet",))
    if backbone is not None and backbone != layout.backbone:
        raise ConfigError(f"{checkpoint.name} is an official HSNet {layout.backbone} checkpoint, "
                          f"not {backbone}: pass backbone={layout.backbone}")
    model = HSNet(layout.backbone, weights=None, **kwargs)
    load_official_state_dict(model, "hsnet", checkpoint.state, checkpoint.name)
    log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
    return model.eval()


def hdmnet_from_official(source: Source, **kwargs: Any) -> nn.Module:
    """An HDMNet in eval mode from an official HDMNet checkpoint, or from a BAM PSPNet
    ``best.pth`` (then only its frozen base learner is loaded and the meta-learner keeps
    its initialisation: the starting point of official training).

    Backbone, base-class count and shot are read from the file; ``kwargs`` go to
    :class:`~fss.models.HDMNet` and win over them (a mismatch is then reported by key).
    """
    from fss.models.hdmnet.model import HDMNet

    checkpoint = read_official(source)
    layout = checkpoint.layout
    _expect_kind(checkpoint, ("hdmnet", "pspnet"))
    settings: dict[str, Any] = {"backbone": layout.backbone, "shot": layout.shot,
                                "kshot_hidden": layout.kshot_hidden}
    if layout.num_classes is not None:
        settings["num_classes_base"] = layout.num_classes - 1
    settings.update(kwargs)
    settings["weights"] = None
    model = HDMNet(**settings)
    if layout.kind == "hdmnet":
        load_official_state_dict(model, "hdmnet", checkpoint.state, checkpoint.name)
    else:
        load_official_state_dict(model.pspnet, "pspnet", checkpoint.state, checkpoint.name)
        log.warning("%s is a base learner only: HDMNet's meta-learner keeps its random "
                    "initialisation (train it before testing)", checkpoint.name)
    log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
    return model.eval()


def pspnet_from_official(source: Source, **kwargs: Any) -> nn.Module:
    """A PSPNet in eval mode from a BAM ``best.pth``; backbone and class count are read
    from the file, ``kwargs`` go to :class:`~fss.models.PSPNet`."""
    from fss.models.pspnet import PSPNet

    checkpoint = read_official(source)
    layout = checkpoint.layout
    _expect_kind(checkpoint, ("pspnet",))
    settings: dict[str, Any] = {"backbone": layout.backbone, "num_classes": layout.num_classes}
    settings.update(kwargs)
    model = PSPNet(**settings)
    load_official_state_dict(model, "pspnet", checkpoint.state, checkpoint.name)
    log.info("Loaded the %s from %s", layout.describe(), checkpoint.name)
    return model.eval()


def load_official(source: Source, **kwargs: Any) -> nn.Module:
    """Whichever model the official file holds (HSNet, HDMNet or PSPNet), in eval mode."""
    checkpoint = read_official(source)
    builder = {"hsnet": hsnet_from_official, "hdmnet": hdmnet_from_official,
               "pspnet": pspnet_from_official}[checkpoint.layout.kind]
    return builder(checkpoint, **kwargs)
