"""Which classes are novel (test) and which are base (train) in a fold.

Classes are 0-based everywhere in fss. PASCAL-5i and the synthetic benchmark use the
contiguous rule (fold i tests classes 5i..5i+4); COCO-20i uses the interleaved rule by
default (fold i tests {i + 4k}).
"""

from __future__ import annotations

FOLD_SCHEMES = ("contiguous", "interleaved")


def check_fold(fold: int, num_folds: int = 4) -> int:
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1}, got {fold!r}")
    return fold


def novel_classes(
    fold: int, num_classes: int, num_folds: int = 4, scheme: str = "contiguous"
) -> list[int]:
    """0-based class ids tested in ``fold``."""
    check_fold(fold, num_folds)
    if num_classes % num_folds:
        raise ValueError(f"{num_classes} classes cannot be split into {num_folds} equal folds")
    per_fold = num_classes // num_folds
    if scheme == "contiguous":
        return list(range(fold * per_fold, (fold + 1) * per_fold))
    if scheme == "interleaved":
        return list(range(fold, num_classes, num_folds))
    raise ValueError(f"unknown fold scheme {scheme!r}; accepted: {', '.join(FOLD_SCHEMES)}")


def base_classes(
    fold: int, num_classes: int, num_folds: int = 4, scheme: str = "contiguous"
) -> list[int]:
    """0-based class ids trained on in ``fold`` (every class that is not novel)."""
    novel = set(novel_classes(fold, num_classes, num_folds, scheme))
    return [c for c in range(num_classes) if c not in novel]
