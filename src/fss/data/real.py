"""What PASCAL-5i, COCO-20i and FSS-1000 share: list-driven episodes and base-class images.

A source (``fss.data.pascal`` ...) turns its lists into a :class:`Plan`: the images
(:class:`Record`), the queries in list order with the classes each may be asked for, and
the support pool of every class. :class:`ListEpisodicDataset` then draws episode ``i``
from ``(seed, epoch, i)`` only:

- ``order="list"`` (val/test): query ``i`` is the ``i % N``-th of the list (the official
  protocols cycle through the list);
- ``order="shuffle"`` (training): query ``i`` is the ``i % N``-th of a permutation drawn
  from ``(seed, epoch, i // N)``, i.e. every epoch visits the queries in a new order, as a
  shuffled DataLoader does;
- ``order="class"`` (HSNet's COCO): a class uniformly among the split's classes, then a
  query uniformly among its images.

The episode class is drawn uniformly among the query's candidates; the ``shot`` supports
are distinct images of the class's pool, never the query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fss.data import folds, protocols
from fss.data.episodes import (
    Episode,
    EpisodicDataset,
    FewShotSource,
    SemanticDataset,
    check_positive,
    episode_mask,
    item_rng,
)
from fss.data.io import check_same_size, read_image, resize_image, resize_label
from fss.data.transforms import IGNORE_INDEX
from fss.utils.errors import ConfigError, DataError

PROTOCOLS = tuple(protocols.PROTOCOLS)
ORDERS = ("list", "shuffle", "class")


@dataclass(frozen=True)
class Record:
    """One image of a dataset and its label map (``class_id`` for per-class masks)."""

    image: Path
    label: Path
    class_id: int | None = None
    name: str | None = None  # as the lists name it (default: the image file's stem)

    @property
    def id(self) -> str:
        return self.name if self.name is not None else Path(self.image).stem


@dataclass
class Plan:
    """The episodes of one split of one fold, as lists.

    records:  every image involved.
    queries:  (record index, candidate classes) in list order.
    pools:    class -> record indices of its support images (in list order).
    order:    how queries are picked (see the module docstring).
    classes:  the split's classes (``order="class"`` draws among them).
    """

    records: list[Record]
    queries: list[tuple[int, tuple[int, ...]]]
    pools: dict[int, list[int]]
    order: str
    classes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


# (image uint8 (H, W, 3), label uint8 (H, W), rng) -> both at one fixed size
# (``fss.data.augment``: e.g. ``hdmnet_train_augmentation``).
Augmentation = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                        tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ImageTransform:
    """Resize an image and its mask to ``size`` (``antialias`` picks the protocol's
    bilinear, see ``fss.data.io``), or, given an ``augmentation`` and a generator, apply
    the augmentation instead (it ends at its own fixed size, e.g. HDMNet's resize or
    BAM's crop)."""

    size: tuple[int, int]
    antialias: bool = True
    augmentation: Augmentation | None = None

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.augmentation is not None and rng is not None:
            image, mask = self.augmentation(image, mask, rng)
        else:
            image = resize_image(image, self.size, self.antialias)
            mask = resize_label(mask, self.size)
        # torch.from_numpy wants writable arrays (PIL's are read-only views).
        return np.require(image, requirements="CW"), np.require(mask, requirements="CW")


LabelReader = Callable[[Record], np.ndarray]
# (record, class) -> (H, W) uint8 mask: 1 = the class, 0 = other, 255 = ignore.
MaskReader = Callable[[Record, int], np.ndarray]


def load_pair(record: Record, read_label: LabelReader) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and the (H, W) uint8 map ``read_label(record)`` of ``record``."""
    if not Path(record.image).is_file() and not Path(record.label).is_file():
        raise DataError(f"neither the image {record.image} nor its label map {record.label} "
                        "exists; re-run the prepare command for this dataset")
    label = read_label(record)
    image = read_image(record.image)
    check_same_size(image, label, record.image, record.label)
    return image, label


class ListEpisodicDataset(EpisodicDataset):
    """Episodes of a :class:`Plan` (see the module docstring).

    ``keep_original``: also return the query mask at its original resolution
    (``query_mask_orig``) for scoring there. ``transform.augmentation`` is used only when
    ``augment`` is true (training); query and supports are augmented independently.
    ``draws``: the episodes as ``(class, query record, support records)``, drawn ahead by an
    official stream (``fss.data.official``); then episode ``i`` is ``draws[i]`` and the
    generator of ``(seed, epoch, i)`` is not used for sampling.
    ``ignore_boundary``: false scores the query's ignore pixels (255, PASCAL's object
    boundaries) as background (query masks only; supports keep them).
    """

    def __init__(
        self,
        plan: Plan,
        read_mask: MaskReader,
        transform: ImageTransform,
        shot: int,
        num_episodes: int,
        seed: int,
        epoch: int = 0,
        augment: bool = False,
        keep_original: bool = False,
        name: str = "dataset",
        draws: Sequence[tuple[int, int, Sequence[int]]] | None = None,
        ignore_boundary: bool = True,
    ):
        super().__init__(shot=shot, num_episodes=num_episodes, seed=seed, epoch=epoch)
        if not plan.queries:
            raise DataError(f"{name}: no query image in this split (its lists are empty or "
                            "every image was filtered out)")
        if draws is not None and len(draws) < num_episodes:
            raise ValueError(f"{len(draws)} drawn episodes for {num_episodes}")
        self.draws = draws
        self.ignore_boundary = bool(ignore_boundary)
        self.plan = plan
        self.read_mask = read_mask
        self.transform = transform
        self.augment = augment
        self.keep_original = keep_original
        self.name = name
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _query(self, rng: np.random.Generator, index: int) -> tuple[int, tuple[int, ...]]:
        plan = self.plan
        count = len(plan.queries)
        if plan.order == "list":
            return plan.queries[index % count]
        if plan.order == "shuffle":
            block = index // count
            key = (self.epoch, block)
            if key not in self._permutations:
                # A permutation per (seed, epoch, block); 2**62 keeps it apart from items.
                perm_rng = np.random.default_rng((self.seed, self.epoch, 2**62 + block))
                self._permutations = {key: perm_rng.permutation(count)}
            return plan.queries[int(self._permutations[key][index % count])]
        class_id = plan.classes[int(rng.integers(len(plan.classes)))]
        pool = plan.pools.get(class_id, [])
        if not pool:
            raise DataError(f"{self.name}: class {class_id} has no image in the lists")
        return pool[int(rng.integers(len(pool)))], (class_id,)

    def draw(self, rng: np.random.Generator, index: int) -> tuple[int, int, list[int]]:
        """Episode ``index`` as ``(class, query record, support records)``."""
        if self.draws is not None:
            class_id, record_index, supports = self.draws[index]
            return int(class_id), int(record_index), [int(s) for s in supports]
        record_index, candidates = self._query(rng, index)
        # Classes with enough supports besides the query (PFENet picks among all of the
        # query's classes; a class whose only image is the query cannot form an episode).
        usable = [c for c in candidates
                  if len(self.plan.pools.get(c, ())) - (record_index in self.plan.pools.get(c, ()))
                  >= self.shot]
        if not usable:
            record = self.plan.records[record_index]
            raise DataError(f"{self.name}: query {record.image} (classes {list(candidates)}) has "
                            f"no class with {self.shot} support image(s) other than itself")
        class_id = usable[int(rng.integers(len(usable)))]
        pool = [r for r in self.plan.pools[class_id] if r != record_index]
        chosen = rng.choice(len(pool), size=self.shot, replace=False)
        return class_id, record_index, [pool[int(c)] for c in chosen]

    def episode_ids(self, index: int) -> tuple[str, list[str]]:
        """Query and support ids of episode ``index``, drawn without loading an image."""
        _, record_index, supports = self.draw(item_rng(self.seed, self.epoch, index), index)
        return self.plan.records[record_index].id, [self.plan.records[i].id for i in supports]

    def sample_episode(self, rng: np.random.Generator, index: int) -> Episode:
        class_id, record_index, support_indices = self.draw(rng, index)
        query_image, query_mask = self._load(record_index, class_id)
        if not self.ignore_boundary:
            query_mask = np.where(query_mask == IGNORE_INDEX, 0, query_mask).astype(np.uint8)
        original = query_mask if self.keep_original else None
        query_image, query_mask = self.transform(
            query_image, query_mask, rng if self.augment else None
        )
        support_images, support_masks = [], []
        for support_index in support_indices:
            image, mask = self._load(support_index, class_id)
            image, mask = self.transform(image, mask, rng if self.augment else None)
            support_images.append(image)
            support_masks.append(mask)
        return Episode(
            class_id=class_id,
            query_image=query_image,
            query_mask=query_mask,
            support_images=support_images,
            support_masks=support_masks,
            query_mask_orig=original,
            query_id=self.plan.records[record_index].id,
            support_ids=[self.plan.records[i].id for i in support_indices],
        )

    def _load(self, record_index: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        return load_pair(self.plan.records[record_index],
                         lambda record: self.read_mask(record, class_id))


class ListSemanticDataset(SemanticDataset):
    """Base-class segmentation images from a list of records (see SemanticDataset).

    Image ``i`` is the ``i % N``-th record, in list order (``shuffle=False``) or in a
    permutation drawn from ``(seed, epoch)`` (training).
    """

    def __init__(
        self,
        records: Sequence[Record],
        read_label: LabelReader,
        transform: ImageTransform,
        fold: int,
        num_classes: int,
        num_images: int | None,
        seed: int,
        epoch: int = 0,
        fold_scheme: str = "contiguous",
        shuffle: bool = False,
        name: str = "dataset",
    ):
        if not records:
            raise DataError(f"{name}: no base-class image in this split")
        if num_images is None or not shuffle:  # evaluation never repeats an image
            num_images = len(records) if num_images is None else min(num_images, len(records))
        super().__init__(
            fold=fold,
            num_classes=num_classes,
            num_images=num_images,
            seed=seed,
            epoch=epoch,
            fold_scheme=fold_scheme,
        )
        self.records = list(records)
        self.read_label = read_label
        self.transform = transform
        self.shuffle = shuffle
        self._order: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._order = None

    def sample(self, rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` and its label map, augmented when ``transform`` has an
        augmentation and this is the training split (``shuffle``)."""
        position = index % len(self.records)
        if self.shuffle:
            if self._order is None:
                self._order = np.random.default_rng((self.seed, self.epoch, 2**62)).permutation(
                    len(self.records)
                )
            position = int(self._order[position])
        image, label = load_pair(self.records[position], self.read_label)
        return self.transform(image, label, rng if self.shuffle else None)


class RealSource(FewShotSource):
    """Shared behaviour of the on-disk sources: protocol options and plan caching.

    Subclasses set ``name``, ``num_classes``, ``class_names``, ``num_folds``, implement
    :meth:`_plan`, :meth:`_read_label` (or :meth:`_read_mask`) and
    :meth:`_semantic_records`, and give their
    protocol defaults in ``DEFAULT_SIZE``, ``TEST_EPISODES`` and ``AUGMENT_SCALE``.

    Augmentation of training episodes: ``augment`` (``None``: on for the pfenet protocol or
    when ``train_augmentation`` is given) applies ``train_augmentation``, by default
    HDMNet's chain (``fss.data.augment.hdmnet_train_augmentation`` with the dataset's scale
    range and ``image_size``). ``semantic_augmentation`` (e.g. BAM's base-learner chain)
    applies to base-class training images; none by default.
    """

    DEFAULT_SIZE: dict[str, int] = {"hsnet": 400, "pfenet": 473}
    TEST_EPISODES: dict[str, int] = {"hsnet": 1000, "pfenet": 1000}
    VAL_EPISODES = 1000
    AUGMENT_SCALE: tuple[float, float] = (0.9, 1.1)
    PROTOCOLS: tuple[str, ...] = PROTOCOLS
    dataset: str = ""  # data.name: the key of the protocols' per-dataset settings

    def __init__(
        self,
        root: str | Path,
        protocol: str = "hsnet",
        image_size: int | None = None,
        augment: bool | None = None,
        fold_scheme: str = "contiguous",
        train_augmentation: Augmentation | None = None,
        semantic_augmentation: Augmentation | None = None,
        episodes: str = "seeded",
        ignore_boundary: bool | None = None,
    ):
        spec = protocols.get_protocol(protocol)
        if protocol not in self.PROTOCOLS:
            raise ConfigError(f"data.protocol={protocol!r} is not supported for {self.name}; "
                              f"accepted: {', '.join(self.PROTOCOLS)}")
        if fold_scheme not in folds.FOLD_SCHEMES:
            raise ConfigError(f"data.fold_scheme={fold_scheme!r} is not supported; accepted: "
                              f"{', '.join(folds.FOLD_SCHEMES)}")
        self.root = Path(root).expanduser()
        self.protocol = protocol
        # The lists and data pipeline the protocol uses: bam and hdmnet share pfenet's.
        self.family = spec.lists
        self.episodes = protocols.check_episode_mode(episodes, spec, self.dataset)
        if ignore_boundary is not None and not isinstance(ignore_boundary, bool):
            raise ConfigError(f"data.ignore_boundary={ignore_boundary!r} must be true, false or "
                              "null (the protocol's)")
        self.ignore_boundary = spec.ignore_boundary if ignore_boundary is None else ignore_boundary
        self.fold_scheme = fold_scheme
        size = self.DEFAULT_SIZE[self.family] if image_size is None else image_size
        self.image_size = check_positive("image_size", size)
        if augment is None:
            augment = self.family == "pfenet" or train_augmentation is not None
        self.augment = bool(augment)
        self.train_augmentation = train_augmentation
        self.semantic_augmentation = semantic_augmentation
        # HSNet scores at the network size by default, PFENet/BAM/HDMNet at the label's own.
        self.eval_resolution = spec.eval_resolution
        self._plans: dict[tuple, Plan] = {}

    # -- to implement ---------------------------------------------------------------
    def _plan(self, split: str, fold: int) -> Plan:
        raise NotImplementedError

    def _read_label(self, record: Record) -> np.ndarray:
        """(H, W) uint8 label map: 0 background, ``c + 1`` for class ``c``, 255 ignore."""
        raise NotImplementedError

    def _read_mask(self, record: Record, class_id: int) -> np.ndarray:
        """(H, W) uint8 mask of ``class_id``: 1, 0 or 255 (ignore)."""
        return episode_mask(self._read_label(record), class_id)

    def _semantic_records(self, split: str, fold: int) -> list[Record]:
        raise NotImplementedError

    def _class_plan(self, classes: list[int]) -> Plan:
        """Test episodes of ``classes``, any of the dataset's (see :meth:`class_episodic`)."""
        raise ConfigError(f"{self.name} cannot be tested on a class set of another dataset's "
                          "fold; cross-dataset testing supports PASCAL-5i (PascalSource)")

    def check_layout(self) -> None:
        """DataError naming the missing folder and the prepare command, if any."""

    # -- FewShotSource --------------------------------------------------------------
    def plan(self, split: str, fold: int) -> Plan:
        """The (cached) plan of ``split`` ("val" and "test" share one)."""
        key = ("train" if split == "train" else "test", fold)
        if key not in self._plans:
            folds.check_fold(fold, self.num_folds)
            self.check_layout()
            self._plans[key] = self._plan(key[0], fold)
        return self._plans[key]

    def transform(self, split: str, semantic: bool = False) -> ImageTransform:
        augmentation = None
        if split == "train" and semantic:
            augmentation = self.semantic_augmentation
        elif split == "train" and self.augment:
            augmentation = self.train_augmentation
            if augmentation is None:
                from fss.data.augment import hdmnet_train_augmentation

                augmentation = hdmnet_train_augmentation(self.AUGMENT_SCALE, self.image_size)
        return ImageTransform(
            size=(self.image_size, self.image_size),
            antialias=self.family == "hsnet",
            augmentation=augmentation,
        )

    def default_episodes(self, split: str, fold: int) -> int | None:
        if split == "train":
            return len(self.plan("train", fold).queries)
        if split == "val":
            return self.VAL_EPISODES
        return self.TEST_EPISODES[self.family]

    def episodic(
        self, split: str, fold: int, shot: int, num_episodes: int, seed: int, epoch: int = 0
    ) -> ListEpisodicDataset:
        from fss.data.episodes import check_split

        check_split(split)
        plan = self.plan(split, fold)
        draws = None
        if split == "test" and self.episodes == "official":
            draws = self.official_draws(plan, fold, shot, num_episodes, seed)
        elif split != "train" and self.family == "hsnet":
            check_enough_supports(plan, shot, f"{self.name} {split} fold {fold}")
        return ListEpisodicDataset(
            plan,
            read_mask=self._read_mask,
            transform=self.transform(split),
            shot=shot,
            num_episodes=num_episodes,
            seed=seed,
            epoch=epoch,
            augment=split == "train" and self.augment,
            keep_original=split != "train",
            name=f"{self.name} {split} fold {fold}",
            draws=draws,
            ignore_boundary=self.ignore_boundary or split == "train",
        )

    def official_draws(
        self, plan: Plan, fold: int, shot: int, num_episodes: int, seed: int
    ) -> list[tuple[int, int, list[int]]]:
        """The official test script's first ``num_episodes`` episodes (``fss.data.official``)
        as ``(class, query record, support records)`` of ``plan``."""
        raise ConfigError(f"data.episodes=official is not available for {self.name}")

    def class_episodic(
        self, classes: Sequence[int], shot: int, num_episodes: int, seed: int
    ) -> ListEpisodicDataset:
        """Test episodes of the given classes instead of a fold's novel ones (cross-dataset
        testing, e.g. COCO-20i -> PASCAL-5i): the test split's images, the protocol's
        transform, episodes as for ``episodic("test", ...)``."""
        if self.episodes == "official":
            raise ConfigError("data.episodes=official replays a fold's official test stream; "
                              "testing on another dataset's classes draws seeded episodes only: "
                              "use data.episodes=seeded")
        classes = sorted({int(c) for c in classes})
        if not classes or not all(0 <= c < self.num_classes for c in classes):
            raise ConfigError(f"test classes {classes} of {self.name} must be a non-empty "
                              f"subset of 0..{self.num_classes - 1}")
        key = ("classes", tuple(classes))
        if key not in self._plans:
            self.check_layout()
            self._plans[key] = self._class_plan(classes)
        return ListEpisodicDataset(
            self._plans[key],
            read_mask=self._read_mask,
            transform=self.transform("test"),
            shot=shot,
            num_episodes=num_episodes,
            seed=seed,
            keep_original=True,
            name=f"{self.name} test classes {classes}",
            ignore_boundary=self.ignore_boundary,
        )

    def semantic(
        self, split: str, fold: int, num_images: int | None, seed: int, epoch: int = 0
    ) -> ListSemanticDataset:
        from fss.data.episodes import check_split

        check_split(split, ("train", "val"))
        folds.check_fold(fold, self.num_folds)
        self.check_layout()
        return ListSemanticDataset(
            self._semantic_records(split, fold),
            read_label=self._read_label,
            transform=self.transform(split, semantic=True),
            fold=fold,
            num_classes=self.num_classes,
            num_images=num_images,
            seed=seed,
            epoch=epoch,
            fold_scheme=self.fold_scheme,
            shuffle=split == "train",
            name=f"{self.name} base-class {split} fold {fold}",
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root='{self.root}', protocol={self.protocol!r}, "
                f"image_size={self.image_size}, fold_scheme={self.fold_scheme!r})")


def check_enough_supports(plan: Plan, shot: int, where: str) -> None:
    """ConfigError when a class of an HSNet-protocol plan (every query asks for its one
    class) has fewer than ``shot`` images besides the query."""
    asked = {c for _, candidates in plan.queries for c in candidates} or set(plan.classes)
    for class_id in sorted(asked):
        images = len(set(plan.pools.get(class_id, ())))
        if images - 1 < shot:
            raise ConfigError(f"shot={shot}: {where} has {images} image(s) of class {class_id}, "
                              f"so at most {max(images - 1, 0)} support(s) besides the query; "
                              "lower shot")


def draws_to_records(
    plan: Plan, draws: Sequence[tuple[int, str, Sequence[str]]], where: str
) -> list[tuple[int, int, list[int]]]:
    """Named draws ``(class, query, supports)`` -> ``(class, query record, support
    records)`` of ``plan`` (by :attr:`Record.id`); DataError naming a missing image."""
    index = {record.id: i for i, record in enumerate(plan.records)}
    result = []
    for class_id, query, supports in draws:
        missing = [n for n in (query, *supports) if n not in index]
        if missing:
            raise DataError(f"{where}: the official episode names {missing[0]!r}, which is not "
                            "among the images of the lists on disk; re-run the prepare command")
        result.append((int(class_id), index[query], [index[n] for n in supports]))
    return result


def pools_from_queries(
    queries: Sequence[tuple[int, tuple[int, ...]]], classes: Sequence[int]
) -> dict[int, list[int]]:
    """class -> record indices of the queries listing it (HSNet: supports come from the
    same list as the queries)."""
    pools: dict[int, list[int]] = {c: [] for c in classes}
    seen: dict[int, set[int]] = {c: set() for c in classes}
    for record_index, candidates in queries:
        for c in candidates:
            if c in pools and record_index not in seen[c]:
                seen[c].add(record_index)
                pools[c].append(record_index)
    return pools


class RecordTable:
    """Deduplicating record store: the same image is one record however often it is listed."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._index: dict[tuple[str, str, int | None], int] = {}

    def add(self, image: Path, label: Path, class_id: int | None = None,
            name: str | None = None) -> int:
        key = (str(image), str(label), class_id)
        if key not in self._index:
            self._index[key] = len(self.records)
            self.records.append(Record(Path(image), Path(label), class_id, name))
        return self._index[key]


def plan_from_fold_lists(
    data_list: Sequence[tuple[str, str, tuple[int, ...]]],
    sub_class: Mapping[int, Sequence[tuple[str, str]]],
    folder: Path,
    order: str,
) -> Plan:
    """A :class:`Plan` from PFENet-protocol lists (paths relative to ``folder``)."""
    table = RecordTable()
    queries = [(table.add(folder / i, folder / lb, name=i), tuple(c)) for i, lb, c in data_list]
    pools = {c: [table.add(folder / i, folder / lb, name=i) for i, lb in items]
             for c, items in sub_class.items()}
    return Plan(table.records, queries, pools, order, sorted(sub_class))
