"""Named evaluation protocols: everything that makes two FSS numbers comparable.

A protocol fixes the split lists, the input size, where predictions are scored, whether
boundary pixels (label 255) are ignored, the training-data filter, the test episodes per
fold, the test seeds and what is reported over them. ``data.protocol`` picks one; its name
and every setting below land in ``metrics.json`` (``protocol``), the loggers and every
``fss-report`` row. docs/protocols.md has the same table for readers.

- ``hsnet``  (juhongm999/hsnet ``test.py``): HSNet's lists, 400², scored at 400², boundary
  ignored, no training filter, 1000 test episodes (FSS-1000: its 2400 test images), one
  seed (0), one number reported.
- ``pfenet`` (PFENet's lists, as BAM and HDMNet use them): 473² (COCO 633²), scored at the
  label's original size, boundary ignored, training images holding a novel class dropped
  (a class counts with >= 2048 pixels), 1000 test episodes (COCO 10000), one seed (the
  run's ``data.module.test_seed``; no seed is fixed by this protocol).
- ``bam``    (chunbolang/BAM ``test.py``): the pfenet data; 5 seeds drawn by
  ``np.random.seed(123); np.random.randint(0, 1000, 5)``; mean and best reported.
- ``hdmnet`` (Pbihao/HDMNet ``test.py``): the pfenet data; 10 seeds drawn the same way
  (``randint(0, 1000, 10)``, so BAM's 5 are its first 5); mean and best reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fss.utils.errors import ConfigError

# The seed array of BAM's and HDMNet's test.py: numpy's global generator seeded with 123,
# then randint(0, 1000, n).
OFFICIAL_SEED_BASE = 123


def official_seed_array(count: int, base: int = OFFICIAL_SEED_BASE) -> list[int]:
    """The ``count`` test seeds of BAM (5) / HDMNet (10): legacy ``RandomState(base)``."""
    return [int(s) for s in np.random.RandomState(base).randint(0, 1000, count)]


@dataclass(frozen=True)
class Protocol:
    """One named protocol (see the module docstring). Dataset-dependent settings are dicts
    keyed by ``data.name`` (pascal, coco, fss1000)."""

    name: str
    lists: str                        # which official lists: hsnet | pfenet
    image_size: dict[str, int]
    eval_resolution: str              # network | original
    ignore_boundary: bool             # 255 ignored (true) or scored as background
    train_filter: str
    test_episodes: dict[str, int | None]  # None: one per test image (FSS-1000)
    test_seeds: tuple[int, ...]
    report: str                       # what the official script prints over the seeds
    official_streams: tuple[str, ...]  # datasets where data.episodes=official is exact

    def settings(self, dataset: str) -> dict[str, Any]:
        """The protocol's settings for ``dataset`` as plain values (metrics.json, loggers)."""
        record = asdict(self)
        record["image_size"] = self.image_size.get(dataset)
        record["test_episodes"] = self.test_episodes.get(dataset)
        record["test_seeds"] = list(self.test_seeds)
        record["official_streams"] = list(self.official_streams)
        return record


_PFENET_FILTER = ("drop training images holding a novel class; a class counts with >= 2048 "
                  "pixels")

_PFENET = Protocol(
    name="pfenet", lists="pfenet",
    image_size={"pascal": 473, "coco": 633},
    eval_resolution="original", ignore_boundary=True, train_filter=_PFENET_FILTER,
    test_episodes={"pascal": 1000, "coco": 10000},
    test_seeds=(), report="one seed (data.module.test_seed)",
    official_streams=(),
)
PROTOCOLS: dict[str, Protocol] = {
    "hsnet": Protocol(
        name="hsnet", lists="hsnet",
        image_size={"pascal": 400, "coco": 400, "fss1000": 400},
        eval_resolution="network", ignore_boundary=True, train_filter="none",
        test_episodes={"pascal": 1000, "coco": 1000, "fss1000": None},
        test_seeds=(0,), report="one seed",
        official_streams=("pascal", "coco", "fss1000"),
    ),
    "pfenet": _PFENET,
    # BAM and HDMNet test as PFENet does, over several seeds of the official seed array.
    "bam": replace(_PFENET, name="bam", test_seeds=tuple(official_seed_array(5)),
                   report="mean and best of 5 seeds"),
    "hdmnet": replace(_PFENET, name="hdmnet", test_seeds=tuple(official_seed_array(10)),
                      report="mean and best of 10 seeds"),
}

EPISODE_MODES = ("seeded", "official")


def get_protocol(name: str, dataset: str | None = None) -> Protocol:
    """The protocol called ``name``; ConfigError naming the accepted ones otherwise (or
    when it does not cover ``dataset``)."""
    protocol = PROTOCOLS.get(str(name))
    if protocol is None:
        raise ConfigError(f"data.protocol={name!r} does not exist; accepted: "
                          f"{', '.join(PROTOCOLS)}")
    if dataset is not None and dataset not in protocol.image_size:
        covered = [p.name for p in PROTOCOLS.values() if dataset in p.image_size]
        raise ConfigError(f"data.protocol={name!r} does not cover {dataset}; accepted there: "
                          f"{', '.join(covered)}")
    return protocol


def check_episode_mode(mode: str, protocol: Protocol, dataset: str) -> str:
    """``data.episodes``: ``seeded`` (episode i from (seed, i), any protocol) or
    ``official`` (the official test script's episode stream, where it is replayed)."""
    if mode not in EPISODE_MODES:
        raise ConfigError(f"data.episodes={mode!r} is not supported; accepted: "
                          f"{', '.join(EPISODE_MODES)}")
    if mode == "official" and dataset not in protocol.official_streams:
        exact = [f"{p.name} on {', '.join(p.official_streams)}"
                 for p in PROTOCOLS.values() if p.official_streams]
        raise ConfigError(f"data.episodes=official is not available for data.protocol="
                          f"{protocol.name} on {dataset} (official streams are replayed for: "
                          f"{'; '.join(exact)}; see docs/protocols.md); use data.episodes=seeded")
    return mode


def protocol_record(source: Any, eval_resolution: str | None = None) -> dict[str, Any] | None:
    """What metrics.json, the loggers and fss-report record of a run's protocol: the name,
    its settings for the source's dataset, and the values the run actually uses where the
    configuration overrides them (``image_size``, ``eval_resolution``, ``ignore_boundary``,
    ``episodes``). None for sources without a protocol (synthetic data)."""
    if getattr(source, "protocol", None) is None and hasattr(source, "test"):
        source = source.test  # cross-dataset testing: the test dataset's protocol
    name = getattr(source, "protocol", None)
    dataset = getattr(source, "dataset", None)
    if name is None or dataset is None:
        return None
    record = get_protocol(name).settings(dataset)
    record["image_size"] = getattr(source, "image_size", record["image_size"])
    record["eval_resolution"] = eval_resolution or getattr(source, "eval_resolution", None)
    record["ignore_boundary"] = bool(getattr(source, "ignore_boundary", True))
    record["episodes"] = getattr(source, "episodes", "seeded")
    return record
