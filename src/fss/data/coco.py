"""COCO-20i on the official layout (80 classes, 4 folds of 20).

Layout under ``root`` (what ``python -m fss.prepare coco`` writes)::

    COCO2014/train2014/COCO_train2014_<id>.jpg      COCO2014/val2014/...
    COCO2014/annotations/train2014/COCO_train2014_<id>.png   0 bg, c + 1 for class c
    COCO2014/annotations/val2014/...

Class ``c`` is the ``c``-th COCO category in id order (person = 0 ... toothbrush = 79).
Folds: ``interleaved`` (default; novel = {i + 4k}, HSNet's lists and PFENet's "split COCO")
or ``contiguous`` (novel = 20i..20i+19, the PANet split).

Protocols:

- ``hsnet``: HSNet's per-fold pickles (class -> images; train2014 for training, val2014
  for testing). As the official code, every episode draws its class uniformly, then the
  query uniformly among the class's images (not in list order); 1000 test episodes; 400x400.
  The contiguous split is assembled from the same per-class lists (each class's list is the
  same in every fold file that holds it).
- ``pfenet``: PFENet-protocol lists built from every train2014 / val2014 label map of the
  prepared tree with the 2048-pixel rule; training drops images with a novel class;
  10000 test episodes in list order, scored at the original label size; 633x633 images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fss.data.io import read_label, require_dir
from fss.data.lists import (
    ListStore,
    build_label_index,
    cache_key,
    cached_fold_lists,
    derive_fold_lists,
    hsnet_coco_classwise,
    sha256_of,
)
from fss.data.official import hsnet_coco_stream
from fss.data.real import (
    Augmentation,
    Plan,
    RealSource,
    Record,
    RecordTable,
    draws_to_records,
    plan_from_fold_lists,
)
from fss.utils.errors import ConfigError, DataError

CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
IMAGE_SETS = {"train": "train2014", "test": "val2014"}
log = logging.getLogger(__name__)
PREPARE_HINT = ("set paths.data_root (or FSS_DATA) to the folder holding COCO2014/, or build it "
                "with: python -m fss.prepare coco --images train2014.zip val2014.zip "
                "--annotations annotations_trainval2014.zip --out <data_root>")


class CocoSource(RealSource):
    """COCO-20i (see the module docstring).

    Args:
        root: the data root (holding ``COCO2014/``).
        protocol: ``hsnet`` or ``pfenet``.
        fold_scheme: ``interleaved`` (default) or ``contiguous``.
        image_size: network input side (default 400 for hsnet, 633 for pfenet).
        augment: augment training episodes (default: on for pfenet, see RealSource).
        lists: where the official lists come from (default: download + cache).
        cache_dir: where built lists are cached (default: ``lists.cache_dir / "built"``).
        train_augmentation, semantic_augmentation: see :class:`~fss.data.real.RealSource`.
        episodes: ``seeded`` or ``official`` (HSNet's test stream; hsnet protocol,
            interleaved folds; ``fss.data.official``).
        ignore_boundary: see :class:`~fss.data.pascal.PascalSource` (COCO masks have no 255).
    """

    name = "coco20i"
    dataset = "coco"
    num_classes = 80
    num_folds = 4
    class_names = CLASS_NAMES
    DEFAULT_SIZE = {"hsnet": 400, "pfenet": 633}
    TEST_EPISODES = {"hsnet": 1000, "pfenet": 10000}
    AUGMENT_SCALE = (0.8, 1.25)

    def __init__(
        self,
        root: str | Path,
        protocol: str = "hsnet",
        fold_scheme: str = "interleaved",
        image_size: int | None = None,
        augment: bool | None = None,
        lists: ListStore | None = None,
        cache_dir: str | Path | None = None,
        train_augmentation: Augmentation | None = None,
        semantic_augmentation: Augmentation | None = None,
        episodes: str = "seeded",
        ignore_boundary: bool | None = None,
    ):
        super().__init__(root, protocol, image_size, augment, fold_scheme,
                         train_augmentation, semantic_augmentation, episodes, ignore_boundary)
        self.lists = lists or ListStore()
        self.cache_dir = Path(cache_dir) if cache_dir else self.lists.cache_dir / "built"
        self.folder = self.root / "COCO2014"

    def check_layout(self) -> None:
        require_dir(self.root, "the data root", PREPARE_HINT)
        require_dir(self.folder, "COCO2014", PREPARE_HINT)
        for image_set in IMAGE_SETS.values():
            require_dir(self.folder / image_set, f"COCO {image_set} images", PREPARE_HINT)
            require_dir(self.folder / "annotations" / image_set, f"COCO {image_set} masks",
                        PREPARE_HINT)

    def _read_label(self, record: Record) -> np.ndarray:
        return read_label(record.label, self.num_classes)

    def _pair(self, image: str) -> tuple[Path, Path]:
        """Image path relative to COCO2014 (``train2014/x.jpg``) -> (image, mask) paths."""
        return self.folder / image, self.folder / "annotations" / Path(image).with_suffix(".png")

    # -- HSNet protocol ------------------------------------------------------------------
    def hsnet_classwise(self, split: str, fold: int) -> dict[int, list[str]]:
        """HSNet's class -> images of the fold's classes (``trn``: base, ``val``: novel)."""
        classes = self.base_classes(fold) if split == "trn" else self.novel_classes(fold)
        if self.fold_scheme == "interleaved":
            table = hsnet_coco_classwise(self.lists, split, fold)
            return {c: table.get(c, []) for c in classes}
        # Class c is novel in interleaved fold c % 4 (its val list) and base in the others.
        files: dict[int, dict[int, list[str]]] = {}
        result = {}
        for c in classes:
            source_fold = c % 4 if split == "val" else (c % 4 + 1) % 4
            if source_fold not in files:
                files[source_fold] = hsnet_coco_classwise(self.lists, split, source_fold)
            result[c] = files[source_fold].get(c, [])
        return result

    def _plan(self, split: str, fold: int) -> Plan:
        if self.family == "hsnet":
            classwise = self.hsnet_classwise("trn" if split == "train" else "val", fold)
            table = RecordTable()
            pools = {c: [table.add(*self._pair(image), name=image) for image in images]
                     for c, images in classwise.items()}
            # Query candidates only matter for "list"/"shuffle"; "class" draws from pools.
            # HSNet's epoch length is its number of distinct images.
            queries = [(index, ()) for index in range(len(table.records))]
            empty = [c for c, pool in pools.items() if not pool]
            if len(empty) == len(pools):
                raise DataError(f"{self.name}: no class of fold {fold} has an image in HSNet's "
                                "COCO lists; check data.fold_scheme and data.lists_dir")
            if empty:  # never with the official lists
                log.warning("%s fold %d: classes %s have no image in the lists; episodes are "
                            "drawn from the other classes", self.name, fold, empty)
            classes = sorted(c for c, pool in pools.items() if pool)
            return Plan(table.records, queries, pools, "class", classes)
        lists = self.pfenet_lists(split, fold)
        return plan_from_fold_lists(lists.data_list, lists.sub_class, self.folder,
                                    "shuffle" if split == "train" else "list")

    def official_draws(self, plan: Plan, fold: int, shot: int, num_episodes: int,
                       seed: int) -> list[tuple[int, int, list[int]]]:
        """HSNet's test stream (``fss.data.official.hsnet_coco_stream``) on ``plan``."""
        if self.fold_scheme != "interleaved":
            raise ConfigError("data.episodes=official replays HSNet's COCO-20i folds: it needs "
                              "data.fold_scheme=interleaved")
        classwise = hsnet_coco_classwise(self.lists, "val", fold)
        draws = hsnet_coco_stream(classwise, self.novel_classes(fold), shot, num_episodes, seed)
        return draws_to_records(plan, draws, f"{self.name} fold {fold}")

    # -- PFENet protocol -----------------------------------------------------------------
    def source_pairs(self, split: str) -> list[tuple[str, str]]:
        """Every (image, mask) of train2014 (``train``) or val2014, by file name: the
        source list the PFENet-protocol lists are built from."""
        image_set = IMAGE_SETS["train" if split == "train" else "test"]
        masks = self.folder / "annotations" / image_set
        names = sorted(entry.name for entry in os.scandir(masks) if entry.name.endswith(".png"))
        return [(f"{image_set}/{Path(n).with_suffix('.jpg')}", f"annotations/{image_set}/{n}")
                for n in names]

    def _key(self, pairs: list[tuple[str, str]]) -> str:
        listing = "".join(f"{i} {lb}\n" for i, lb in pairs).encode()
        return cache_key(self.folder.resolve(), sha256_of(listing), self.num_classes)

    def _index(self, split: str, pairs: list[tuple[str, str]] | None = None):
        pairs = self.source_pairs(split) if pairs is None else pairs
        cache_file = self.cache_dir / "coco" / self._key(pairs) / f"label_index_{split}.json"
        return build_label_index(pairs, self.folder, self.num_classes, cache_file)

    def pfenet_lists(self, split: str, fold: int):
        """PFENet-protocol ``data_list`` / ``sub_class_file_list`` (built and cached)."""
        split = "train" if split == "train" else "test"
        pairs = self.source_pairs(split)
        folder = (self.cache_dir / "coco" / self._key(pairs) /
                  f"{self.fold_scheme}-fold{fold}" / split)
        classes = self.base_classes(fold) if split == "train" else self.novel_classes(fold)
        return cached_fold_lists(folder, lambda: self._index(split, pairs), classes,
                                 drop_other_classes=split == "train")

    def _semantic_records(self, split: str, fold: int) -> list[Record]:
        """Base-class images: training = the PFENet training list of the fold (no novel
        class); validation = val2014 images with a base class of >= 2048 pixels."""
        if split == "train":
            data_list = self.pfenet_lists("train", fold).data_list
        else:
            data_list = derive_fold_lists(self._index("test"), self.base_classes(fold),
                                          drop_other_classes=False).data_list
        return [Record(self.folder / i, self.folder / lb) for i, lb, _ in data_list]
