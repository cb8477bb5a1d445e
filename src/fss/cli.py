"""The Hydra app behind ``python run.py`` and the ``fss-run`` console script."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fss.utils.errors import ConfigError

log = logging.getLogger("fss")
_TASK_STARTED = False  # set when Hydra has composed the config and called the job


def run_job(cfg: DictConfig) -> float | None:
    """Runs one job; returns test mIoU (for sweepers).

    A failing job writes ``metrics.json`` with ``status: failed`` and the error, so a
    multirun report can say which jobs failed; configuration errors print one line.
    """
    from fss.pipeline import print_summary, run
    from fss.utils.memory import retain_freed_memory
    from fss.utils.ranks import is_global_zero

    global _TASK_STARTED
    _TASK_STARTED = True
    _single_log_stream()
    log.info("%s", describe_choices(cfg))
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    try:
        metrics = run(cfg)
    except Exception as error:
        user_error = as_config_error(error)
        _write_failure(cfg, user_error or error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)  # every rank: none fails silently
        if _in_multirun():
            raise user_error from None  # Hydra records it per job and carries on
        sys.exit(2)
    finally:
        _finish_wandb()
    if is_global_zero():  # under DDP every rank runs the job; rank 0 reports it
        print_summary(metrics)
    return metrics["mIoU"]


def describe_choices(cfg: DictConfig) -> str:
    """The choices made for the user, said at the start of every job: the recipe file
    (``recipe: hsnet_synth (auto)``: picked by model and data; ``(chosen)``: named on the
    command line) and the backbone (``backbone: resnet_small (model default pspnet_synth)``
    when the model chose it)."""
    choices, given = _hydra_choices()
    recipe = cfg.get("recipe_name", "none")
    how = "chosen" if "recipe" in given else "auto"
    line = f"recipe: {recipe} ({how})"
    backbone = choices.get("backbone")
    if backbone and backbone != cfg.backbone.name and "backbone" not in given:
        line += f"; backbone: {cfg.backbone.name} (model default {backbone})"
    return line


def _hydra_choices() -> tuple[dict[str, str], set[str]]:
    """Hydra's group choices and the groups named on the command line ({} outside an app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, set()
    hydra_cfg = HydraConfig.get()
    given = {override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.task}
    return dict(hydra_cfg.runtime.choices), given


def as_config_error(error: BaseException) -> ConfigError | None:
    """The one-line user error that ``error`` is, or None for anything else (a bug).

    - a :class:`ConfigError` (a :class:`DataError` too), also when a loader worker raised it
      (PyTorch re-raises it in the main process with the worker's whole traceback in the
      message: only the original sentence is kept);
    - a ValueError, TypeError or ConfigError raised by a constructor that Hydra's
      ``instantiate`` called: the message, prefixed by the config key that was built.
    """
    from hydra.errors import InstantiationException

    if isinstance(error, ConfigError):
        message = worker_message(str(error))
        return error if message == str(error) else type(error)(message)
    if isinstance(error, InstantiationException):
        cause = error.__cause__
        if isinstance(cause, ConfigError):  # names its key already
            return type(cause)(worker_message(str(cause)))
        if isinstance(cause, ValueError | TypeError):
            key = re.search(r"full_key: (\S+)", str(error))
            message = worker_message(str(cause)).rstrip(".")
            return ConfigError(f"{key.group(1)}: {message}" if key else message)
    return None


def worker_message(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (its last
    traceback line without the exception's name); ``text`` unchanged otherwise."""
    if "Original Traceback" not in text:
        return " ".join(text.split())
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())


def condensed(error: BaseException) -> str:
    """A Hydra / OmegaConf composition error (a bad override, an unknown group option) on
    one line."""
    from omegaconf.errors import OmegaConfBaseException

    texts = [str(error)]
    if isinstance(error.__cause__, OmegaConfBaseException):
        texts.append(str(error.__cause__))
    parts = []
    for text in texts:
        text = text.split("Config search path:")[0]  # Hydra's search path, not the error
        lines = [line.strip() for line in text.splitlines()]
        options = [line for line in text.splitlines() if line.startswith("\t")]
        for line in lines:
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=")):
                continue
            if options and line in {o.strip() for o in options}:
                continue
            parts.append(line)
        if options:
            parts[-1] = parts[-1].rstrip(":") + ": " + ", ".join(o.strip() for o in options)
    return "; ".join(part.rstrip(".;") for part in dict.fromkeys(parts))


def guarded(hydra_main: Callable[[], Any]) -> None:
    """Runs the Hydra main function; a composition error (bad override, unknown config
    option, wrong type) is printed as one line and exits with status 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra then raises composition errors instead of printing them over several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        if _TASK_STARTED:
            raise  # raised by the job itself, not by composing its config: a bug to trace
        print(f"error: {condensed(error)}", file=sys.stderr)
        sys.exit(2)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _single_log_stream() -> None:
    """Lightning installs its own console handler; Hydra's root handlers already print
    (and write run.log), so drop Lightning's to avoid every line appearing twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_advertisements)


def _drop_advertisements(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud services at every fit; keep the run log to the run."""
    return not str(record.msg).startswith("💡 Tip:")


def _write_failure(cfg: DictConfig, error: BaseException) -> None:
    from fss.utils.ranks import is_global_zero

    if not is_global_zero():  # under DDP rank 0 records the job's failure
        return
    try:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "model": cfg.model.name, "data": cfg.data.name, "backbone": cfg.backbone.name,
            "fold": cfg.fold, "shot": cfg.shot, "seed": cfg.seed, "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=20),
        }
        (out / "metrics.json").write_text(json.dumps(record, indent=2))
    except Exception:  # never mask the original error
        log.exception("could not write the failure record")


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def project_root() -> Path:
    """The checkout this package runs from (``src/fss/cli.py`` -> its root): run.py, conf/,
    and the default logs/ and .cache/ (``paths.root_dir``)."""
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """The Hydra config folder: ``FSS_CONFIG_DIR`` if set, else the checkout's ``conf/``."""
    return Path(os.environ.get("FSS_CONFIG_DIR") or project_root() / "conf").resolve()


def restore_from_checkpoint(argv: list[str]) -> list[str]:
    """``mode=test ckpt_path=<file>``: add the settings the checkpoint records (its model,
    backbone, data, fold ...); those on the command line win (docs/checkpoints.md)."""
    if not any(arg.startswith("ckpt_path=") for arg in argv):
        return argv
    from fss.checkpoints import restore_command_line

    try:
        argv, restored = restore_command_line(argv)
    except ConfigError as error:  # one line and exit status 2, as run_job does
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if restored:
        print(f"fss: taken from the checkpoint: {' '.join(restored)}", file=sys.stderr)
    return argv


def main() -> None:
    """``python run.py`` and the ``fss-run`` console script: one Hydra app, started from
    any directory (the configs are found from this file, not from the working directory)."""
    import hydra

    conf = config_dir()
    if not (conf / "config.yaml").is_file():
        print(f"error: no Hydra configs at {conf} (conf/config.yaml of the fss checkout); "
              "install fss from its repository (pip install -e .) or set FSS_CONFIG_DIR",
              file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("PROJECT_ROOT", str(project_root()))
    # recipe=auto is the default (conf/config.yaml picks conf/recipe/<model>_<data>.yaml).
    arguments = [arg for arg in sys.argv[1:] if arg != "recipe=auto"]
    sys.argv[1:] = restore_from_checkpoint(arguments)
    app = hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(run_job)
    guarded(app)
