"""PASCAL-5i on the official layout (20 classes, 4 contiguous folds of 5).

Layout under ``root`` (what ``python -m fss.prepare pascal`` writes)::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClassAug/<id>.png   palette indices: 0 bg, 1..20, 255 boundaries

Protocols:

- ``hsnet``: HSNet's lists ``hsnet/pascal/{trn,val}/fold<i>.txt`` (``IMAGEID__CC``).
  Training uses the ``trn`` lists of the three other folds (11394 / 10255 / 7797 / 11594
  pairs), testing ``val/fold<i>`` (346 / 451 / 725 / 346 pairs) in list order, 1000
  episodes. The query/support class is the pair's class; supports come from the pairs of
  that class. 400x400 images; 255 boundaries are ignored when scoring.
- ``pfenet``: PFENet/BAM/HDMNet: per-fold lists built from ``voc_sbd_merge_noduplicate.txt``
  (train) and ``val.txt`` (test) with the 2048-pixel rule (``fss.data.lists``); training
  drops images with a novel class; 1000 test episodes in list order, scored at the original
  label size; 473x473 images, training augmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fss.data.io import read_label, require_dir
from fss.data.lists import (
    ListStore,
    build_label_index,
    cache_key,
    cached_fold_lists,
    derive_fold_lists,
    hsnet_pascal_pairs,
    read_pair_list,
    sha256_of,
)
from fss.data.official import hsnet_pascal_stream
from fss.data.real import (
    Augmentation,
    Plan,
    RealSource,
    Record,
    RecordTable,
    draws_to_records,
    plan_from_fold_lists,
    pools_from_queries,
)

CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
PFENET_LISTS = {"train": "pfenet/pascal/voc_sbd_merge_noduplicate.txt",
                "test": "pfenet/pascal/val.txt"}
PREPARE_HINT = ("set paths.data_root (or FSS_DATA) to the folder holding VOC2012/, or build it "
                "with: python -m fss.prepare pascal --voc VOCtrainval_11-May-2012.tar "
                "--sbd benchmark.tgz --out <data_root>")


class PascalSource(RealSource):
    """PASCAL-5i (see the module docstring).

    Args:
        root: the data root (holding ``VOC2012/``).
        protocol: ``hsnet`` or ``pfenet``.
        image_size: network input side (default 400 for hsnet, 473 for pfenet).
        augment: augment training episodes (default: on for pfenet, see RealSource).
        lists: where the official lists come from (default: download + cache).
        cache_dir: where built lists are cached (default: ``lists.cache_dir / "built"``).
        train_augmentation, semantic_augmentation: see :class:`~fss.data.real.RealSource`.
        episodes: ``seeded`` (episode i from (seed, i)) or ``official`` (HSNet's test stream,
            hsnet protocol; ``fss.data.official``).
        ignore_boundary: false scores boundary pixels (255) as background (Table A1 of
            HSNet); None: the protocol's (true).
    """

    name = "pascal5i"
    dataset = "pascal"
    num_classes = 20
    num_folds = 4
    class_names = CLASS_NAMES
    DEFAULT_SIZE = {"hsnet": 400, "pfenet": 473}
    TEST_EPISODES = {"hsnet": 1000, "pfenet": 1000}
    AUGMENT_SCALE = (0.9, 1.1)

    def __init__(
        self,
        root: str | Path,
        protocol: str = "hsnet",
        image_size: int | None = None,
        augment: bool | None = None,
        lists: ListStore | None = None,
        cache_dir: str | Path | None = None,
        train_augmentation: Augmentation | None = None,
        semantic_augmentation: Augmentation | None = None,
        episodes: str = "seeded",
        ignore_boundary: bool | None = None,
    ):
        super().__init__(root, protocol, image_size, augment, "contiguous",
                         train_augmentation, semantic_augmentation, episodes, ignore_boundary)
        self.lists = lists or ListStore()
        self.cache_dir = Path(cache_dir) if cache_dir else self.lists.cache_dir / "built"
        self.folder = self.root / "VOC2012"

    def check_layout(self) -> None:
        require_dir(self.root, "the data root", PREPARE_HINT)
        require_dir(self.folder, "PASCAL VOC2012", PREPARE_HINT)
        require_dir(self.folder / "JPEGImages", "PASCAL VOC2012 images", PREPARE_HINT)
        require_dir(self.folder / "SegmentationClassAug", "PASCAL SegmentationClassAug labels",
                    PREPARE_HINT)

    def _record(self, image_id: str) -> tuple[Path, Path]:
        return (self.folder / "JPEGImages" / f"{image_id}.jpg",
                self.folder / "SegmentationClassAug" / f"{image_id}.png")

    def _read_label(self, record: Record) -> np.ndarray:
        return read_label(record.label, self.num_classes)

    # -- plans ----------------------------------------------------------------------
    def hsnet_pairs(self, split: str, fold: int) -> list[tuple[str, int]]:
        """HSNet's (image id, class) pairs: ``train`` = the trn lists of the other folds."""
        if split == "train":
            return [pair for other in range(self.num_folds) if other != fold
                    for pair in hsnet_pascal_pairs(self.lists, "trn", other)]
        return hsnet_pascal_pairs(self.lists, "val", fold)

    def _plan(self, split: str, fold: int) -> Plan:
        if self.family == "hsnet":
            classes = self.base_classes(fold) if split == "train" else self.novel_classes(fold)
            order = "shuffle" if split == "train" else "list"
            return self._hsnet_plan(self.hsnet_pairs(split, fold), classes, order)
        lists = self.pfenet_lists(split, fold)
        return plan_from_fold_lists(lists.data_list, lists.sub_class, self.folder,
                                    "shuffle" if split == "train" else "list")

    def official_draws(self, plan: Plan, fold: int, shot: int, num_episodes: int,
                       seed: int) -> list[tuple[int, int, list[int]]]:
        """HSNet's test stream (``fss.data.official.hsnet_pascal_stream``) on ``plan``."""
        draws = hsnet_pascal_stream(self.hsnet_pairs("test", fold), shot, num_episodes, seed)
        return draws_to_records(plan, draws, f"{self.name} fold {fold}")

    def _hsnet_plan(self, pairs: list[tuple[str, int]], classes: list[int], order: str) -> Plan:
        table = RecordTable()
        queries = [(table.add(*self._record(image_id)), (class_id,))
                   for image_id, class_id in pairs]
        return Plan(table.records, queries, pools_from_queries(queries, classes), order, classes)

    def _class_plan(self, classes: list[int]) -> Plan:
        """Test episodes of any classes: hsnet, the pairs of those classes in the four
        ``val`` lists (in fold order, then list order); pfenet, the test list's images
        with one of them (>= 2048 pixels to be asked for), as for a fold."""
        if self.family == "hsnet":
            wanted = set(classes)
            pairs = [pair for fold in range(self.num_folds)
                     for pair in hsnet_pascal_pairs(self.lists, "val", fold) if pair[1] in wanted]
            return self._hsnet_plan(pairs, classes, "list")
        lists = derive_fold_lists(self._index("test"), classes, drop_other_classes=False)
        return plan_from_fold_lists(lists.data_list, lists.sub_class, self.folder, "list")

    # -- PFENet-protocol lists --------------------------------------------------------
    def _index(self, split: str):
        name = PFENET_LISTS[split]
        data = self.lists.read_bytes(name)
        pairs = read_pair_list(data, name)
        key = cache_key(self.folder.resolve(), sha256_of(data), self.num_classes)
        cache_file = self.cache_dir / "pascal" / key / f"label_index_{split}.json"
        return build_label_index(pairs, self.folder, self.num_classes, cache_file)

    def pfenet_lists(self, split: str, fold: int):
        """PFENet's ``data_list`` / ``sub_class_file_list`` of ``fold`` (built and cached)."""
        split = "train" if split == "train" else "test"
        data = self.lists.read_bytes(PFENET_LISTS[split])
        key = cache_key(self.folder.resolve(), sha256_of(data), self.num_classes)
        folder = self.cache_dir / "pascal" / key / f"fold{fold}" / split
        classes = self.base_classes(fold) if split == "train" else self.novel_classes(fold)
        return cached_fold_lists(folder, lambda: self._index(split), classes,
                                 drop_other_classes=split == "train")

    def _semantic_records(self, split: str, fold: int) -> list[Record]:
        """Base-class images: training = the PFENet training list of the fold (no novel
        class); validation = test-list images with a base class of >= 2048 pixels."""
        if split == "train":
            data_list = self.pfenet_lists("train", fold).data_list
        else:
            data_list = derive_fold_lists(self._index("test"), self.base_classes(fold),
                                          drop_other_classes=False).data_list
        return [Record(self.folder / i, self.folder / lb) for i, lb, _ in data_list]
