"""Resuming a training run: what a checkpoint must agree on with the resumed configuration.

A resumed run (``mode=train ckpt_path=<last.ckpt>``) ends with the weights and metrics of the
uninterrupted run only if it is configured the same way. Every checkpoint of a fit records
the settings that can change a result (:func:`result_settings`: the resolved configuration
without paths, loggers, progress display, loader workers and other settings that never
change a number). :func:`check_resume` compares them with the resumed configuration before
anything is built and refuses a difference, naming the keys, unless
``resume.allow_changes=true`` (then each difference is logged as a warning).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)

# Settings that never change weights or metrics (dotted keys, fnmatch patterns).
RESULT_NEUTRAL = (
    "mode", "ckpt_path", "task_name", "tags", "retain_freed_memory", "verify", "verify.*",
    "paper", "paper.*", "resume.*", "paths.*", "logger.*",
    # Which stages build the weights and which recipe file set the values: the values count.
    "recipe_name", "model.stages", "model.weights_stage", "model.runner",
    "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "trainer.enable_model_summary", "trainer.enable_checkpointing",
    "*.num_workers", "*.pin_memory", "*.persistent_workers",
    # Fast kernels or their references (fss.ops): the same numbers up to float rounding.
    "*fast_paths",
    # Machine-specific locations (datasets, caches, weights files): moving them keeps a run.
    "*root", "*dir", "*path", "*file",
)
# The callbacks that change a result (when training stops).
RESULT_CALLBACKS = ("callbacks.early_stopping",)
_SHOWN = 8  # differences named in the refusal


def result_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings of ``cfg`` that can change a result, as dotted keys."""
    flat: dict[str, Any] = {}
    _flatten("", cfg, flat)
    return flat


def _flatten(prefix: str, node: DictConfig, out: dict[str, Any]) -> None:
    for key in node:
        dotted = f"{prefix}{key}"
        if _neutral(dotted):
            continue
        try:
            value = node[key]
            if OmegaConf.is_list(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve
            continue
        if isinstance(value, DictConfig):
            _flatten(f"{dotted}.", value, out)
        else:
            out[dotted] = value


def _neutral(key: str) -> bool:
    if key.startswith("callbacks.") and not key.startswith(RESULT_CALLBACKS):
        return True  # callbacks save, show and log
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESULT_NEUTRAL)


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: checkpoint A, now B`` for every result setting that differs."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if _neutral(key):
            continue
        before, after = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if before != after:
            lines.append(f"{key}: checkpoint {before!r}, now {after!r}")
    return lines


def check_resume(cfg: DictConfig, info: Mapping[str, Any] | None, path: str) -> None:
    """Refuses to resume ``path`` under a configuration that changes the result (ConfigError
    naming the keys), unless ``resume.allow_changes`` is true."""
    saved = None if info is None else info.get("settings")
    if saved is None:
        log.warning("ckpt_path=%s does not record its run's settings: resuming without "
                    "checking that this configuration matches it", path)
        return
    changed = differences(saved, result_settings(cfg))
    if not changed:
        return
    allow = bool(OmegaConf.select(cfg, "resume.allow_changes", default=False))
    if allow:
        for line in changed:
            log.warning("Resuming with a changed setting (resume.allow_changes=true): %s", line)
        return
    shown = "; ".join(changed[:_SHOWN]) + (f"; and {len(changed) - _SHOWN} more"
                                           if len(changed) > _SHOWN else "")
    raise ConfigError(f"ckpt_path={path} was trained with other settings ({shown}): resume "
                      "with the checkpoint's settings, or pass resume.allow_changes=true to "
                      "continue with these")
