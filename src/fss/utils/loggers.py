"""Logger factories used from the Hydra configs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(
    project: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    save_dir: str = ".",
    tags: Sequence[str] = (),
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that runs offline (no account needed) unless a project is given.

    Offline runs are written under ``<save_dir>/wandb/offline-run-*``; upload them later
    with ``wandb sync <that folder>``.
    """
    offline = project is None
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return WandbLogger(
        project=project or "fss",
        entity=entity,
        group=group,
        name=name,
        save_dir=save_dir,
        tags=list(tags),
        offline=offline,
        **kwargs,
    )
