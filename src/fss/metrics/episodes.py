"""``episodes.csv``: the per-episode evidence behind a test mIoU.

One row per test episode and test seed, columns :data:`COLUMNS`:

- ``test_seed``: the seed of the test episodes (a multi-seed run, ``test_seeds=[...]``,
  writes one file with every seed's rows, in seed order);
- ``index``: the episode index; ``class``: the dataset's 0-based class id;
- ``query``: the query image as the dataset's lists name it; ``supports``: the support
  images in draw order, ``;``-separated;
- ``fg_intersection``, ``fg_union``, ``bg_intersection``, ``bg_union``: the pixel counts
  the metric accumulated for the episode.

:func:`scores` recomputes mIoU and FB-IoU from rows exactly as
:class:`~fss.metrics.FewShotIoU` does (class-wise sums over all episodes), so the file
reproduces metrics.json.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("test_seed", "index", "class", "query", "supports", "fg_intersection", "fg_union",
           "bg_intersection", "bg_union")
IDENTITY = ("test_seed", "index", "class", "query", "supports")
COUNTS = ("fg_intersection", "fg_union", "bg_intersection", "bg_union")
FILENAME = "episodes.csv"


def write(path: str | Path, rows: Iterable[dict[str, Any]], append: bool = False) -> Path:
    """Writes (or appends) ``rows`` (dicts with :data:`COLUMNS`) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not append or not path.is_file()
    with path.open("w" if new else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in COLUMNS})
    return path


def read(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an episodes.csv, numbers as ints (``test_seed`` None when empty)."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)}")
        rows = []
        for row in reader:
            seed = row["test_seed"]
            rows.append({
                "test_seed": int(seed) if seed not in ("", "None") else None,
                "index": int(row["index"]), "class": int(row["class"]),
                "query": row["query"], "supports": row["supports"],
                **{key: int(float(row[key])) for key in COUNTS},
            })
    return rows


def count_arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(classes (N,) int64, counts (N, 4) float64 in :data:`COUNTS` order)."""
    classes = np.array([row["class"] for row in rows], dtype=np.int64)
    counts = np.array([[row[key] for key in COUNTS] for row in rows], dtype=np.float64)
    return classes, counts.reshape(len(rows), len(COUNTS))


def scores_from_sums(sums: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mIoU and FB-IoU (percent) from class-wise sums.

    sums: (..., C, 4) summed counts (:data:`COUNTS` order) per class; seen: (..., C) bool,
    the classes with at least one episode. Returns two (...) arrays, as FewShotIoU."""
    fg_iou = sums[..., 0] / np.maximum(sums[..., 1], 1)
    seen_count = seen.sum(-1)
    miou = np.where(seen, fg_iou, 0).sum(-1) / np.maximum(seen_count, 1) * 100
    total = np.where(seen[..., None], sums, 0).sum(-2)  # (..., 4)
    fbiou = (total[..., 0] / np.maximum(total[..., 1], 1)
             + total[..., 2] / np.maximum(total[..., 3], 1)) / 2 * 100
    nan = np.full_like(miou, np.nan)
    return np.where(seen_count > 0, miou, nan), np.where(seen_count > 0, fbiou, nan)


def scores(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``miou`` and ``fbiou`` (percent) of ``rows``, accumulated class-wise."""
    classes, counts = count_arrays(rows)
    labels, slots = np.unique(classes, return_inverse=True)
    sums = np.zeros((len(labels), len(COUNTS)))
    np.add.at(sums, slots, counts)
    miou, fbiou = scores_from_sums(sums, np.ones(len(labels), dtype=bool))
    return {"miou": float(miou), "fbiou": float(fbiou)}


def by_seed(rows: Sequence[dict[str, Any]]) -> dict[int | None, list[dict[str, Any]]]:
    """Rows grouped by ``test_seed``, in file order."""
    groups: dict[int | None, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["test_seed"], []).append(row)
    return groups
