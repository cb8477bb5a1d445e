"""The run: validate config → stages (fss.stages) → build → fit → test → metrics.json.

``run.py`` calls :func:`run` from a Hydra main; tests call it with composed configs.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fss.checkpoints import (
    describe_run,
    inspect_run_checkpoint,
    job_identity,
    load_test_weights,
)
from fss.data.protocols import get_protocol
from fss.lightning import FewShotModule
from fss.lightning.few_shot_module import EVAL_RESOLUTIONS
from fss.ops.calibration import reset_used_paths as reset_used_product_paths
from fss.ops.calibration import set_cache_dir as set_calibration_cache
from fss.ops.calibration import used_paths as used_product_paths
from fss.stages import check_stages, run_stage_job, run_stages
from fss.utils.errors import ConfigError, RegressionError

log = logging.getLogger(__name__)

# Frozen backbones are in eval mode on purpose (HSNet/HDMNet recipes).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*does not have many workers")

MODES = ("train", "test")


SEED_KEYS = ("seed", "data.module.seed", "data.module.val_seed", "data.module.test_seed",
             "data.semantic.seed", "data.semantic.val_seed", "base_learner.seed")
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
LEGACY_PRECISIONS = ("32", "16", "64", "bf16")  # Lightning still takes them


def validate(cfg: DictConfig, this_machine: bool = True) -> None:
    """Every setting the run will use that can be checked without building anything, checked
    before any stage runs: one :class:`ConfigError` (one line: the key, what was wrong, what
    is accepted) for the first bad value. Constructors check the rest when the run builds
    them, still before any stage (``fss.cli`` prints those as one line too).

    ``this_machine=False`` leaves out what depends on the machine that will run the job (its
    accelerators, files and folders): for jobs prepared here to run elsewhere (SLURM)."""
    _validate_job(cfg)
    _validate_seeds(cfg)
    _validate_image_size(cfg)
    _validate_trainer(cfg, this_machine)
    check_stages(cfg)
    if this_machine:
        _validate_files(cfg)


def _validate_job(cfg: DictConfig) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not supported; accepted: {', '.join(MODES)}")
    if not isinstance(cfg.fold, int) or not 0 <= cfg.fold <= 3:
        raise ConfigError(f"fold={cfg.fold!r} is out of range; accepted: 0, 1, 2, 3")
    for key in ("shot", "train_shot"):
        value = cfg[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be an integer >= 1")
    seeds = cfg.get("test_seeds")
    if seeds is not None and (
        not OmegaConf.is_list(seeds) and not isinstance(seeds, list | tuple)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"test_seeds={seeds} must be null or a non-empty list of integers "
                          ">= 0, e.g. test_seeds=[510,365,382]")
    resolution = cfg.get("eval_resolution")
    if resolution is not None and resolution not in EVAL_RESOLUTIONS:
        raise ConfigError(f"eval_resolution={resolution!r} is not supported; accepted: null, "
                          f"{', '.join(EVAL_RESOLUTIONS)}")


def _validate_seeds(cfg: DictConfig) -> None:
    for key in SEED_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key != "seed":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{key}={value!r} must be an integer in [0, 2**32 - 1]")


def _validate_image_size(cfg: DictConfig) -> None:
    """``data.image_size`` against the model's input rule (HSNet: multiples of 8, at least
    32; HDMNet's PSPNet: (size - 1) % 8 == 0 unless strict_size=false); null is the
    protocol's size."""
    size = cfg.data.get("image_size")
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"data.image_size={size!r} must be a positive integer (pixels) or null "
                          "(the protocol's size)")
    net = cfg.model.get("net")
    if not OmegaConf.is_dict(net) or "_target_" not in net:
        return
    from hydra.utils import get_class

    check = getattr(get_class(net._target_), "check_image_size", None)
    if check is None:
        return
    import inspect

    options = {name: net[name] for name in inspect.signature(check).parameters
               if name not in ("height", "width") and name in net}
    try:
        check(size, size, **options)
    except ValueError as error:
        reason = str(error).replace("strict_size=False", "base_learner.strict_size=false")
        raise ConfigError(f"data.image_size={size} does not suit model={cfg.model.name}: "
                          f"{reason}") from None


def _validate_trainer(cfg: DictConfig, this_machine: bool = True) -> None:
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator} is not supported; accepted: "
                          f"{', '.join(ACCELERATORS)}")
    _validate_precision_and_epochs(trainer)
    if this_machine:
        _validate_devices(trainer, accelerator)


def _validate_devices(trainer: DictConfig, accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA "
                          "device; use trainer=cpu (or trainer.accelerator=cpu)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but MPS is not available here; use "
                          "trainer.accelerator=cpu")
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 \
            and devices != -1:
        raise ConfigError(f"trainer.devices={devices} must be >= 1 (or -1: all)")
    if isinstance(devices, int) and devices > 1 and accelerator in ("gpu", "cuda") \
            and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    precision = str(trainer.get("precision", "32-true"))
    if on_cpu and precision.startswith("16"):
        raise ConfigError(f"trainer.precision={precision} needs a GPU; on the CPU use "
                          "bf16-mixed or 32-true")


def _validate_precision_and_epochs(trainer: DictConfig) -> None:
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS + LEGACY_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported; accepted: "
                          f"{', '.join(PRECISIONS)}")
    epochs = trainer.get("max_epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < -1 or epochs == 0):
        raise ConfigError(f"trainer.max_epochs={epochs!r} must be an integer >= 1 (or -1)")


def _validate_files(cfg: DictConfig) -> None:
    cache = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    if cache is not None:
        try:
            Path(str(cache)).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"paths.cache_dir={cache} cannot be created ({error.strerror}); "
                              "set paths.cache_dir (or FSS_CACHE) to a writable folder") from None
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass a .ckpt file "
                          "(e.g. <run dir>/checkpoints/last.ckpt)")
    weights = cfg.backbone.weights
    special = {None, "none", "imagenet", "pretrain"}
    if weights not in special and not Path(str(weights)).is_file():
        raise ConfigError(f"backbone.weights={weights} is not a file; accepted: none, imagenet, "
                          "pretrain, or the path of a torchvision-format state dict")
    learner = OmegaConf.select(cfg, "base_learner.ckpt", default=None)
    if learner is not None and not Path(str(learner)).is_file():
        raise ConfigError(f"base_learner.ckpt={learner} is not a file; pass the path of a "
                          "PSPNet checkpoint (best.pth) or null to train / reuse the cached one")


def build_model(cfg: DictConfig, weights: str | None) -> torch.nn.Module:
    overrides = {"weights": weights} if "weights" in cfg.model.net else {}
    return instantiate(cfg.model.net, **overrides)


def calibrate(net: torch.nn.Module, cfg: DictConfig, datamodule: Any) -> None:
    """The model's ``calibrate`` hook, when it has one (the prototype baseline picks its
    threshold there), on ``model.calibration.episodes`` base-class episodes of the fold,
    drawn from their own seed (never the training or test episodes), scored by
    :mod:`fss.metrics.calibration`."""
    if getattr(net, "calibrate", None) is None:
        return
    from fss.metrics.calibration import calibrate_on_base_episodes

    options = OmegaConf.to_container(cfg.model.get("calibration") or OmegaConf.create({}))
    calibrate_on_base_episodes(net, datamodule, **options)


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one job and returns (and writes) its metrics: validate → data → stages → build →
    (calibrate) → fit → test → metrics.json."""
    validate(cfg)
    if cfg.model.get("net") is None:  # the job is the model's last stage (model=pspnet)
        return run_stage_job(cfg)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    set_calibration_cache(cfg.paths.cache_dir)  # per-machine product paths (fss.ops)
    reset_used_product_paths()  # metrics.json records this job's paths only
    L.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()
    # What ckpt_path holds (ours, Lightning, official), checked against the config first.
    checkpoint = inspect_run_checkpoint(cfg) if cfg.ckpt_path else None
    datamodule = instantiate(cfg.data.module)
    check_layout = getattr(datamodule.source, "check_layout", None)
    if check_layout is not None:  # a real dataset on disk: its folders before any stage
        check_layout()
    # The stages leave the random state as they found it: a run that trains the trunk and
    # one that finds it cached build and train the same model.
    net = build_model(cfg, run_stages(cfg))
    calibrate(net, cfg, datamodule)
    module, trainer = _module_and_trainer(cfg, net, datamodule)
    trainable = bool(cfg.model.get("trainable", True))
    test_ckpt, fit_seconds = None, 0.0
    if cfg.mode == "train" and trainable:
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        fit_seconds = time.perf_counter() - fit_start
        test_ckpt = _best_checkpoint(trainer)
    elif cfg.mode == "test" and checkpoint is not None:
        test_ckpt = load_test_weights(checkpoint, net)  # None: an official file, loaded now
    test_start = time.perf_counter()
    scores, extra = _scores(_test(cfg, trainer, module, datamodule, test_ckpt), datamodule)
    metrics = {
        **job_identity(cfg),
        **scores,
        "mode": cfg.mode,
        "checkpoint": str(test_ckpt or (cfg.ckpt_path if cfg.mode == "test" else "")) or None,
        "fit_seconds": round(fit_seconds, 1),
        "test_seconds": round(time.perf_counter() - test_start, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "tags": list(cfg.get("tags") or []),
        "weights": _weights_origin(cfg, trainable, checkpoint),
        "protocol": module.protocol_record(),  # name and settings (fss.data.protocols)
        "status": "ok",
    }
    return _finish(cfg, metrics, extra, trainer.is_global_zero)


def _module_and_trainer(cfg: DictConfig, net: torch.nn.Module,
                        datamodule: Any) -> tuple[FewShotModule, L.Trainer]:
    eval_resolution = resolve_eval_resolution(cfg, datamodule)
    module = FewShotModule(
        net,
        optimizer=instantiate(cfg.model.optimizer) if cfg.model.get("optimizer") else None,
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        eval_class_ids=datamodule.novel_classes,
        base_class_ids=datamodule.base_classes,
        eval_resolution=eval_resolution,
        val_class_ids=getattr(datamodule, "val_classes", None),
        run_info=describe_run(cfg, datamodule, eval_resolution),  # saved in its checkpoints
        compile=bool(cfg.model.get("compile", False)),
        seed=cfg.seed,
        episodes_csv=Path(cfg.paths.output_dir) / "episodes.csv",  # per-episode record
    )
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.model.get("trainable", True) or cfg.mode == "test":
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(_loggable_config(cfg))
    return module, trainer


def _test(cfg: DictConfig, trainer: L.Trainer, module: FewShotModule, datamodule: Any,
          test_ckpt: str | None) -> list[tuple[int | None, dict[str, float]]]:
    """``[(test seed, scores)]``: one pass per ``test_seeds`` entry (the same weights on
    several sets of test episodes), or one pass with the data's test seed (seed None)."""
    seeds = _test_seeds(cfg, datamodule)
    per_seed = []
    for seed in seeds or [None]:
        if seed is not None:
            datamodule.test_seed = seed
        results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
        per_seed.append((seed, results[0] if results else {}))
        if seed is not None:
            log.info("Test seed %d: mIoU %.2f, FB-IoU %.2f", seed,
                     per_seed[-1][1].get("test/miou", float("nan")),
                     per_seed[-1][1].get("test/fbiou", float("nan")))
    return per_seed


def _test_seeds(cfg: DictConfig, datamodule: Any) -> list[int]:
    """``test_seeds`` when set; else the protocol's when it fixes several (BAM's 5 and
    HDMNet's 10, fss.data.protocols); else none (one pass with the data's test seed)."""
    if cfg.get("test_seeds"):
        return [int(s) for s in cfg.test_seeds]
    name = getattr(getattr(datamodule, "source", None), "protocol", None)
    fixed = get_protocol(name).test_seeds if isinstance(name, str) else ()
    return list(fixed) if len(fixed) > 1 else []


def _scores(per_seed: list[tuple[int | None, dict[str, float]]],
            datamodule: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test scores of metrics.json (the mean over test seeds when there are several),
    and what closes it: the per-seed summary, or the one test seed."""
    seeded = per_seed[0][0] is not None
    scores = _mean_scores([r for _, r in per_seed]) if seeded else per_seed[0][1]
    result = {
        "episodes": int(scores.get("test/episodes", 0)),
        "mIoU": round(float(scores.get("test/miou", float("nan"))), 2),
        "FB-IoU": round(float(scores.get("test/fbiou", float("nan"))), 2),
        "class_iou": {k.split("class")[-1]: round(v, 2) for k, v in scores.items()
                      if k.startswith("test/iou_class")},
    }
    if seeded:
        return result, _seed_summary(per_seed)
    return result, {"test_seed": getattr(datamodule, "test_seed", None)}


def _finish(cfg: DictConfig, metrics: dict[str, Any], extra: dict[str, Any],
            global_zero: bool) -> dict[str, Any]:
    """The warning, the closing fields and the regression check; writes metrics.json."""
    if metrics["weights"] == "untrained":
        metrics["warning"] = UNTRAINED_WARNING
        log.warning("%s", UNTRAINED_WARNING)
    metrics.update(extra)
    paths = used_product_paths()
    if paths:  # CPU matrix products: which path each class took (float rounding differs)
        metrics["product_paths"] = paths
    failure = _verify(cfg, metrics)
    if global_zero:  # under DDP every rank gets here with the same numbers
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("Wrote %s", output_dir / "metrics.json")
    if failure:
        raise RegressionError(failure)
    return metrics


UNTRAINED_WARNING = ("untrained weights: mode=test without ckpt_path scores a network whose "
                     "trainable layers are randomly initialised; pass "
                     "ckpt_path=<run dir>/checkpoints/<best>.ckpt to test a trained model")


def _weights_origin(cfg: DictConfig, trainable: bool, checkpoint: Any) -> str:
    """What the tested weights are: trained (in this run), checkpoint, untrained, or
    training-free (a model with nothing to train, e.g. the prototype baseline)."""
    if not trainable:
        return "training-free"
    if cfg.mode == "train":
        return "trained"
    return "untrained" if checkpoint is None else "checkpoint"


def _verify(cfg: DictConfig, metrics: dict[str, Any]) -> str | None:
    """Compares test mIoU with ``verify.mIoU`` ± ``verify.tolerance``; records the outcome."""
    expected = cfg.get("verify", {}).get("mIoU")
    if expected is None:
        return None
    tolerance = float(cfg.verify.tolerance)
    delta = metrics["mIoU"] - float(expected)
    metrics["verify"] = {"expected_mIoU": expected, "tolerance": tolerance, "delta": round(delta, 2)}
    if abs(delta) <= tolerance:
        return None
    metrics["status"] = "regression"
    return (f"test mIoU {metrics['mIoU']:.2f} is outside the expected {expected} ± {tolerance} "
            f"(verify.mIoU in the config); if the change is intended, update the expectation")


def resolve_eval_resolution(cfg: DictConfig, datamodule: Any) -> str:
    """Where predictions are scored: the top-level ``eval_resolution`` if set, else the
    model config's, else the data protocol's (``source.eval_resolution``: HSNet's protocol
    scores at the network size, PFENet/BAM/HDMNet's at the original label size)."""
    for value in (cfg.get("eval_resolution"), cfg.model.get("eval_resolution")):
        if value:
            return str(value)
    return str(getattr(getattr(datamodule, "source", None), "eval_resolution", "network"))


def mean_ci95(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % Student-t interval (None for one value)."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if array.size < 2:
        return mean, None
    from scipy import stats

    half = stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / np.sqrt(array.size)
    return mean, float(half)


def _mean_scores(results: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean of several ``trainer.test`` results (keys present in all of them)."""
    keys = set.intersection(*(set(r) for r in results)) if results else set()
    return {k: sum(float(r[k]) for r in results) / len(results) for k in keys}


def _seed_summary(per_seed: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """``seeds: [{seed, mIoU, FB-IoU}]``, ``mIoU_mean``, ``mIoU_ci95`` (half-width of the
    95 % interval of the mean over seeds), ``FB-IoU_mean``, ``FB-IoU_ci95``."""
    summary: dict[str, Any] = {"seeds": []}
    values: dict[str, list[float]] = {"mIoU": [], "FB-IoU": []}
    for seed, result in per_seed:
        row: dict[str, Any] = {"seed": seed}
        for key, name in (("mIoU", "test/miou"), ("FB-IoU", "test/fbiou")):
            values[key].append(float(result.get(name, float("nan"))))
            row[key] = round(values[key][-1], 2)
        summary["seeds"].append(row)
    for key, series in values.items():
        mean, half = mean_ci95(series)
        summary[f"{key}_mean"] = round(mean, 2)
        summary[f"{key}_ci95"] = None if half is None else round(half, 2)
    # What BAM's and HDMNet's test.py print besides the mean: the best seed, labelled as such
    # (a best-of-N is not comparable with a one-seed number).
    summary["best_of_seeds"] = {"seeds": len(per_seed),
                                **{key: round(max(series), 2) for key, series in values.items()}}
    return summary


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best-validation checkpoint if one was kept, else the weights in memory."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_path", ""):
        return callback.best_model_path
    return None


def _loggable_config(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    return container


def print_summary(metrics: dict[str, Any]) -> None:
    """A clear final table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['model']} on {metrics['data']} — fold {metrics['fold']}, "
                        f"{metrics['shot']}-shot, backbone {metrics['backbone']}")
    for column in ("mIoU", "FB-IoU", "episodes", "fit time", "test time", "total time"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{metrics['mIoU']:.2f}", f"{metrics['FB-IoU']:.2f}", str(metrics["episodes"]),
        f"{metrics['fit_seconds']:.0f} s", f"{metrics['test_seconds']:.0f} s",
        f"{metrics['total_seconds']:.0f} s",
    )
    Console().print(table)
    if metrics.get("warning"):
        Console(stderr=True, soft_wrap=True).print(f"[bold red]warning:[/] {metrics['warning']}")
    if metrics.get("seeds"):
        seeds = Table(title="per test seed")
        for column in ("seed", "mIoU", "FB-IoU"):
            seeds.add_column(column, justify="right")
        for row in metrics["seeds"]:
            seeds.add_row(str(row["seed"]), f"{row['mIoU']:.2f}", f"{row['FB-IoU']:.2f}")
        Console().print(seeds)
        Console().print(f"Mean over {len(metrics['seeds'])} test seeds: mIoU "
                        f"{_with_ci(metrics, 'mIoU')}, FB-IoU {_with_ci(metrics, 'FB-IoU')}")


def _with_ci(metrics: dict[str, Any], key: str) -> str:
    half = metrics.get(f"{key}_ci95")
    mean = metrics[f"{key}_mean"]
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {half:.2f} (95 %)"
