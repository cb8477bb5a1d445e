"""The procedural generator: determinism, classes, labels, folds, base-class remapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fss.data import folds
from fss.data.episodes import base_label_lut, episode_mask
from fss.data.synthetic import (
    PALETTES,
    SHAPES,
    TEXTURES,
    SceneGenerator,
    SyntheticSource,
    class_specs,
    save_preview,
)
from fss.data.transforms import IGNORE_INDEX


@pytest.fixture(scope="module")
def generator() -> SceneGenerator:
    return SceneGenerator(image_size=96)


def test_same_seed_and_index_give_identical_scenes(generator):
    first = generator.scene(3, 7, target=4)
    second = generator.scene(3, 7, target=4)
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.label, second.label)
    assert first.classes == second.classes
    other_index = generator.scene(3, 8, target=4)
    other_seed = generator.scene(4, 7, target=4)
    assert not np.array_equal(first.image, other_index.image)
    assert not np.array_equal(first.image, other_seed.image)


def test_render_uses_only_the_given_rng(generator):
    np.random.seed(0)
    first = generator.render(np.random.default_rng(11))
    np.random.seed(1)
    second = generator.render(np.random.default_rng(11))
    assert np.array_equal(first.image, second.image)


def test_scene_arrays(generator):
    scene = generator.scene(0, 0)
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    assert scene.label.shape == (96, 96) and scene.label.dtype == np.uint8
    assert 1 <= len(scene.classes) <= 3


def test_classes_are_unique_attribute_combinations():
    specs = class_specs(20)
    triples = [(s.shape, s.texture, s.palette) for s in specs]
    assert len(set(triples)) == 20
    # No single attribute identifies a class ...
    for attribute, count in (
        ("shape", len(SHAPES)),
        ("texture", len(TEXTURES)),
        ("palette", len(PALETTES)),
    ):
        values = [getattr(s, attribute) for s in specs]
        assert sorted(set(values)) == list(range(count))
        assert all(values.count(v) >= 2 for v in set(values)), attribute
    # ... but any two classes differ in at least two attributes.
    for a, b in itertools.combinations(triples, 2):
        assert sum(x != y for x, y in zip(a, b, strict=True)) >= 2, (a, b)
    # Every fold uses each texture and each palette once.
    for fold in range(4):
        novel = [specs[c] for c in folds.novel_classes(fold, 20)]
        assert sorted(s.texture for s in novel) == list(range(5))
        assert sorted(s.palette for s in novel) == list(range(5))
    assert len(set(SyntheticSource().class_names)) == 20


def test_every_class_renders_visibly_with_valid_labels(generator):
    means = []
    for class_id in range(20):
        scene = generator.scene(1, class_id, target=class_id)
        assert class_id in scene.classes
        pixels = scene.label == class_id + 1
        assert pixels.mean() >= generator.min_target_fraction
        values = set(np.unique(scene.label).tolist())
        assert values <= set(range(21)) | {IGNORE_INDEX}
        assert IGNORE_INDEX in values  # boundary band
        assert values - {0, IGNORE_INDEX} == {c + 1 for c in scene.classes}
        means.append(scene.image[pixels].mean(axis=0))
    # Classes look different: mean colours of the 20 classes are not all alike.
    means = np.array(means)
    assert np.linalg.norm(means[:, None] - means[None], axis=2)[np.triu_indices(20, 1)].max() > 60


def test_boundaries_separate_objects_from_background(generator):
    for index in range(5):
        label = generator.scene(2, index).label
        # No object pixel touches a background pixel or another class directly.
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            touching = (a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not touching.any()
        band = (label == IGNORE_INDEX).mean()
        assert 0.0 < band < 0.15


@pytest.mark.parametrize(("level", "low", "high"), [("demo", 0.15, 0.26), ("hard", 0.06, 0.13)])
def test_target_size_per_level(level, low, high):
    generator = SceneGenerator(image_size=64, level=level)
    fractions = [
        np.mean(generator.scene(5, i, target=i % 20).label == i % 20 + 1) for i in range(60)
    ]
    assert low < np.mean(fractions) < high
    assert min(fractions) >= generator.min_target_fraction


def test_allowed_classes_are_respected(generator):
    for fold in range(4):
        base = folds.base_classes(fold, 20)
        allowed_labels = {0, IGNORE_INDEX} | {c + 1 for c in base}
        for index in range(8):
            scene = generator.scene(fold, index, target=base[index % len(base)], allowed=base)
            assert set(np.unique(scene.label).tolist()) <= allowed_labels
            assert set(scene.classes) <= set(base)


def test_training_scenes_of_the_source_hold_no_novel_class():
    source = SyntheticSource(image_size=64)
    for fold in range(4):
        novel_labels = {c + 1 for c in folds.novel_classes(fold, 20)}
        episodes = source.episodic("train", fold, shot=1, num_episodes=2, seed=0)
        assert set(episodes.scene_classes).isdisjoint(folds.novel_classes(fold, 20))
        semantic = source.semantic("train", fold, num_images=6, seed=0)
        for index in range(6):
            _, label = semantic.sample(np.random.default_rng((0, 0, index)), index)
            assert novel_labels.isdisjoint(np.unique(label).tolist())


def test_base_label_remapping():
    lut = base_label_lut(1, 20)
    base = folds.base_classes(1, 20)
    assert base[:5] == [0, 1, 2, 3, 4] and base[5] == 10
    assert lut[0] == 0 and lut[IGNORE_INDEX] == IGNORE_INDEX
    assert [lut[c + 1] for c in base] == list(range(1, 16))
    assert all(lut[c + 1] == 0 for c in folds.novel_classes(1, 20))

    generator = SceneGenerator(image_size=64)
    label = generator.scene(0, 0, target=6).label  # class 6 is novel in fold 1
    remapped = lut[label]
    assert np.all(remapped[label == 7] == 0)
    for j, c in enumerate(base):
        assert np.all(remapped[label == c + 1] == j + 1)
    assert np.array_equal(remapped == IGNORE_INDEX, label == IGNORE_INDEX)


def test_semantic_dataset_items():
    dataset = SyntheticSource(image_size=64).semantic("train", 2, num_images=4, seed=3)
    assert dataset.num_labels == 16
    item = dataset[1]
    assert item["image"].shape == (3, 64, 64) and item["label"].shape == (64, 64)
    values = set(item["label"].unique().tolist())
    assert values <= set(range(16)) | {IGNORE_INDEX}
    assert len(values - {0, IGNORE_INDEX}) >= 1
    again = SyntheticSource(image_size=64).semantic("train", 2, num_images=4, seed=3)[1]
    assert np.array_equal(item["label"].numpy(), again["label"].numpy())


def test_episode_mask():
    label = np.array([[0, 3, 255], [4, 3, 0]], dtype=np.uint8)
    assert episode_mask(label, 2).tolist() == [[0, 1, 255], [0, 1, 0]]


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="level must be one of demo, hard"):
        SceneGenerator(level="easy")
    with pytest.raises(ValueError, match="image_size must be an integer >= 32"):
        SceneGenerator(image_size=16)
    with pytest.raises(ValueError, match="num_classes must be a multiple of 4"):
        SceneGenerator(num_classes=21)
    with pytest.raises(ValueError, match="not among the allowed classes"):
        SceneGenerator(image_size=64).scene(0, 0, target=3, allowed=[5, 6])
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        SyntheticSource(image_size=64).episodic("dev", 0, 1, 1, 0)


def test_preview_grid(tmp_path):
    from PIL import Image

    path = save_preview(tmp_path / "preview.png", SceneGenerator(image_size=48), classes=range(4))
    assert Image.open(path).size[0] > 4 * 48


def test_instance_colour_mode_draws_colours_per_object():
    """colour=instance: a class keeps its shape and texture but not its colours."""
    import numpy as np

    from fss.data import SceneGenerator

    def target_colours(colour: str) -> np.ndarray:
        generator = SceneGenerator(image_size=64, colour=colour)
        means = []
        for index in range(12):
            scene = generator.scene(seed=3, index=index, target=7)
            means.append(scene.image[scene.label == 8].mean(0))
        return np.stack(means)

    spread_class = target_colours("class").std(0).mean()
    spread_instance = target_colours("instance").std(0).mean()
    assert spread_instance > 2 * spread_class, (spread_instance, spread_class)
    with pytest.raises(ValueError, match="colour must be one of instance, class"):
        SceneGenerator(colour="rainbow")
