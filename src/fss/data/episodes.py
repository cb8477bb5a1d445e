"""Dataset-agnostic pieces: episodic and semantic dataset bases, and the source interface.

Reproducibility rule: item ``i`` of a dataset is built from
``np.random.default_rng((seed, epoch, i))`` and nothing else (no global RNG, no worker
state), so it is the same for any ``num_workers``, batch size, sampler order or number of
devices. Subclasses implement only the sampling (``sample_episode`` / ``sample``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from fss.data import folds
from fss.data.transforms import IGNORE_INDEX, image_to_tensor

SPLITS = ("train", "val", "test")


def check_split(split: str, accepted: Sequence[str] = SPLITS) -> str:
    if split not in accepted:
        raise ValueError(f"split must be one of {', '.join(accepted)}, got {split!r}")
    return split


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_non_negative(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` (the only randomness an item may use)."""
    return np.random.default_rng((seed, epoch, index))


def episode_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """Semantic label map (0 bg, ``c + 1``, 255) -> uint8 {0, 1, 255} mask of ``class_id``."""
    mask = (label == class_id + 1).astype(np.uint8)
    mask[label == IGNORE_INDEX] = IGNORE_INDEX
    return mask


@dataclass
class Episode:
    """One episode as numpy arrays, before conversion to the batch contract.

    query_image:    (H, W, 3) uint8 RGB.
    query_mask:     (H, W) uint8, 1 = episode class, 0 = other, 255 = ignore.
    support_images: K arrays (H, W, 3) uint8 (never the query image).
    support_masks:  K arrays (H, W) uint8 {0, 1, 255}.
    query_mask_orig: optional (H0, W0) uint8 {0, 1, 255}, the query mask at the original
                    label resolution (real datasets' val/test episodes), for scoring there.
    query_id:       the query image as the dataset's lists name it (synthetic scenes: their
                    seed), recorded in ``episodes.csv``.
    support_ids:    the supports' ids in draw order.
    """

    class_id: int
    query_image: np.ndarray
    query_mask: np.ndarray
    support_images: Sequence[np.ndarray]
    support_masks: Sequence[np.ndarray]
    query_mask_orig: np.ndarray | None = None
    query_id: str = ""
    support_ids: Sequence[str] = ()


# Separator of the support ids in episodes.csv.
ID_SEPARATOR = ";"


def episode_to_tensors(episode: Episode, index: int) -> dict[str, torch.Tensor]:
    """Episode -> the episode dict of ``docs/architecture.md``."""
    support_masks = np.stack(episode.support_masks)  # (K, H, W) uint8
    item = {
        "query_img": image_to_tensor(episode.query_image),
        "query_mask": torch.from_numpy(episode.query_mask.astype(np.int64)),
        "support_imgs": torch.stack([image_to_tensor(img) for img in episode.support_images]),
        "support_masks": torch.from_numpy((support_masks == 1).astype(np.float32)),
        "support_ignore": torch.from_numpy(support_masks == IGNORE_INDEX),
        "class_id": torch.tensor(episode.class_id, dtype=torch.int64),
        "episode_index": torch.tensor(index, dtype=torch.int64),
    }
    if episode.query_mask_orig is not None:
        item["query_mask_orig"] = torch.from_numpy(episode.query_mask_orig.astype(np.int64))
        item["query_size_orig"] = torch.tensor(episode.query_mask_orig.shape, dtype=torch.int64)
    return item


# Keys whose tensors differ in size between the items of one batch.
VARIABLE_SIZE_KEYS = ("query_mask_orig",)


def collate_episodes(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate``, except that ``query_mask_orig`` maps of different sizes are
    padded with 255 (ignore) at the bottom/right to the largest of the batch; the true size
    of item ``b`` is ``query_size_orig[b]``. Batches without that key collate as usual."""
    variable = [key for key in VARIABLE_SIZE_KEYS if key in items[0]]
    if not variable:
        return default_collate(list(items))
    batch = default_collate([{k: v for k, v in item.items() if k not in variable}
                             for item in items])
    for key in variable:
        maps = [item[key] for item in items]
        height = max(m.shape[-2] for m in maps)
        width = max(m.shape[-1] for m in maps)
        padded = maps[0].new_full((len(maps), height, width), IGNORE_INDEX)
        for slot, mask in enumerate(maps):
            padded[slot, : mask.shape[-2], : mask.shape[-1]] = mask
        batch[key] = padded
    return batch


def _follow_epoch(dataset: EpisodicDataset | SemanticDataset, key: int | tuple[int, int]) -> int:
    """The index of ``key``; a key ``(epoch, index)`` first moves ``dataset`` to that epoch
    (``set_epoch``, so epoch-level state such as a shuffled order follows)."""
    if isinstance(key, tuple):
        epoch, index = key
        if int(epoch) != dataset.epoch:
            dataset.set_epoch(int(epoch))
        return int(index)
    return int(key)


class EpisodicDataset(Dataset, ABC):
    """``num_episodes`` K-shot episodes; episode ``i`` is a pure function of ``(seed, epoch, i)``.

    Returns the episode dict of ``docs/architecture.md``: ``query_img`` (3, H, W) float32,
    ``query_mask`` (H, W) int64 {0, 1, 255}, ``support_imgs`` (K, 3, H, W) float32,
    ``support_masks`` (K, H, W) float32 {0, 1}, ``support_ignore`` (K, H, W) bool,
    ``class_id`` () int64, ``episode_index`` () int64.

    Subclasses implement :meth:`sample_episode`; the epoch lets training episodes change
    every epoch: a key ``(epoch, i)`` (what :class:`~fss.data.datamodule.EpochSampler`
    yields) gives episode ``i`` of that epoch, a plain ``i`` episode ``i`` of
    ``self.epoch`` (the constructor's, or :meth:`set_epoch`).
    """

    def __init__(self, shot: int, num_episodes: int, seed: int, epoch: int = 0):
        self.shot = check_positive("shot", shot)
        self.num_episodes = check_positive("num_episodes", num_episodes)
        self.seed = check_non_negative("seed", seed)
        self.epoch = check_non_negative("epoch", epoch)

    def __len__(self) -> int:
        return self.num_episodes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_non_negative("epoch", epoch)

    @abstractmethod
    def sample_episode(self, rng: np.random.Generator, index: int) -> Episode:
        """Build episode ``index`` using ``rng`` as the only source of randomness.

        Must return ``self.shot`` supports, none of them the query.
        """

    def episode_ids(self, index: int) -> tuple[str, list[str]]:
        """The query's and the supports' ids of episode ``index`` (of ``self.epoch``), as
        :attr:`Episode.query_id` / ``support_ids`` name them. This default builds the whole
        episode; datasets that can draw an episode without loading it override it."""
        episode = self.sample_episode(item_rng(self.seed, self.epoch, index), index)
        return episode.query_id, list(episode.support_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = _follow_epoch(self, key)
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode index {index} out of range 0..{self.num_episodes - 1}")
        episode = self.sample_episode(item_rng(self.seed, self.epoch, index), index)
        if len(episode.support_images) != self.shot or len(episode.support_masks) != self.shot:
            raise RuntimeError(
                f"{type(self).__name__}.sample_episode returned {len(episode.support_images)} "
                f"supports for a {self.shot}-shot episode"
            )
        return episode_to_tensors(episode, index)


def base_label_lut(
    fold: int, num_classes: int, num_folds: int = 4, scheme: str = "contiguous"
) -> np.ndarray:
    """(256,) uint8 table: dataset label (0, ``c + 1``, 255) -> base-class label.

    0 (background) and every novel class -> 0; the j-th base class of the fold (order of
    ``folds.base_classes``) -> ``j + 1``; 255 -> 255.
    """
    if num_classes >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} classes fit a uint8 label map")
    lut = np.zeros(256, dtype=np.uint8)
    for j, class_id in enumerate(folds.base_classes(fold, num_classes, num_folds, scheme)):
        lut[class_id + 1] = j + 1
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


class SemanticDataset(Dataset, ABC):
    """Images labelled for base-class segmentation (backbone / base-learner pretraining).

    Item ``i`` is ``{"image": (3, H, W) float32, "label": (H, W) int64}``, with label
    0 = background and every novel class, ``j + 1`` for the j-th base class of the fold
    (order of ``folds.base_classes``), 255 = ignore. It is a pure function of
    ``(seed, epoch, i)``. Subclasses implement :meth:`sample`, returning the dataset's own
    label map; the remapping to base-class labels happens here.
    """

    def __init__(
        self,
        fold: int,
        num_classes: int,
        num_images: int,
        seed: int,
        epoch: int = 0,
        fold_scheme: str = "contiguous",
        num_folds: int = 4,
    ):
        self.fold = folds.check_fold(fold, num_folds)
        self.num_classes = num_classes
        self.num_images = check_positive("num_images", num_images)
        self.seed = check_non_negative("seed", seed)
        self.epoch = check_non_negative("epoch", epoch)
        self.base_classes = folds.base_classes(fold, num_classes, num_folds, fold_scheme)
        self.novel_classes = folds.novel_classes(fold, num_classes, num_folds, fold_scheme)
        self.lut = base_label_lut(fold, num_classes, num_folds, fold_scheme)

    @property
    def num_labels(self) -> int:
        """Number of output channels of a base-class segmenter: background + base classes."""
        return len(self.base_classes) + 1

    def __len__(self) -> int:
        return self.num_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_non_negative("epoch", epoch)

    @abstractmethod
    def sample(self, rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index``: (H, W, 3) uint8 RGB and its (H, W) uint8 dataset label map
        (0 background, ``c + 1`` for class ``c``, 255 ignore), using only ``rng``."""

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Image ``key`` of ``self.epoch``, or ``key = (epoch, index)`` (see EpisodicDataset)."""
        index = _follow_epoch(self, key)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range 0..{self.num_images - 1}")
        image, label = self.sample(item_rng(self.seed, self.epoch, index), index)
        return {
            "image": image_to_tensor(image),
            "label": torch.from_numpy(self.lut[label].astype(np.int64)),
        }


class FewShotSource(ABC):
    """A few-shot dataset (synthetic, PASCAL-5i, COCO-20i, FSS-1000...) as the DataModules see it.

    Attributes (set by implementations):
        name:        short identifier, e.g. ``"pascal5i"``.
        num_classes: number of object classes (0-based ids ``0..num_classes - 1``).
        class_names: ``num_classes`` names, in class-id order.
        fold_scheme: ``"contiguous"`` or ``"interleaved"`` (see ``fss.data.folds``).
        num_folds:   number of cross-validation folds (4 for PASCAL-5i / COCO-20i).
        image_size:  side (int) or (H, W) of the images the datasets return.
        eval_resolution: where the protocol scores predictions: ``"network"`` (at
                     ``image_size``) or ``"original"`` (at the label's own size; val/test
                     episodes then carry ``query_mask_orig``).

    Splits of :meth:`episodic`: ``"train"`` (episodes of base classes, no novel class in
    any image), ``"val"`` and ``"test"`` (episodes of the fold's novel classes). The
    caller gives val and test different seeds when they draw from the same images.
    """

    name: str
    num_classes: int
    class_names: Sequence[str]
    fold_scheme: str = "contiguous"
    num_folds: int = 4
    image_size: int | tuple[int, int]
    eval_resolution: str = "network"

    def novel_classes(self, fold: int) -> list[int]:
        """0-based ids of the classes tested in ``fold``."""
        return folds.novel_classes(fold, self.num_classes, self.num_folds, self.fold_scheme)

    def base_classes(self, fold: int) -> list[int]:
        """0-based ids of the classes trained on in ``fold``."""
        return folds.base_classes(fold, self.num_classes, self.num_folds, self.fold_scheme)

    def val_classes(self, fold: int) -> list[int]:
        """0-based ids of the classes of ``"val"`` episodes (the novel ones, unless the
        dataset has a separate validation class split, like FSS-1000)."""
        return self.novel_classes(fold)

    def default_episodes(self, split: str, fold: int) -> int | None:
        """The protocol's number of episodes of ``split`` (e.g. 1000 test episodes), used
        when the DataModule is given ``None``; ``None`` if the source has no such number."""
        return None

    @abstractmethod
    def episodic(
        self,
        split: str,
        fold: int,
        shot: int,
        num_episodes: int,
        seed: int,
        epoch: int = 0,
    ) -> EpisodicDataset:
        """``num_episodes`` ``shot``-shot episodes of ``split`` for ``fold``.

        Episode ``i`` must depend only on ``(seed, epoch, i)`` (see :class:`EpisodicDataset`).
        """

    @abstractmethod
    def semantic(
        self,
        split: str,
        fold: int,
        num_images: int | None,
        seed: int,
        epoch: int = 0,
    ) -> SemanticDataset:
        """Base-class segmentation images of ``split`` (``"train"`` or ``"val"``) for ``fold``.

        ``num_images=None`` means every image of the split (sources with a fixed size).
        Training images must contain no novel class of the fold.
        """
