"""Self-describing checkpoints: what a trained run saves besides its weights, and using it.

Every checkpoint a few-shot training run writes (Lightning ``.ckpt``: ``last.ckpt`` and the
best one) carries under ``"fss"`` the description made by :func:`describe_run`: the model
config (``_target_`` and resolved constructor arguments), the backbone, the data name and
protocol settings, fold, shots, the evaluation protocol, the input normalisation and the
fss version. With it:

- ``python run.py mode=test ckpt_path=<ckpt>`` needs no other override:
  :func:`restore_command_line` (called by ``run.py``) adds the checkpoint's settings to the
  command line. Values given on the command line win (a group override such as
  ``data=pascal`` also keeps the checkpoint's ``data.*`` settings out), so a model can be
  tested on another fold or dataset; a model or backbone that differs from the
  checkpoint's is refused (the weights cannot fit).
- :func:`load_model` returns the model, in eval mode, ready for ``.predict``.

Official checkpoints (HSNet ``best_model.pt``, HDMNet ``train_epoch_*.pth``, BAM PSPNet
``best.pth``) are recognised by their keys (:mod:`fss.models.checkpoint_io`) by the same two
entry points. Every file is read by :func:`fss.models.checkpoint_io.read_checkpoint` (one
trust policy).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from fss.models.checkpoint_io import (
    OfficialCheckpoint,
    detect_layout,
    load_official_state_dict,
    read_checkpoint,
    unwrap_state_dict,
)
from fss.models.official import load_official
from fss.models.psp_backbones import load_matching_state_dict
from fss.resume import check_resume, result_settings
from fss.utils.errors import ConfigError
from fss.version import __version__

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "fss"
FORMAT = 1
STATE_PREFIX = "model."  # FewShotModule.model
_GROUPS = ("model", "backbone", "data")
_TOP_LEVEL = ("fold", "shot", "train_shot")
_PATH_SUFFIXES = ("root", "dir", "path", "file")
_LINK = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_BARE_STRING = re.compile(r"[A-Za-z_][\w\-./]*")
_OFFICIAL_MODELS = {"hsnet": "hsnet", "hdmnet": "hdmnet", "pspnet": "pspnet"}


# ------------------------------------------------------------------------ description
def describe_run(cfg: DictConfig, datamodule: Any, eval_resolution: str) -> dict[str, Any]:
    """The run description stored in its checkpoints (plain Python values only)."""
    from fss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    if "weights" in net:
        net["weights"] = None  # the checkpoint holds every weight
    raw_net = OmegaConf.to_container(cfg.model.net, resolve=False)
    links = {key: match.group(1) for key, value in raw_net.items()
             if isinstance(value, str) and (match := _LINK.fullmatch(value))}
    source = getattr(datamodule, "source", None)
    image_size = getattr(source, "image_size", None)
    return {
        "format": FORMAT,
        "fss_version": __version__,
        "groups": _group_choices(cfg),
        "model": {"name": cfg.model.name, "net": net, "links": links},
        "backbone": cfg.backbone.name,
        "data": {"name": cfg.data.name, "protocol": getattr(source, "protocol", None),
                 "image_size": image_size, "settings": _data_settings(cfg.data)},
        "fold": int(cfg.fold),
        "shot": int(cfg.shot),
        "train_shot": int(cfg.train_shot),
        "seed": int(cfg.seed),
        "evaluation": {
            "resolution": eval_resolution,
            "eval_resolution": cfg.get("eval_resolution"),
            "test_episodes": cfg.data.module.get("test_episodes"),
            "test_seed": cfg.data.module.get("test_seed"),
            "test_seeds": _plain(cfg.get("test_seeds")),
        },
        "classes": {"novel": [int(c) for c in datamodule.novel_classes],
                    "base": [int(c) for c in datamodule.base_classes]},
        "input": {"image_size": image_size, "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD), "layout": "RGB, (B, 3, H, W), ImageNet-normalised"},
        # Every setting that can change a result: a resumed run is checked against them.
        "settings": result_settings(cfg),
    }


def _group_choices(cfg: DictConfig) -> dict[str, str]:
    """The config files chosen for model / backbone / data (Hydra's choices when running
    under Hydra; else the ``name`` of each, which equals its file name)."""
    from hydra.core.hydra_config import HydraConfig

    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {group: str(choices.get(group) or cfg[group].name) for group in _GROUPS}


def _data_settings(data: DictConfig) -> dict[str, Any]:
    """The top-level scalar settings of the data config (image size, protocol, level ...),
    without ``name`` and machine-specific paths."""
    settings = {}
    for key in data:
        value = data[key]
        if isinstance(value, DictConfig | ListConfig) or key == "name":
            continue
        if str(key).lower().endswith(_PATH_SUFFIXES):
            continue
        settings[str(key)] = value
    return settings


# Settings of the data module / the semantic (trunk and base-learner) images that change
# what a job trains or is tested on; loader settings (batch size, workers) do not.
_EPISODE_SETTINGS = ("train_episodes", "val_episodes", "test_episodes")
_SEMANTIC_SETTINGS = ("num_train_images", "num_val_images")


def data_settings(cfg: DictConfig) -> dict[str, Any]:
    """Every setting that changes a job's data, keyed by its config path (so a value reads as
    the override that reproduces it): the data config's top-level scalars
    (:func:`_data_settings`: image size, protocol, level, colour ...), the episodes per split
    (null: the protocol's number), the val / test seeds as used, ``test_seeds`` and the
    number of semantic images the trunk / base-learner stage trains and validates on."""
    from fss.data.datamodule import split_seed

    settings: dict[str, Any] = {f"data.{k}": _plain(v) for k, v in _data_settings(cfg.data).items()}
    module = cfg.data.get("module")
    if isinstance(module, DictConfig):
        for key in _EPISODE_SETTINGS:
            settings[f"data.module.{key}"] = module.get(key)
        seed = int(module.get("seed", cfg.get("seed", 0)))
        for split in ("val", "test"):
            key = f"{split}_seed"
            settings[f"data.module.{key}"] = split_seed(split, seed, module.get(key))
    settings["test_seeds"] = _plain(cfg.get("test_seeds"))
    semantic = cfg.data.get("semantic")
    if isinstance(semantic, DictConfig):
        for key in _SEMANTIC_SETTINGS:
            settings[f"data.semantic.{key}"] = semantic.get(key)
    return settings


# ------------------------------------------------------------------ job identity
def job_identity(cfg: DictConfig) -> dict[str, Any]:
    """The fields that say which job a metrics.json belongs to (read by sweep reports)."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "fold": cfg.fold,
        "shot": cfg.shot,
        "train_shot": cfg.train_shot,
        "seed": cfg.seed,
        # Every setting that changes the data (scenes, sizes, episodes, test seeds), so jobs
        # that share a model but not their data are told apart (data_settings above).
        "data_settings": data_settings(cfg),
        # The command-line overrides of this job (a multirun's swept values among them), so a
        # report can tell the rows of an ablation sweep apart; [] outside a Hydra app.
        "overrides": _job_overrides(),
        # The experiment's published numbers (``paper:`` in experiments/*.yaml), or None.
        "paper": _paper(cfg),
    }


def _paper(cfg: DictConfig) -> dict[str, Any] | None:
    paper = cfg.get("paper")
    return OmegaConf.to_container(paper, resolve=True) if OmegaConf.is_config(paper) else paper


def _job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def run_info(loaded: Any) -> dict[str, Any] | None:
    """The run description of a loaded checkpoint, or None."""
    info = loaded.get(CHECKPOINT_KEY) if isinstance(loaded, Mapping) else None
    if info is None:
        return None
    if not isinstance(info, Mapping) or info.get("format") != FORMAT:
        raise ConfigError(f"checkpoint description format {info.get('format') if isinstance(info, Mapping) else info!r} "
                          f"is not supported by fss (expected {FORMAT}): use a matching fss version")
    return dict(info)


def summary(info: Mapping[str, Any]) -> str:
    """One line: what model, trained on what."""
    data = info["data"]
    size = f", {data['image_size']} px" if data.get("image_size") else ""
    protocol = f" ({data['protocol']} protocol)" if data.get("protocol") else ""
    return (f"{info['model']['name']} on {info['backbone']}, trained on {data['name']}{protocol} "
            f"fold {info['fold']}, {info['train_shot']}-shot{size} (fss {info['fss_version']})")


# ------------------------------------------------------------------------------- kinds
@dataclass
class InspectedCheckpoint:
    """A checkpoint file and what it holds: ``fss`` (ours, self-describing), ``lightning``
    (a Lightning checkpoint without a description), or an official kind."""

    path: str
    kind: str
    info: dict[str, Any] | None = None
    official: OfficialCheckpoint | None = None
    state_dict: Mapping[str, Any] | None = None  # the Lightning checkpoint's, memory-mapped


def inspect_checkpoint(path: str | Path) -> InspectedCheckpoint:
    """Reads ``path`` and tells what it is; ConfigError for anything unrecognised."""
    loaded = read_checkpoint(path)
    info = run_info(loaded)
    if info is not None:
        return InspectedCheckpoint(str(path), "fss", info=info, state_dict=loaded["state_dict"])
    if isinstance(loaded, Mapping) and "pytorch-lightning_version" in loaded:
        return InspectedCheckpoint(str(path), "lightning")
    state = unwrap_state_dict(loaded, str(path))
    layout = detect_layout(state)
    if layout is None or layout.backbone is None:
        raise ConfigError(
            f"{path} is neither an fss/Lightning checkpoint nor an official HSNet, HDMNet or "
            f"BAM PSPNet file (its keys start like {', '.join(sorted(state)[:3])})")
    return InspectedCheckpoint(str(path), layout.kind,
                               official=OfficialCheckpoint(state, layout, str(path)))


# ---------------------------------------------------------------------------- loading
def load_model(path: str | Path) -> nn.Module:
    """The model of a checkpoint, in eval mode, on the CPU, ready for ``.predict``.

    Ours: the model is built from the stored config and every weight is loaded (a
    mismatch names the keys); the description is attached as ``model.checkpoint_info``.
    Official files: see :func:`fss.models.official.load_official`.

    ``model.predict(query_img, support_imgs, support_masks)`` takes ImageNet-normalised
    RGB images (B, 3, H, W) / (B, K, 3, H, W) and binary masks (B, K, H, W) in {0, 1}, each
    with some foreground unless ``allow_empty_support=True``, at the size in
    ``checkpoint_info["input"]`` and returns (B, H, W) masks in {0, 1}; bad inputs raise
    :class:`~fss.utils.errors.InputError` (``docs/errors.md``).
    """
    inspected = inspect_checkpoint(path)
    if inspected.official is not None:
        return load_official(inspected.official)
    if inspected.info is None:
        raise ConfigError(
            f"{path} is a Lightning checkpoint without an fss run description (written before "
            "checkpoints described their run): test it with `python run.py mode=test "
            "ckpt_path=... model=... backbone=... data=... fold=...` as it was trained")
    model = build_model(inspected.info)
    state = {key[len(STATE_PREFIX):]: value for key, value in inspected.state_dict.items()
             if key.startswith(STATE_PREFIX)}
    load_matching_state_dict(model, state, f"checkpoint {path}")
    model.eval()
    model.checkpoint_info = inspected.info
    log.info("Loaded %s from %s", summary(inspected.info), path)
    return model


def build_model(info: Mapping[str, Any]) -> nn.Module:
    """The untrained model a run description names (weights are not loaded)."""
    from hydra.utils import instantiate

    net = dict(info["model"]["net"])
    target = str(net.get("_target_", ""))
    if not target.startswith("fss."):
        raise ConfigError(f"checkpoint model target {target!r} is not an fss model; refusing "
                          "to build it")
    return instantiate(net)


# ---------------------------------------------------------------- run: command line
def restored_overrides(inspected: InspectedCheckpoint) -> list[str]:
    """Hydra overrides that rebuild the checkpoint's run (what ``run.py`` adds)."""
    if inspected.kind == "fss":
        return _overrides_from_info(inspected.info)
    layout = inspected.official.layout if inspected.official else None
    if layout is None:
        return []
    overrides = [f"model={_OFFICIAL_MODELS[layout.kind]}", f"backbone={layout.backbone}"]
    if layout.kind == "hdmnet":
        overrides += [f"train_shot={layout.shot}", f"shot={layout.shot}"]
        if layout.num_classes is not None:
            overrides.append(f"++model.net.num_classes_base={layout.num_classes - 1}")
    elif layout.kind == "pspnet":  # the base-learner job evaluates base_learner.ckpt
        overrides.append(f"++base_learner.ckpt={_hydra_value(inspected.path)}")
    return overrides


def _overrides_from_info(info: Mapping[str, Any]) -> list[str]:
    overrides = [f"{group}={info['groups'][group]}" for group in _GROUPS]
    overrides += [f"{key}={info[key]}" for key in _TOP_LEVEL]
    overrides += [f"++data.{key}={_hydra_value(value)}"
                  for key, value in info["data"]["settings"].items()]
    evaluation = info["evaluation"]
    for key, target in (("test_episodes", "data.module.test_episodes"),
                        ("test_seed", "data.module.test_seed"),
                        ("test_seeds", "test_seeds"), ("eval_resolution", "eval_resolution")):
        if evaluation.get(key) is not None:
            overrides.append(f"++{target}={_hydra_value(evaluation[key])}")
    links = info["model"].get("links", {})
    for key, value in info["model"]["net"].items():
        if key in ("_target_", "weights"):
            continue
        target = links.get(key, f"model.net.{key}")
        # Links to a group's name or to fold/shot follow those overrides; paths are the
        # machine's, not the checkpoint's.
        if target in _TOP_LEVEL or target in {f"{g}.name" for g in _GROUPS} \
                or target.startswith("paths.") or target.lower().endswith(_PATH_SUFFIXES):
            continue
        overrides.append(f"++{target}={_hydra_value(value)}")
    return list(dict.fromkeys(overrides))


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE_STRING.fullmatch(text) and text.lower() not in ("null", "true", "false", "inf", "nan"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _override_key(token: str) -> str:
    return token.split("=", 1)[0].lstrip("+~")


def restore_command_line(argv: list[str]) -> tuple[list[str], list[str]]:
    """For ``mode=test ckpt_path=<file>``: (argv with the checkpoint's settings appended,
    the settings appended). Settings given in ``argv`` win: a restored key is dropped when
    ``argv`` sets it or one of its parents (``data=pascal`` covers ``data.image_size``).
    Any other command line is returned unchanged."""
    values = {_override_key(t): t.split("=", 1)[1] for t in argv
              if "=" in t and not t.startswith("-")}
    path = values.get("ckpt_path", "").strip("'\"")
    if values.get("mode") != "test" or not path or not Path(path).is_file():
        return list(argv), []
    inspected = inspect_checkpoint(path)
    given = set(values)
    restored = [o for o in restored_overrides(inspected)
                if not any(_override_key(o) == key or _override_key(o).startswith(key + ".")
                           for key in given)]
    return [*argv, *restored], restored


# --------------------------------------------------------------------- run: pipeline
def inspect_run_checkpoint(cfg: DictConfig) -> InspectedCheckpoint:
    """The run's ``ckpt_path``, checked against the config (before anything is built).

    mode=train resumes Lightning checkpoints only, under the settings they were trained
    with (:func:`fss.resume.check_resume`). mode=test: an fss checkpoint must name
    the configured model and backbone (other differences are logged: the configured
    values are used); an official file must fit the configured model, backbone, shot and
    class count, each mismatch naming the override that fixes it.
    """
    inspected = inspect_checkpoint(cfg.ckpt_path)
    if cfg.mode == "train" and inspected.kind not in ("fss", "lightning"):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is an {inspected.official.layout.describe()}; "
                          "mode=train resumes this package's Lightning checkpoints only: "
                          "evaluate it with mode=test")
    if cfg.mode == "train":
        if inspected.info is not None:
            log.info("Resuming from %s: %s", cfg.ckpt_path, summary(inspected.info))
        check_resume(cfg, inspected.info, str(cfg.ckpt_path))
    elif inspected.kind == "fss":
        _check_fss(cfg, inspected.info)
    elif inspected.kind == "lightning":
        log.info("ckpt_path %s has no run description: the configuration must match its "
                 "training run", cfg.ckpt_path)
    elif cfg.mode == "test":
        _check_official(cfg, inspected)
    return inspected


def _check_fss(cfg: DictConfig, info: Mapping[str, Any]) -> None:
    log.info("ckpt_path %s: %s", cfg.ckpt_path, summary(info))
    expected = {"model": info["model"]["name"], "backbone": info["backbone"]}
    found = {"model": cfg.model.name, "backbone": cfg.backbone.name}
    wrong = [f"{key}={found[key]} (checkpoint: {value})" for key, value in expected.items()
             if found[key] != value]
    if wrong:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} holds another network: {'; '.join(wrong)}. "
                          "Drop these overrides: `python run.py mode=test ckpt_path=...` takes "
                          "them from the checkpoint")
    differences = {
        "data": (cfg.data.name, info["data"]["name"]),
        "fold": (cfg.fold, info["fold"]),
        "train_shot": (cfg.train_shot, info["train_shot"]),
        "shot": (cfg.shot, info["shot"]),
    }
    for key, (configured, saved) in differences.items():
        if configured != saved:
            log.warning("Testing with %s=%s, not the checkpoint's %s=%s (the configured "
                        "value wins)", key, configured, key, saved)


def _check_official(cfg: DictConfig, inspected: InspectedCheckpoint) -> None:
    layout = inspected.official.layout
    what = f"ckpt_path={cfg.ckpt_path} is an {layout.describe()}"
    if layout.kind == "pspnet":
        raise ConfigError(f"{what}: evaluate it with `model=pspnet mode=test "
                          f"base_learner.ckpt=<file>`, or train HDMNet on it with "
                          f"`model=hdmnet base_learner.ckpt=<file>`")
    fixes = []
    if cfg.model.name != _OFFICIAL_MODELS[layout.kind]:
        fixes.append(f"model={_OFFICIAL_MODELS[layout.kind]}")
    if cfg.backbone.name != layout.backbone:
        fixes.append(f"backbone={layout.backbone}")
    if layout.kind == "hdmnet" and not fixes:
        if int(cfg.model.net.shot) != layout.shot:
            fixes.append(f"train_shot={layout.shot}")
        classes = cfg.model.net.get("num_classes_base")
        if layout.num_classes is not None and classes != layout.num_classes - 1:
            fixes.append(f"model.net.num_classes_base={layout.num_classes - 1}")
    if fixes:
        raise ConfigError(f"{what}; this run is configured otherwise: pass {' '.join(fixes)}")
    log.info("%s: loaded with the official importer (fss.models.checkpoint_io)", what)


def load_test_weights(inspected: InspectedCheckpoint, net: nn.Module) -> str | None:
    """mode=test: loads an official file into ``net`` and returns None (the weights are in
    memory); for a Lightning checkpoint returns its path for ``trainer.test``."""
    if inspected.official is None:
        return inspected.path
    layout = inspected.official.layout
    load_official_state_dict(net, layout.kind, inspected.official.state, inspected.path)
    return None
