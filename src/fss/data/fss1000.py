"""FSS-1000 on the official layout (1000 classes: 520 train / 240 val / 240 test).

Layout under ``root`` (what ``python -m fss.prepare fss1000`` writes)::

    FSS-1000/<class name>/<n>.jpg   and   <n>.png   (n = 1..10; masks thresholded at 128)

Only HSNet's protocol exists: class splits from ``hsnet/fss/{trn,val,test}.txt``; class ids
are the sorted class names of each split, offset by 0 / 520 / 760 (as the official code);
every image of the split is a query once per pass (list order: classes sorted, then the
file names sorted as strings), the supports are other images of its class; 400x400. There
is a single "fold": ``novel_classes`` are the test classes, ``val_classes`` the validation
classes, ``base_classes`` the training classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fss.data.io import require_dir
from fss.data.lists import ListStore, fss_classes
from fss.data.official import hsnet_fss_stream
from fss.data.real import (
    Plan,
    RealSource,
    Record,
    RecordTable,
    draws_to_records,
    pools_from_queries,
)
from fss.utils.errors import ConfigError, DataError

SPLIT_FILES = {"train": "trn", "val": "val", "test": "test"}
OFFSETS = {"train": 0, "val": 520, "test": 760}
SIZES = {"train": 520, "val": 240, "test": 240}
PREPARE_HINT = ("set paths.data_root (or FSS_DATA) to the folder holding FSS-1000/, or build "
                "it with: python -m fss.prepare fss1000 --zip fewshot_data.zip --out <data_root>")


class FSS1000Source(RealSource):
    """FSS-1000 (see the module docstring)."""

    name = "fss1000"
    dataset = "fss1000"
    num_classes = 1000
    num_folds = 1
    PROTOCOLS = ("hsnet",)
    DEFAULT_SIZE = {"hsnet": 400}

    def __init__(
        self,
        root: str | Path,
        protocol: str = "hsnet",
        image_size: int | None = None,
        lists: ListStore | None = None,
        episodes: str = "seeded",
        ignore_boundary: bool | None = None,
    ):
        super().__init__(root, protocol, image_size, augment=False, fold_scheme="contiguous",
                         episodes=episodes, ignore_boundary=ignore_boundary)
        self.lists = lists or ListStore()
        self.folder = self.root / "FSS-1000"
        self._names: dict[str, list[str]] = {}

    # -- classes -----------------------------------------------------------------------
    def split_classes(self, split: str) -> list[str]:
        """Sorted class names of ``split`` (``train``, ``val``, ``test``)."""
        if split not in self._names:
            names = sorted(fss_classes(self.lists, SPLIT_FILES[split]))
            if len(names) > SIZES[split] or len(set(names)) != len(names):
                raise DataError(f"FSS-1000 {split} list has {len(names)} classes (or repeats "
                                f"one); the official one has {SIZES[split]} distinct classes")
            self._names[split] = names
        return self._names[split]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return [n for split in ("train", "val", "test") for n in self.split_classes(split)]

    def _ids(self, split: str) -> list[int]:
        return list(range(OFFSETS[split], OFFSETS[split] + len(self.split_classes(split))))

    def novel_classes(self, fold: int) -> list[int]:
        return self._ids("test")

    def val_classes(self, fold: int) -> list[int]:
        return self._ids("val")

    def base_classes(self, fold: int) -> list[int]:
        return self._ids("train")

    # -- data ----------------------------------------------------------------------------
    def check_layout(self) -> None:
        require_dir(self.root, "the data root", PREPARE_HINT)
        require_dir(self.folder, "FSS-1000", PREPARE_HINT)

    def plan(self, split: str, fold: int) -> Plan:
        # FSS-1000 has distinct val and test classes: one plan per split.
        key = (split, fold)
        if key not in self._plans:
            self.check_layout()
            self._plans[key] = self._split_plan(split)
        return self._plans[key]

    def _split_plan(self, split: str) -> Plan:
        table = RecordTable()
        queries = []
        for offset, name in enumerate(self.split_classes(split)):
            class_id = OFFSETS[split] + offset
            folder = require_dir(self.folder / name, f"FSS-1000 class {name!r}", PREPARE_HINT)
            images = sorted(p.name for p in folder.iterdir() if p.suffix == ".jpg")
            if not images:
                raise DataError(f"FSS-1000 class folder {folder} has no .jpg image; "
                                "re-run the prepare command")
            for image in images:
                jpg = folder / image
                record = table.add(jpg, jpg.with_suffix(".png"), class_id, name=f"{name}/{image}")
                queries.append((record, (class_id,)))
        classes = self._ids(split)
        return Plan(table.records, queries, pools_from_queries(queries, classes),
                    "shuffle" if split == "train" else "list", classes)

    def official_draws(self, plan: Plan, fold: int, shot: int, num_episodes: int,
                       seed: int) -> list[tuple[int, int, list[int]]]:
        """HSNet's test stream (``fss.data.official.hsnet_fss_stream``) on ``plan``."""
        queries = [(plan.records[r].id, classes[0]) for r, classes in plan.queries]
        draws = hsnet_fss_stream(queries, shot, num_episodes, seed)
        return draws_to_records(plan, draws, "FSS-1000 test")

    def _read_mask(self, record: Record, class_id: int) -> np.ndarray:
        """Binary mask (>= 128 -> 1); its class is the record's (class ids exceed uint8)."""
        path = Path(record.label)
        if not path.is_file():
            raise DataError(f"missing mask {path} of the image {record.image}; re-run the "
                            "prepare command for FSS-1000")
        try:
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise DataError(f"corrupt mask {path} ({error}); replace the file") from None
        return (mask >= 128).astype(np.uint8)

    def default_episodes(self, split: str, fold: int) -> int:
        return len(self.plan(split, fold).queries)

    def semantic(self, split, fold, num_images, seed, epoch=0):
        raise ConfigError("base-class pretraining is not available for FSS-1000 (520 classes, "
                          "one object per image); use backbone.weights=imagenet or a file")
