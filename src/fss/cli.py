"""Hydra job wrapper shared by run.py and the `fss-run` console script."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from fss.utils.errors import ConfigError

log = logging.getLogger("fss")


def run_job(cfg: DictConfig) -> float | None:
    """Runs one job; returns test mIoU (for sweepers).

    A failing job writes ``metrics.json`` with ``status: failed`` and the error, so a
    multirun report can say which jobs failed; configuration errors print one line.
    """
    from fss.pipeline import print_summary, run
    from fss.utils.memory import retain_freed_memory
    from fss.utils.ranks import is_global_zero

    _single_log_stream()
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    try:
        metrics = run(cfg)
    except ConfigError as error:
        _write_failure(cfg, error)
        print(f"error: {error}", file=sys.stderr)
        if _in_multirun():
            raise  # Hydra records it per job and carries on; exiting here would end the sweep
        sys.exit(2)
    except Exception as error:
        _write_failure(cfg, error)
        raise
    finally:
        _finish_wandb()
    if is_global_zero():  # under DDP every rank runs the job; rank 0 reports it
        print_summary(metrics)
    return metrics["mIoU"]


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


def main() -> None:
    """Console script: same as ``python run.py`` from the repository root."""
    import runpy

    root = Path.cwd()
    if not (root / "run.py").exists() or not (root / "conf").is_dir():
        sys.exit("fss-run must be started from the fss repository root (where run.py and conf/ are)")
    sys.argv[0] = str(root / "run.py")
    runpy.run_path(str(root / "run.py"), run_name="__main__")
