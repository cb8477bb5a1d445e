"""Datasets and DataModules: folds, transforms, episodes, the synthetic benchmark and the
real benchmarks (PASCAL-5i, COCO-20i, FSS-1000)."""

from fss.data.coco import CocoSource
from fss.data.datamodule import FewShotDataModule, SemanticDataModule
from fss.data.domain_shift import DomainShiftSource
from fss.data.episodes import (
    Episode,
    EpisodicDataset,
    FewShotSource,
    SemanticDataset,
    base_label_lut,
    collate_episodes,
    episode_mask,
)
from fss.data.fss1000 import FSS1000Source
from fss.data.lists import ListStore
from fss.data.pascal import PascalSource
from fss.data.synthetic import (
    Scene,
    SceneGenerator,
    SyntheticEpisodicDataset,
    SyntheticSemanticDataset,
    SyntheticSource,
)
from fss.data.transforms import IGNORE_INDEX, denormalize, image_to_tensor

__all__ = [
    "IGNORE_INDEX",
    "CocoSource",
    "DomainShiftSource",
    "Episode",
    "EpisodicDataset",
    "FSS1000Source",
    "FewShotDataModule",
    "FewShotSource",
    "ListStore",
    "PascalSource",
    "Scene",
    "SceneGenerator",
    "SemanticDataModule",
    "SemanticDataset",
    "SyntheticEpisodicDataset",
    "SyntheticSemanticDataset",
    "SyntheticSource",
    "base_label_lut",
    "collate_episodes",
    "denormalize",
    "episode_mask",
    "image_to_tensor",
]
