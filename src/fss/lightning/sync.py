"""``self.log`` under DDP: which values Lightning reduces across ranks, and which arrive reduced.

Lightning warns about every epoch-level value logged with ``sync_dist=False`` once a process
group exists, because such a value is rank 0's alone. Two kinds of values are logged here:

* values a torchmetrics ``Metric.compute()`` returned: the metric already summed its states
  over all ranks, so every rank holds the same number. They are logged with
  ``sync_dist=True`` and a ``max`` reduction, which returns that number exactly on any
  number of ranks (a mean would divide a sum of equal floats again) and keeps them usable as
  ``ModelCheckpoint`` / ``EarlyStopping`` monitors on every rank;
* per-step values (training losses): ``<name>_step`` is this rank's value, not synced (no
  collective on every step), and ``<name>_epoch`` is the batch-weighted mean over all ranks'
  steps (``sync_dist=True``, reduced once at the epoch's end). Without DDP both are what a
  single ``self.log(name, on_step=True, on_epoch=True)`` gives.
"""

from __future__ import annotations

import lightning as L
import torch


def log_reduced(module: L.LightningModule, name: str, value: torch.Tensor | float,
                **kwargs) -> None:
    """Logs an epoch value that is already equal on every rank (a synced metric's result)."""
    module.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)


def log_step_and_epoch(module: L.LightningModule, name: str, value: torch.Tensor,
                       batch_size: int, prog_bar: bool = False) -> None:
    """Logs a per-step value as ``<name>_step`` (this rank) and ``<name>_epoch`` (all ranks)."""
    module.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=prog_bar,
               batch_size=batch_size)
    module.log(f"{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True,
               batch_size=batch_size)
