"""Lightning DataModules over a :class:`~fss.data.episodes.FewShotSource`.

Seeds (all episodes and images are pure functions of ``(seed, epoch, index)``):

- training episodes / images: ``seed``, with the trainer's current epoch (new ones every
  epoch). The training loader is built once: its :class:`EpochSampler` yields
  ``(epoch, index)`` keys and Lightning calls its ``set_epoch`` at the start of every
  epoch, so workers can stay alive between epochs (``persistent_workers``) and still
  produce the new epoch's items;
- resuming: a checkpoint stores the training position (the next epoch and the batches of
  it already trained, :meth:`FewShotDataModule.state_dict`); the resumed run's loader starts
  exactly there. Lightning creates the first training iterator of a resumed fit before it
  calls ``set_epoch``, so the position must be in the sampler when the loader is built;
- validation: ``val_seed`` (default ``seed + 1``), epoch 0, the same every epoch;
- test: ``test_seed`` (default ``seed + 2``), epoch 0. Pin ``test_seed`` to compare
  runs of different training seeds on identical test episodes.

Loaders never shuffle (every index is already a random draw), so the episodes are the same
for any number of workers and devices. Under DDP the DataModule shards the indices itself
(the ``ddp`` trainer config sets ``use_distributed_sampler: false``): training with
``DistributedSampler(shuffle=False)``, validation/test with :class:`EvalShardSampler`, which
never pads — Lightning's default sampler would repeat episodes to even out the ranks and
the summed metric would count them twice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning as L
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from fss.data import folds
from fss.data.episodes import (
    FewShotSource,
    check_non_negative,
    check_positive,
    collate_episodes,
)


class EvalShardSampler(Sampler[int]):
    """Rank r of W gets indices r, r + W, r + 2W, ...: every episode exactly once overall."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[tuple[int, int]]):
    """Training keys ``(epoch, index)`` of rank ``rank`` of ``world_size``, in index order.

    Rank r gets indices r, r + W, r + 2W, ... of the list padded by wrapping around to a
    multiple of W (every rank must take the same number of steps under DDP), exactly the
    indices of ``DistributedSampler(shuffle=False)``. ``set_epoch`` (called by Lightning at
    the start of every training epoch, resumed runs included) changes the epoch of the keys;
    the datasets accept ``(epoch, index)`` keys (:class:`~fss.data.episodes.EpisodicDataset`).
    """

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start: int = 0):
        count = len(dataset)
        per_rank = -(-count // world_size)
        self.indices = [i % count for i in range(rank, per_rank * world_size, world_size)]
        self.epoch = check_non_negative("epoch", epoch)
        self.start = check_non_negative("start", start)

    def set_epoch(self, epoch: int) -> None:
        """Moves to ``epoch``; a new epoch starts at its first item (a resumed epoch keeps
        the items it skips: Lightning calls this again with the same epoch)."""
        epoch = check_non_negative("epoch", epoch)
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        # The rest of a resumed epoch; its length stays that of a whole epoch because
        # Lightning counts the batches already trained (batch_progress) towards it.
        return iter([(epoch, index) for index in self.indices[self.start:]])

    def __len__(self) -> int:
        return len(self.indices)


class TrainingPosition(NamedTuple):
    """Where training goes on: ``epoch`` and the ``batches`` of it already trained."""

    epoch: int
    batches: int

    @classmethod
    def of(cls, trainer: L.Trainer) -> TrainingPosition:
        """The position after what ``trainer`` has trained so far, read while a checkpoint
        is saved (after a training batch, at the end of validation or of an epoch)."""
        epoch = int(trainer.current_epoch)  # epochs completed before the current one
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if batches >= trainer.num_training_batches:
            return cls(epoch + 1, 0)
        return cls(epoch, batches)


class ResumableLoader(DataLoader):
    """A training DataLoader that tells Lightning it can resume mid-epoch (``state_dict`` /
    ``load_state_dict``): its state is the :class:`TrainingPosition` of the trainer."""

    def __init__(self, *args, datamodule: _SourceDataModule, **kwargs):
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def state_dict(self) -> dict[str, int]:
        return self._datamodule.training_position()._asdict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = TrainingPosition(**state)
        self.sampler.set_epoch(position.epoch)
        self.sampler.start = position.batches * int(self.batch_size)


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


# Episode seeds of the evaluation splits when not given: ``seed`` plus these offsets.
SEED_OFFSETS = {"val": 1, "test": 2}


def split_seed(split: str, seed: int, value: int | None = None) -> int:
    """The seed of ``split``'s episodes: ``value`` if given, else ``seed`` + its offset."""
    return seed + SEED_OFFSETS[split] if value is None else value


def _check_seed(name: str, value: int | None, default: int) -> int:
    return default if value is None else check_non_negative(name, value)


def _check_episodes(name: str, value: int | None) -> int | None:
    return None if value is None else check_positive(name, value)


class _SourceDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: FewShotSource,
        fold: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
    ):
        super().__init__()
        if not isinstance(source, FewShotSource):
            raise TypeError(f"source must be a FewShotSource, got {type(source).__name__}")
        self.source = source
        self.fold = folds.check_fold(fold, source.num_folds)
        self.num_workers = check_non_negative("num_workers", num_workers)
        self.pin_memory = bool(pin_memory)
        # Persistent workers need workers.
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self._resume_position: TrainingPosition | None = None

    @property
    def base_classes(self) -> list[int]:
        return self.source.base_classes(self.fold)

    @property
    def novel_classes(self) -> list[int]:
        return self.source.novel_classes(self.fold)

    @property
    def val_classes(self) -> list[int]:
        """Classes of the validation episodes (the novel ones, except for FSS-1000)."""
        return self.source.val_classes(self.fold)

    def training_position(self) -> TrainingPosition:
        """Where training stands while the trainer fits (the start of epoch 0 otherwise)."""
        return TrainingPosition.of(self.trainer) if self._fitting() else TrainingPosition(0, 0)

    def _loader_position(self) -> TrainingPosition:
        """Where a new training loader starts: the position restored from a checkpoint
        (once), else the start of the trainer's current epoch."""
        position, self._resume_position = self._resume_position, None
        if position is not None:
            return position
        return TrainingPosition(0 if self.trainer is None else int(self.trainer.current_epoch), 0)

    def _fitting(self) -> bool:
        # The whole of trainer.fit, its validation included (checkpoints are saved there).
        return self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint of a fit (Lightning calls it)."""
        if not self._fitting():
            return {}
        return {"training_position": TrainingPosition.of(self.trainer)._asdict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the resumed fit builds its training loader."""
        position = state_dict.get("training_position")
        self._resume_position = None if position is None else TrainingPosition(**position)

    def _loader(self, dataset: Dataset, batch_size: int, evaluation: bool = False) -> DataLoader:
        rank, world = _distributed() or (0, 1)
        options = dict(batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                       pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                       collate_fn=collate_episodes)
        if evaluation:
            sampler = EvalShardSampler(dataset, rank, world) if world > 1 else None
            return DataLoader(dataset, sampler=sampler, **options)
        position = self._loader_position()
        sampler = EpochSampler(dataset, rank, world, epoch=position.epoch,
                               start=position.batches * batch_size)
        return ResumableLoader(dataset, sampler=sampler, datamodule=self, **options)


class FewShotDataModule(_SourceDataModule):
    """Episodic train / val / test loaders for one fold of a few-shot source.

    Args:
        source: the dataset (e.g. ``SyntheticSource``).
        fold: 0..num_folds-1 (base classes train, novel classes val/test).
        shot: supports per episode at validation and test.
        train_shot: supports per training episode (default: ``shot``).
        batch_size: training episodes per batch.
        test_batch_size: episodes per validation / test batch.
        num_workers, pin_memory, persistent_workers: DataLoader options
            (``persistent_workers`` is ignored with 0 workers).
        train_episodes: training episodes per epoch (different every epoch).
        val_episodes, test_episodes: fixed validation / test episodes.
            ``None``: the source's protocol number (``source.default_episodes``), e.g.
            1000 test episodes on PASCAL-5i or one pass over the training list.
        seed, val_seed, test_seed: see the module docstring.

    Batches follow the episode contract of ``docs/architecture.md``.
    """

    def __init__(
        self,
        source: FewShotSource,
        fold: int = 0,
        shot: int = 1,
        train_shot: int | None = None,
        batch_size: int = 8,
        test_batch_size: int = 1,
        num_workers: int = 0,
        train_episodes: int | None = 1000,
        val_episodes: int | None = 300,
        test_episodes: int | None = 1000,
        seed: int = 0,
        val_seed: int | None = None,
        test_seed: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ):
        super().__init__(source, fold, num_workers, pin_memory, persistent_workers)
        self.shot = check_positive("shot", shot)
        self.train_shot = shot if train_shot is None else check_positive("train_shot", train_shot)
        self.batch_size = check_positive("batch_size", batch_size)
        self.test_batch_size = check_positive("test_batch_size", test_batch_size)
        self.train_episodes = _check_episodes("train_episodes", train_episodes)
        self.val_episodes = _check_episodes("val_episodes", val_episodes)
        self.test_episodes = _check_episodes("test_episodes", test_episodes)
        self.seed = check_non_negative("seed", seed)
        self.val_seed = _check_seed("val_seed", val_seed, split_seed("val", self.seed))
        self.test_seed = _check_seed("test_seed", test_seed, split_seed("test", self.seed))
        self.save_hyperparameters(ignore=["source"])

    def num_episodes(self, split: str) -> int:
        """Episodes of ``split``: the configured number, else the source's protocol one."""
        value = getattr(self, f"{split}_episodes")
        if value is None:
            value = self.source.default_episodes(split, self.fold)
            if value is None:
                raise ValueError(f"{split}_episodes is None and {type(self.source).__name__} "
                                 "has no default number of episodes: give an integer >= 1")
        return value

    def train_dataset(self, epoch: int = 0) -> Dataset:
        return self.source.episodic(
            "train", self.fold, self.train_shot, self.num_episodes("train"), self.seed, epoch
        )

    def val_dataset(self) -> Dataset:
        return self.source.episodic(
            "val", self.fold, self.shot, self.num_episodes("val"), self.val_seed
        )

    def test_dataset(self) -> Dataset:
        return self.source.episodic(
            "test", self.fold, self.shot, self.num_episodes("test"), self.test_seed
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), self.test_batch_size, evaluation=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), self.test_batch_size, evaluation=True)


class SemanticDataModule(_SourceDataModule):
    """Base-class segmentation loaders (backbone pretraining) for one fold.

    Batches: ``image`` (B, 3, H, W) float32 and ``label`` (B, H, W) int64 with 0 =
    background and novel classes, ``j + 1`` for the j-th base class, 255 ignore
    (``num_labels`` = number of base classes + 1). Training images change every epoch.

    Args:
        source, fold, num_workers, pin_memory, persistent_workers: as FewShotDataModule.
        batch_size: training images per batch.
        val_batch_size: validation images per batch (default: ``batch_size``).
        num_train_images: training images per epoch (``None``: the whole split, for
            sources of fixed size).
        num_val_images: validation images (``None``: the whole split).
        seed, val_seed: training images from ``seed``, validation from ``val_seed``
            (default ``seed + 1``).
    """

    def __init__(
        self,
        source: FewShotSource,
        fold: int = 0,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_train_images: int | None = 2000,
        num_val_images: int | None = 200,
        seed: int = 0,
        val_seed: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ):
        super().__init__(source, fold, num_workers, pin_memory, persistent_workers)
        self.batch_size = check_positive("batch_size", batch_size)
        self.val_batch_size = (
            self.batch_size
            if val_batch_size is None
            else check_positive("val_batch_size", val_batch_size)
        )
        self.num_train_images = (
            None
            if num_train_images is None
            else check_positive("num_train_images", num_train_images)
        )
        self.num_val_images = (
            None if num_val_images is None else check_positive("num_val_images", num_val_images)
        )
        self.seed = check_non_negative("seed", seed)
        self.val_seed = _check_seed("val_seed", val_seed, self.seed + 1)
        self.save_hyperparameters(ignore=["source"])

    @property
    def num_labels(self) -> int:
        """Output channels of a base-class segmenter: background + base classes."""
        return len(self.base_classes) + 1

    def train_dataset(self, epoch: int = 0) -> Dataset:
        return self.source.semantic("train", self.fold, self.num_train_images, self.seed, epoch)

    def val_dataset(self) -> Dataset:
        return self.source.semantic("val", self.fold, self.num_val_images, self.val_seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), self.val_batch_size, evaluation=True)
