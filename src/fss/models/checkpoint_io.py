"""Reading checkpoint files and converting official state dicts: the one checkpoint layer.

Everything in fss that reads a ``.pt`` / ``.pth`` / ``.ckpt`` file goes through
:func:`read_checkpoint` (backbone and base-learner weights, fss and Lightning checkpoints,
official files). Its trust policy is :data:`TRUST_POLICY` below, stated once.

Official checkpoints of the original code are recognised by their key layout, not by their
name. Each model keeps its official key table beside it (data and two tiny functions,
importing no other module of fss except another table):

- ``hsnet``: :mod:`fss.models.hsnet_keys` (juhongm999/hsnet ``best_model.pt``);
- ``hdmnet``: :mod:`fss.models.hdmnet_keys` (Pbihao/HDMNet ``train_epoch_*.pth``);
- ``pspnet``: :mod:`fss.models.pspnet_keys` (chunbolang/BAM ``best.pth``).

One converter works from these tables in both directions (:func:`convert_official_state_dict`,
:func:`to_official_state_dict`) and :func:`load_official_state_dict` loads exactly: every key
of the file must map onto a parameter or buffer of the model and every parameter or buffer
must be in the file, with the same shape; otherwise a :class:`CheckpointMismatchError` names
the keys (as written in the file) and the shapes. The only keys left out on purpose are each
table's ``UNUSED`` prefixes (HSNet's torchvision classifier head) and ``DUPLICATES`` (BAM's
``encoder.*``, checked to be identical to ``layerN.*``). A missing ``num_batches_tracked``
(files from torch < 0.4.1) is tolerated: it does not change any output. The ``module.``
prefix of (Distributed)DataParallel is optional.

This module imports no model: the models import it (``HSNet.from_official_checkpoint`` ...);
:func:`fss.models.official.load_official` picks the model a file holds. The tables are
modules of ``fss.models`` itself, not of ``fss.models.hsnet`` / ``fss.models.hdmnet``:
importing a module of a subpackage runs the subpackage's ``__init__``, which imports the
model, which imports this module.
"""

from __future__ import annotations

import importlib
import logging
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from fss.models import hdmnet_keys, hsnet_keys, pspnet_keys
from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

PARALLEL_PREFIX = "module."
MAX_NAMED_KEYS = 12

# ------------------------------------------------------------------------ trust policy
# Every file is read with torch.load(weights_only=True): tensors, containers and plain
# Python values, no code from the file runs, and nothing in fss ever calls
# torch.load(weights_only=False). The formats below pickle a few well-known objects next to
# the weights; the types each needs are added to the safe loader's allowlist for the read
# (torch.serialization.safe_globals), nothing else. Files of fss itself (Lightning
# checkpoints, trunk and base-learner caches) and the official HSNet, HDMNet and BAM files
# (state dicts; {"epoch", "state_dict", "optimizer"}) need none of them
# (tests/test_official_checkpoints.py). Any other refused object stops the read with a
# ConfigError naming it.
TRUST_POLICY: dict[str, tuple[str, tuple[str, ...]]] = {
    "numpy values": (
        "training scripts that store metrics (best mIoU ...) as numpy scalars or arrays next "
        "to the weights",
        ("numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
         "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
         "numpy._core.multiarray._reconstruct", "numpy.dtypes.*"),
    ),
    "argparse arguments": (
        "scripts and Lightning 1.x checkpoints that store their argparse.Namespace "
        "(``args``, ``hparams``) with the weights",
        ("argparse.Namespace",),
    ),
    "OmegaConf hyper-parameters": (
        "Lightning checkpoints of Hydra projects whose save_hyperparameters() kept the "
        "DictConfig (e.g. a backbone.weights file from another project)",
        ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
         "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
         "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
         "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "typing.Any",
         "collections.defaultdict", "builtins.dict", "builtins.list", "builtins.int",
         "builtins.float", "builtins.str", "builtins.bool"),
    ),
}


def _allowed_globals() -> list[Any]:
    """The objects :data:`TRUST_POLICY` names (those that exist in the installed versions)."""
    found = []
    for _, names in TRUST_POLICY.values():
        for name in names:
            module_name, _, attribute = name.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if attribute == "*":
                found += [getattr(module, n) for n in getattr(module, "__all__", ())
                          if isinstance(getattr(module, n, None), type)]
            elif hasattr(module, attribute):
                found.append(getattr(module, attribute))
    return found


def read_checkpoint(path: str | Path, name: str | None = None) -> Any:
    """``torch.load`` of ``path`` on the CPU under :data:`TRUST_POLICY`, memory-mapped when
    the file is in torch's zip format (legacy files of torch < 1.6 are read whole).

    ``name``: how messages call the file (default ``checkpoint <path>``). A missing file,
    a file torch cannot read and a file holding objects the policy does not allow each
    raise a :class:`~fss.utils.errors.ConfigError` that says so.
    """
    path = Path(path).expanduser()
    name = name or f"checkpoint {path}"
    if not path.is_file():
        raise ConfigError(f"{name} does not exist; pass the path of a .ckpt/.pt/.pth file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except Exception as error:  # unpickling errors have many types
        refused = _refused_globals(path)
        if refused:
            raise ConfigError(
                f"{name} holds objects that fss does not unpickle ({', '.join(refused)}); it "
                "reads tensors, plain values and the formats of "
                "fss.models.checkpoint_io.TRUST_POLICY. If you trust the file, save its "
                "state dict alone: torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], new_path)") from None
        raise ConfigError(f"{name} cannot be read by torch.load: {_why_unreadable(path, error)}"
                          ) from None


def _why_unreadable(path: Path, error: Exception) -> str:
    """One line on why torch.load failed (its safe-loader message is generic)."""
    with path.open("rb") as handle:
        head = handle.read(2)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        return ("it is not a whole file written by torch.save (neither torch's zip format nor a "
                "legacy pickle)")
    text = " ".join(str(error).split())
    detail = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0]
    return f"{type(error).__name__}: {detail.strip()}"


def _refused_globals(path: Path) -> list[str]:
    """The objects of a zip-format file that the policy does not allow ([] if none or not
    zip)."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a damaged archive: reported by the caller as unreadable
        return []
    allowed = [name for _, listed in TRUST_POLICY.values() for name in listed]
    exact = {name for name in allowed if not name.endswith("*")}
    prefixes = tuple(name[:-1] for name in allowed if name.endswith("*"))
    return [n for n in names if n not in exact and not n.startswith(prefixes)]


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


# ------------------------------------------------------------------------ key tables
# Detection order matters: an HDMNet file also holds PSPNet parts.
KEY_TABLES: dict[str, ModuleType] = {table.KIND: table
                                     for table in (hsnet_keys, hdmnet_keys, pspnet_keys)}
OFFICIAL_KINDS = tuple(KEY_TABLES)


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
        details = [f"backbone {self.backbone}"]
        if self.num_classes is not None:
            details.append(f"{self.num_classes} base-learner classes")
        if self.kind == "hdmnet":
            details.append(f"{self.shot}-shot")
        return f"official {KEY_TABLES[self.kind].ORIGIN} checkpoint, {', '.join(details)}"


def detect_layout(state: Mapping[str, Tensor]) -> OfficialLayout | None:
    """The official layout of a state dict (``module.`` optional), or None."""
    state, _ = strip_parallel_prefix(state)
    for kind, table in KEY_TABLES.items():
        if table.matches(state):
            return OfficialLayout(kind, _backbone(state, table), **table.facts(state))
    return None


def _backbone(state: Mapping[str, Tensor], table: ModuleType) -> str | None:
    """The backbone named by a key table's ``BACKBONE_BY_*`` entries, None if unknown."""
    for key, backbone in table.BACKBONE_BY_KEY.items():
        if key in state:
            return backbone
    if table.BACKBONE_BY_STEM is not None:
        key, widths = table.BACKBONE_BY_STEM
        stem = state.get(key)
        if stem is not None and int(stem.shape[0]) in widths:
            return widths[int(stem.shape[0])]
    prefix, by_blocks = table.BACKBONE_BY_BLOCKS
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state
               if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return by_blocks.get(max(indices) + 1 if indices else 0)


# --------------------------------------------------------------------------- converter
def official_key_to_ours(kind: str, key: str) -> str | None:
    """Our name of an official key (without ``module.``), None if it has none."""
    for official, ours in KEY_TABLES[kind].PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):]
    return None


def our_key_to_official(kind: str, key: str) -> str | None:
    """The official name of one of our keys (the inverse of :func:`official_key_to_ours`),
    None if it has none."""
    for official, ours in KEY_TABLES[kind].PREFIXES:
        if key.startswith(ours) and official_key_to_ours(kind, official + key[len(ours):]) == key:
            return official + key[len(ours):]
    return None


def split_official_state_dict(
    kind: str, state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Official state dict (``module.`` optional) → (ours, unknown keys, unused keys).

    Unknown keys are named as in the file. Unused keys are the ones dropped on purpose
    (the table's ``UNUSED`` and ``DUPLICATES``); a duplicate that differs from its original
    is reported as unknown.
    """
    table = KEY_TABLES[kind]
    stripped, prefix = strip_parallel_prefix(state)
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    unused: list[str] = []
    for key, value in stripped.items():
        if table.UNUSED and key.startswith(table.UNUSED):
            unused.append(prefix + key)
            continue
        duplicate = _original_of(table, key)
        if duplicate is not None:
            original = stripped.get(duplicate)
            if original is not None and original.shape == value.shape and torch.equal(original, value):
                unused.append(prefix + key)
            else:
                unknown.append(prefix + key)
            continue
        ours = official_key_to_ours(kind, key)
        if ours is None:
            unknown.append(prefix + key)
        else:
            converted[ours] = value
    return converted, unknown, unused


def _original_of(table: ModuleType, key: str) -> str | None:
    for duplicate, original in table.DUPLICATES:
        if key.startswith(duplicate):
            return original + key[len(duplicate):]
    return None


def convert_official_state_dict(
    state: Mapping[str, Tensor], kind: str | None = None
) -> dict[str, Tensor]:
    """Official keys → ours (then ``model.load_state_dict(converted)``).

    ``kind`` (``hsnet``, ``hdmnet``, ``pspnet``) is read from the keys when not given. The
    parts dropped on purpose are left out; keys with no counterpart are kept under their own
    name (without ``module.``), so that a strict load names them.
    """
    kind = kind or _kind_of(state)
    converted, unknown, _ = split_official_state_dict(kind, state)
    stripped, _ = strip_parallel_prefix({key: state[key] for key in unknown})
    return {**converted, **stripped}


def to_official_state_dict(
    state: Mapping[str, Tensor], kind: str, parallel: bool = False
) -> dict[str, Tensor]:
    """Our state dict → the official key layout of ``kind`` (``module.`` in front when
    ``parallel``: how the official code saves it). BAM's ``encoder.*`` duplicates are
    written too. A key with no official name raises a ConfigError naming it."""
    table = KEY_TABLES[kind]
    official: dict[str, Tensor] = {}
    missing = []
    for key, value in state.items():
        name = our_key_to_official(kind, key)
        if name is None:
            missing.append(key)
        else:
            official[name] = value
    if missing:
        raise ConfigError(f"no official {kind} name for {len(missing)} keys: {_names(missing)}")
    for duplicate, original in table.DUPLICATES:
        official.update({duplicate + k[len(original):]: v for k, v in list(official.items())
                         if k.startswith(original)})
    prefix = PARALLEL_PREFIX if parallel else ""
    return {prefix + k: v for k, v in official.items()}


def _kind_of(state: Mapping[str, Tensor]) -> str:
    layout = detect_layout(state)
    if layout is None:
        raise ConfigError("cannot tell which official model these keys are from (they start "
                          f"like {_names(sorted(state)[:3])}); pass kind= one of "
                          f"{', '.join(OFFICIAL_KINDS)}")
    return layout.kind


def load_official_state_dict(
    model: nn.Module, kind: str, state: Mapping[str, Tensor], source: str = "checkpoint"
) -> None:
    """Loads an official state dict into ``model`` exactly (see the module docstring)."""
    _, prefix = strip_parallel_prefix(state)
    converted, unknown, unused = split_official_state_dict(kind, state)
    own = model.state_dict()

    def official(key: str) -> str:
        return prefix + (our_key_to_official(kind, key) or f"<no official name for {key}>")

    missing = [official(k) for k in own
               if k not in converted and not k.endswith("num_batches_tracked")]
    unknown += [official(k) for k in converted if k not in own]
    shapes = [f"{official(k)} file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in converted.items() if k in own and v.shape != own[k].shape]
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


# --------------------------------------------------------------------- official files
@dataclass(frozen=True)
class OfficialCheckpoint:
    """An official file read once: its state dict, layout and a name for messages."""

    state: dict[str, Tensor]
    layout: OfficialLayout
    name: str


OfficialSource = str | Path | Mapping | OfficialCheckpoint

# Which loader takes each kind (named in the message when another one is given the file).
IMPORTERS = {
    "hsnet": "HSNet.from_official_checkpoint",
    "hdmnet": "HDMNet.from_official_checkpoint",
    "pspnet": "PSPNet.from_official_checkpoint (or HDMNet.from_official_checkpoint for an "
              "HDMNet on this base learner)",
}


def read_official(source: OfficialSource, kinds: Iterable[str] = OFFICIAL_KINDS) -> OfficialCheckpoint:
    """Reads (if needed) and recognises an official file or an already loaded object;
    a file of a kind not in ``kinds`` is refused naming the loader that takes it."""
    if isinstance(source, OfficialCheckpoint):
        checkpoint = source
    else:
        name = str(source) if isinstance(source, str | Path) else "the state dict"
        loaded = read_checkpoint(source) if isinstance(source, str | Path) else source
        state = unwrap_state_dict(loaded, name)
        layout = detect_layout(state)
        if layout is None:
            raise ConfigError(f"{name} is not an official HSNet, HDMNet or BAM PSPNet "
                              f"checkpoint (its keys start like {_names(sorted(state)[:3])})")
        if layout.backbone is None:
            raise ConfigError(f"{name}: cannot tell the backbone of this {layout.kind} "
                              "checkpoint (expected the keys of vgg16, resnet50 or resnet101)")
        checkpoint = OfficialCheckpoint(state, layout, name)
    kind = checkpoint.layout.kind
    if kind not in tuple(kinds):
        raise ConfigError(f"{checkpoint.name} is an {checkpoint.layout.describe()}; load it "
                          f"with {IMPORTERS[kind]}")
    return checkpoint
