"""Datasets and DataModules: folds, transforms, episodes, the synthetic benchmark."""

from fss.data.datamodule import FewShotDataModule, SemanticDataModule
from fss.data.episodes import (
    Episode,
    EpisodicDataset,
    FewShotSource,
    SemanticDataset,
    base_label_lut,
    episode_mask,
)
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
    "Episode",
    "EpisodicDataset",
    "FewShotDataModule",
    "FewShotSource",
    "Scene",
    "SceneGenerator",
    "SemanticDataModule",
    "SemanticDataset",
    "SyntheticEpisodicDataset",
    "SyntheticSemanticDataset",
    "SyntheticSource",
    "base_label_lut",
    "denormalize",
    "episode_mask",
    "image_to_tensor",
]
