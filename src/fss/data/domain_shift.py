"""Cross-dataset few-shot segmentation: train on one dataset's fold, test on another
dataset's classes that the training fold never saw (HSNet's domain-shift experiment,
COCO-20i -> PASCAL-5i, the protocol of RePRI, Boudiaf et al., CVPR 2021).

Fold ``i`` trains (and validates) on the training source's fold ``i`` as usual; its test
episodes are the test source's classes whose counterpart is NOT among the training fold's
base classes. Classes are matched by name. With COCO-20i's interleaved folds this gives
RePRI's PASCAL folds (0-based PASCAL ids):

- fold 0: aeroplane, boat, chair, diningtable, dog, person
- fold 1: bicycle, bus, horse, sofa
- fold 2: bird, car, pottedplant, sheep, train, tvmonitor
- fold 3: bottle, cat, cow, motorbike
"""

from __future__ import annotations

from collections.abc import Mapping

from fss.data.episodes import EpisodicDataset, FewShotSource, SemanticDataset, check_split
from fss.data.real import RealSource
from fss.utils.errors import ConfigError

# PASCAL VOC name -> COCO name, where they differ.
PASCAL_TO_COCO = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}


def class_correspondence(
    test_names: list[str], train_names: list[str], aliases: Mapping[str, str]
) -> dict[int, int]:
    """Test class id -> training class id of the same name (``aliases`` renames test names).

    Every test class must exist in the training dataset: a test class without counterpart
    could never be told apart from the training classes it resembles.
    """
    index = {name: i for i, name in enumerate(train_names)}
    mapping, missing = {}, []
    for test_id, name in enumerate(test_names):
        train_name = aliases.get(name, name)
        if train_name in index:
            mapping[test_id] = index[train_name]
        else:
            missing.append(name)
    if missing:
        raise ConfigError(f"test classes {missing} have no class of that name in the training "
                          "dataset; give their names in the domain-shift source's aliases")
    return mapping


class DomainShiftSource(FewShotSource):
    """Train / validate on ``train``'s fold, test on ``test``'s classes unseen in that fold.

    Args:
        train: the training dataset (e.g. :class:`~fss.data.CocoSource`); its fold
            defines base classes, training and validation episodes and base-class images.
        test: the test dataset (e.g. :class:`~fss.data.PascalSource`, hsnet protocol: the
            pairs of its four ``val`` lists); its protocol sets the test episode count and
            where predictions are scored.
        aliases: test class name -> training class name where they differ (default: PASCAL
            VOC -> COCO).

    Class ids of test episodes (``novel_classes``) are the test dataset's; those of
    training and validation episodes (``base_classes``, ``val_classes``) the training
    dataset's.
    """

    def __init__(
        self, train: FewShotSource, test: RealSource, aliases: Mapping[str, str] | None = None
    ) -> None:
        if not isinstance(test, RealSource):
            raise ConfigError(f"the domain-shift test source must be an on-disk dataset "
                              f"(PascalSource), got {type(test).__name__}")
        if train.eval_resolution != test.eval_resolution:
            raise ConfigError(
                f"{train.name} scores at {train.eval_resolution!r} resolution and {test.name} "
                f"at {test.eval_resolution!r}; use the same protocol for both"
            )
        self.train = train
        self.test = test
        self.correspondence = class_correspondence(
            list(test.class_names), list(train.class_names),
            PASCAL_TO_COCO if aliases is None else aliases,
        )
        self.name = f"{train.name}->{test.name}"
        self.num_classes = test.num_classes
        self.class_names = test.class_names
        self.fold_scheme = train.fold_scheme
        self.num_folds = train.num_folds
        self.image_size = test.image_size
        self.eval_resolution = test.eval_resolution

    def novel_classes(self, fold: int) -> list[int]:
        """Test-dataset classes whose counterpart is not a base class of the training fold."""
        seen = set(self.train.base_classes(fold))
        return [c for c, train_class in sorted(self.correspondence.items())
                if train_class not in seen]

    def base_classes(self, fold: int) -> list[int]:
        return self.train.base_classes(fold)

    def val_classes(self, fold: int) -> list[int]:
        """Validation stays on the training dataset's novel classes (model selection must
        not see the test domain)."""
        return self.train.val_classes(fold)

    def default_episodes(self, split: str, fold: int) -> int | None:
        if split == "test":
            return self.test.default_episodes("test", fold)
        return self.train.default_episodes(split, fold)

    def episodic(
        self, split: str, fold: int, shot: int, num_episodes: int, seed: int, epoch: int = 0
    ) -> EpisodicDataset:
        check_split(split)
        if split != "test":
            return self.train.episodic(split, fold, shot, num_episodes, seed, epoch)
        return self.test.class_episodic(self.novel_classes(fold), shot, num_episodes, seed)

    def semantic(
        self, split: str, fold: int, num_images: int | None, seed: int, epoch: int = 0
    ) -> SemanticDataset:
        return self.train.semantic(split, fold, num_images, seed, epoch)

    def __repr__(self) -> str:
        return f"DomainShiftSource(train={self.train!r}, test={self.test!r})"
