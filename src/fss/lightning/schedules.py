"""Learning-rate schedules that need the run's total number of optimizer steps."""

from __future__ import annotations

import torch


def poly_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · (1 − step / total_steps) ** power, stepped every optimizer step (HDMNet, BAM)."""
    total = max(int(total_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(1.0 - min(step, total) / total, 0.0) ** power
    )


def cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, final_scale: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``final_scale`` × lr."""
    import math

    total = max(int(total_steps), 1)

    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
