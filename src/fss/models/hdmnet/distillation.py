"""Correlation distillation of HDMNet.

Each matching stage yields a correlation map C' (B, h, w) (coarse → fine: 15², 30², 60²
for a 473² input). The coarsest map is taught by the ground truth, each finer map by the
previous (coarser) map, detached and upsampled:

    loss = 1/S · Σ_l KL(softmax(teacher_l / T) ‖ softmax(C'_l / T)),

the softmax taken over the h·w positions of each image, the KL summed over positions and
averaged over the batch. The ground-truth teacher is 1 on the query foreground and −1e9
elsewhere (ignore pixels 255 count as background), resized bilinearly
(``align_corners=False``) to the stage size; after the softmax it is uniform over the
foreground.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF_LOGIT = -1e9
LOG_EPS = 1e-12


def kl_divergence(
    teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) over positions, mean over batch.

    teacher, student: (B, h, w) (or (B, L)) logits of the same shape."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ"
        )
    t = (teacher.flatten(1) / temperature).softmax(dim=1)
    s = (student.flatten(1) / temperature).softmax(dim=1)
    return (t * (torch.log(t + LOG_EPS) - torch.log(s + LOG_EPS))).sum(dim=1).mean()


def ground_truth_teacher(query_mask: torch.Tensor) -> torch.Tensor:
    """query_mask (B, H, W) with 1 = target → teacher logits (B, H, W): 1 on the target,
    −1e9 elsewhere (255 included)."""
    target = query_mask == 1
    return torch.where(target, 1.0, NEG_INF_LOGIT).to(torch.float32)


def resize_map(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) → (B, *size), bilinear, ``align_corners=False``."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(
        values.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)


def correlation_distillation_loss(
    correlations: list[torch.Tensor], query_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """correlations: C' maps coarse → fine, each (B, h_l, w_l); query_mask (B, H, W)."""
    if not correlations:
        raise ValueError("correlation distillation needs at least one correlation map")
    # float32 throughout: the −1e9 teacher logits overflow float16.
    teacher = ground_truth_teacher(query_mask).to(correlations[0].device)
    total = teacher.new_zeros(())
    for correlation in correlations:
        correlation = correlation.float()
        total = total + kl_divergence(
            resize_map(teacher, correlation.shape[-2:]), correlation, temperature
        )
        teacher = correlation.detach()
    return total / len(correlations)
