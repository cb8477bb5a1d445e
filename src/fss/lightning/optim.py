"""Turns a model's parameter groups and Hydra `_partial_` factories into optimizers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The model's trainable parameter groups.

    A model may define ``trainable_parameters()`` returning tensors or dicts; a dict may
    carry ``lr_scale`` (e.g. HDMNet's 10× layers), resolved by :func:`build_optimizer`.
    Without it, every parameter with ``requires_grad`` is trained.
    """
    if hasattr(model, "trainable_parameters"):
        groups: Iterable = model.trainable_parameters()
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    groups = list(groups)
    if groups and isinstance(groups[0], torch.Tensor):
        groups = [{"params": groups}]
    cleaned = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            cleaned.append({**group, "params": params})
    if not cleaned:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    return cleaned


def base_lr(optimizer_factory: Callable) -> float | None:
    if isinstance(optimizer_factory, functools.partial):
        return optimizer_factory.keywords.get("lr")
    return None


def build_optimizer(optimizer_factory: Callable, model: nn.Module) -> torch.optim.Optimizer:
    lr = base_lr(optimizer_factory)
    groups = []
    for group in parameter_groups(model):
        group = dict(group)
        scale = group.pop("lr_scale", 1.0)
        if scale != 1.0:
            if lr is None:
                raise ValueError("parameter groups with lr_scale need the optimizer's `lr` in its config")
            group["lr"] = lr * scale
        groups.append(group)
    return optimizer_factory(groups)


def build_scheduler(scheduler_factory: Callable, optimizer: torch.optim.Optimizer, total_steps: int):
    """Calls the factory with ``total_steps`` when it accepts that argument."""
    func = scheduler_factory.func if isinstance(scheduler_factory, functools.partial) else scheduler_factory
    try:
        accepts_total = "total_steps" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        accepts_total = False
    if accepts_total:
        return scheduler_factory(optimizer, total_steps=total_steps)
    return scheduler_factory(optimizer)


def lightning_optimizers(
    optimizer_factory: Callable | None,
    scheduler_factory: Callable | None,
    model: nn.Module,
    total_steps: int,
):
    """What a LightningModule's ``configure_optimizers`` returns; schedulers step per batch."""
    if optimizer_factory is None:
        raise ValueError("no optimizer configured: set model.optimizer in the config")
    optimizer = build_optimizer(optimizer_factory, model)
    if scheduler_factory is None:
        return optimizer
    scheduler = build_scheduler(scheduler_factory, optimizer, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
