"""What the stages share to train: the run's trainer settings, adapted to a stage."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from fss.lightning.callbacks import display_callbacks


def stage_trainer(cfg: DictConfig, name: str, max_epochs: int,
                  callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """The run's trainer settings for a stage: its own epochs, a CSV log under
    ``<output_dir>/<name>``, no checkpoints, no ``max_steps``."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(
        max_epochs=max_epochs,
        enable_checkpointing=False,
        logger=CSVLogger(cfg.paths.output_dir, name=name),
        callbacks=[*(callbacks or []), *display_callbacks(cfg)],
    )
    trainer_cfg.pop("max_steps", None)
    return instantiate(trainer_cfg)
