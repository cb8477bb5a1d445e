"""The cache every stage goes through: key → lock → train → atomic save → meta → RNG kept.

A stage trains something once (a trunk, a base learner) that many runs reuse. Its output is
``<paths.cache_dir>/<stage.folder>/<key>/<stage.filename>`` with a ``meta.json`` beside it;
the key is ``<data>-fold<k>-<backbone>-<hash>`` where the hash covers what the stage says
changes its result (:meth:`Stage.key_payload`) and nothing else, so moving a dataset or
changing a loader setting keeps the cache.

- **lock**: parallel jobs (a multirun, a SLURM array) that need the same entry wait for the
  first one instead of training it twice;
- **atomic save**: the file is written under a temporary name and renamed, so a crashed run
  never leaves a half-written entry that a later run would trust;
- **RNG kept**: the caller's random state (``random``, numpy, torch on every device, Lightning's
  seed variables) is the same after the stage as before it, so a run that trains the stage
  and one that finds it cached go on identically;
- **DDP**: rank 0 holds the lock while its fit waits for the other ranks to join, so ranks
  > 0 train along without it and only rank 0 writes (:meth:`StageContext.save`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fss.utils.filelock import file_lock
from fss.utils.ranks import is_global_zero

log = logging.getLogger(__name__)
META_FILE = "meta.json"
# Lightning's seed variables (seed_everything sets them; worker seeding reads them).
_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@dataclass(frozen=True)
class Artifact:
    """What a stage hands on: its file, its meta, and whether this run trained it."""

    path: Path
    meta: dict[str, Any]
    trained: bool


class StageContext:
    """Given to :meth:`Stage.train`: where the result goes and how it is written."""

    def __init__(self, key: str, path: Path) -> None:
        self.key = key
        self.path = path

    def save(self, payload: Any, meta: dict[str, Any]) -> None:
        """Writes ``payload`` (``torch.save``) and ``meta.json`` atomically; a no-op on DDP
        ranks > 0 (call it on every rank, then the trainer's barrier)."""
        if not is_global_zero():
            return
        atomic_torch_save(payload, self.path)
        atomic_write_text(self.path.parent / META_FILE,
                          json.dumps({"key": self.key, **meta}, indent=2))


class Stage(ABC):
    """One cached training stage. Subclasses say what changes the result, how to train it
    and how to check a file they did not write; :func:`obtain` does the rest."""

    name: str  # the name model configs list in ``model.stages``
    description: str  # what it makes, for the log ("base learner")
    folder: str  # the cache sub-folder
    filename: str  # the file written in the entry's folder

    def check(self, cfg: DictConfig) -> None:  # noqa: B027 - optional hook
        """Refuses settings the stage cannot run with (a :class:`ConfigError`), before
        anything is built."""

    def applies(self, cfg: DictConfig) -> bool:
        """Whether this configuration needs the stage at all."""
        return True

    def trains_on_the_fly(self, cfg: DictConfig) -> bool:
        """Whether a run that needs a missing entry may train it (else :meth:`missing`)."""
        return True

    def missing(self, cfg: DictConfig, path: Path) -> Exception:
        """The error for a missing entry that may not be trained on the fly."""
        return FileNotFoundError(path)

    def configured(self, cfg: DictConfig) -> Artifact | None:
        """A file the configuration names instead of the cache (skips the stage)."""
        return None

    def verify(self, cfg: DictConfig, path: Path) -> dict[str, Any]:
        """The meta of a cached entry, checked against this run (default: read as is)."""
        return read_meta(path)

    @abstractmethod
    def key_payload(self, cfg: DictConfig) -> dict[str, Any]:
        """Everything that changes the trained result, as JSON-able values."""

    @abstractmethod
    def train(self, cfg: DictConfig, context: StageContext) -> None:
        """Trains and calls ``context.save(payload, meta)`` (every rank, then the barrier)."""

    # -- derived ------------------------------------------------------------------------
    def key(self, cfg: DictConfig) -> str:
        return stage_key(cfg, self.key_payload(cfg))

    def path(self, cfg: DictConfig) -> Path:
        return Path(cfg.paths.cache_dir) / self.folder / self.key(cfg) / self.filename


def stage_key(cfg: DictConfig, payload: dict[str, Any]) -> str:
    """``<data>-fold<k>-<backbone>-<first 10 hex digits of sha256(payload as sorted JSON)>``."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.name}-fold{cfg.fold}-{cfg.backbone.name}-{digest}"


def obtain(stage: Stage, cfg: DictConfig, train_if_missing: bool | None = None) -> Artifact:
    """The stage's result for ``cfg``: the configured file, the cached entry, or one trained
    now (``train_if_missing``: None = :meth:`Stage.trains_on_the_fly`)."""
    configured = stage.configured(cfg)
    if configured is not None:
        return configured
    if train_if_missing is None:
        train_if_missing = stage.trains_on_the_fly(cfg)
    key = stage.key(cfg)
    path = stage.path(cfg)
    if not is_global_zero():
        if train_if_missing and not path.exists():
            _train(stage, cfg, StageContext(key, path))  # rank 0 writes it
            return Artifact(path, read_meta(path), trained=True)
        return Artifact(path, stage.verify(cfg, path), trained=False)
    with file_lock(path.parent.with_suffix(".lock")):
        if path.exists():
            meta = stage.verify(cfg, path)
            log.info("Reusing %s %s", stage.description, path)
            return Artifact(path, meta, trained=False)
        if not train_if_missing:
            raise stage.missing(cfg, path)
        log.info("No cached %s for %s: training it now (stage '%s')", stage.description, key,
                 stage.name)
        _train(stage, cfg, StageContext(key, path))
    meta = read_meta(path)
    log.info("%s saved to %s (%s)", stage.description.capitalize(), path,
             ", ".join(f"{k} {meta[k]}" for k in ("val_miou_base", "seconds") if k in meta))
    return Artifact(path, meta, trained=True)


def _train(stage: Stage, cfg: DictConfig, context: StageContext) -> None:
    with preserved_rng():
        stage.train(cfg, context)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leaves the caller's random state (``random``, numpy, torch on the CPU and every CUDA
    device, Lightning's seed variables) as it was before the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    variables = {name: os.environ.get(name) for name in _SEED_VARIABLES}
    # Every device: a stage training on the GPU must not advance the generator the model's
    # own training draws from (a seed queued by manual_seed is applied when it is read).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.json`` beside ``path`` ({} when there is none, e.g. an official file)."""
    meta_file = Path(path).parent / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def atomic_torch_save(payload: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
