"""data.episodes=official: HSNet's test episodes (PASCAL-5i, COCO-20i, FSS-1000; 1 and 5
shots) replayed draw for draw.

Three references, none of them the code under test:
- a re-implementation here of the documented generator-call sequence, written with
  ``RandomState.permutation`` (what ``choice(n, 1, replace=False)`` consumes), on the tiny
  trees and on the official lists in ../shared/data/official-lists when present;
- the official dataset classes of a juhongm999/hsnet checkout when ``FSS_OFFICIAL_HSNET``
  points to one (skipped otherwise);
- the episodes a run's datasets produce (``episode_ids``, class ids) on tiny real trees.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from fss.data import CocoSource, FSS1000Source, ListStore, PascalSource
from fss.data.lists import hsnet_coco_classwise, hsnet_pascal_pairs
from fss.data.official import hsnet_coco_stream, hsnet_fss_stream, hsnet_pascal_stream
from fss.prepare import main, tiny
from fss.utils.errors import ConfigError
from tests.helpers.config import OFFICIAL_LISTS
from tests.helpers.trees import prepared_pascal_tree

EPISODES = 200
OFFICIAL_HSNET = os.environ.get("FSS_OFFICIAL_HSNET")


# ------------------------------------------------------------ reference, written from docs
def first_of_permutation(rng: np.random.RandomState, population: list):
    return population[rng.permutation(len(population))[0]]


def reference_supports(rng, pool, query, shot):
    supports = []
    while len(supports) < shot:
        name = first_of_permutation(rng, pool)
        if name != query:
            supports.append(name)
    return supports


def reference_pascal(pairs, shot, count, seed=0):
    rng = np.random.RandomState(seed)
    episodes = []
    for index in range(count):
        query, class_id = pairs[index % len(pairs)]
        pool = [name for name, c in pairs if c == class_id]
        episodes.append((class_id, query, reference_supports(rng, pool, query, shot)))
    return episodes


def reference_coco(classwise, fold, shot, count, seed=0):
    rng = np.random.RandomState(seed)
    class_ids = [fold + 4 * v for v in range(20)]
    episodes = []
    for _ in range(count):
        class_id = first_of_permutation(rng, class_ids)
        query = first_of_permutation(rng, classwise[class_id])
        episodes.append((class_id, query,
                         reference_supports(rng, classwise[class_id], query, shot)))
    return episodes


def reference_fss(classes, shot, count, seed=0, offset=760):
    rng = np.random.RandomState(seed)
    queries = [(f"{name}/{file}", offset + c) for c, name in enumerate(sorted(classes))
               for file in sorted(f"{n}.jpg" for n in range(1, 11))]
    episodes = []
    for index in range(count):
        query, class_id = queries[index % len(queries)]
        supports = []
        while len(supports) < shot:
            name = f"{query.split('/')[0]}/{rng.permutation(10)[0] + 1}.jpg"
            if name != query:
                supports.append(name)
        episodes.append((class_id, query, supports))
    return episodes


# ------------------------------------------------------------------------- tiny trees
@pytest.fixture(scope="module")
def pascal_tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pascal")
    prepared_pascal_tree(folder)
    return folder


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    raw = tiny.make_coco_raw(folder / "raw", per_class=3)
    tiny.write_coco_lists(folder / "lists", raw)
    assert main(["coco", "--images", *map(str, raw.image_zips), "--annotations",
                 str(raw.annotation_zip), "--out", str(folder / "data"), "--workers", "1",
                 "--no-list-check"]) == 0
    return folder


FSS_NAMES = [f"class{i:02d}" for i in range(9)]


@pytest.fixture(scope="module")
def fss_tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fss")
    archive = tiny.make_fss_raw(folder / "raw", FSS_NAMES)
    tiny.write_fss_lists(folder / "lists", {"trn": FSS_NAMES[:3], "val": FSS_NAMES[3:6],
                                            "test": FSS_NAMES[6:]})
    assert main(["fss1000", "--zip", str(archive), "--out", str(folder / "data"),
                 "--no-list-check"]) == 0
    return folder


def store(folder: Path) -> ListStore:
    return ListStore(folder / "lists", folder / "cache", verify=False)


def dataset_episodes(dataset, count):
    return [(dataset[i]["class_id"].item(), *dataset.episode_ids(i)) for i in range(count)]


@pytest.mark.parametrize("shot", [1, 5])
def test_pascal_official_episodes_on_a_tiny_tree(pascal_tree, shot):
    source = PascalSource(pascal_tree / "data", image_size=32, lists=store(pascal_tree),
                          episodes="official")
    for fold in range(4):
        pairs = hsnet_pascal_pairs(source.lists, "val", fold)
        expected = reference_pascal(pairs, shot, EPISODES)
        assert hsnet_pascal_stream(pairs, shot, EPISODES) == expected
        dataset = source.episodic("test", fold, shot, EPISODES, seed=0)
        assert [dataset.episode_ids(i) for i in range(EPISODES)] == \
            [(q, s) for _, q, s in expected]
    # The loaded episodes carry the drawn class; a few are enough (images are loaded).
    assert dataset_episodes(dataset, 3) == [(c, q, s) for c, q, s in expected[:3]]


@pytest.mark.parametrize("shot", [1, 5])
def test_coco_official_episodes_on_a_tiny_tree(coco_tree, shot):
    source = CocoSource(coco_tree / "data", image_size=32, lists=store(coco_tree),
                        episodes="official")
    classwise = hsnet_coco_classwise(source.lists, "val", 1)
    expected = reference_coco(classwise, 1, shot, EPISODES)
    assert hsnet_coco_stream(classwise, source.novel_classes(1), shot, EPISODES) == expected
    dataset = source.episodic("test", 1, shot, EPISODES, seed=0)
    assert [dataset.episode_ids(i) for i in range(EPISODES)] == [(q, s) for _, q, s in expected]
    assert dataset_episodes(dataset, 3) == [(c, q, s) for c, q, s in expected[:3]]


@pytest.mark.parametrize("shot", [1, 5])
def test_fss1000_official_episodes_on_a_tiny_tree(fss_tree, shot):
    source = FSS1000Source(fss_tree / "data", image_size=32, lists=store(fss_tree),
                           episodes="official")
    expected = reference_fss(FSS_NAMES[6:], shot, 30)
    queries = [(f"{n}/{f}", 760 + c) for c, n in enumerate(FSS_NAMES[6:])
               for f in sorted(f"{k}.jpg" for k in range(1, 11))]
    assert hsnet_fss_stream(queries, shot, 30) == expected
    dataset = source.episodic("test", 0, shot, 30, seed=0)
    assert [dataset.episode_ids(i) for i in range(30)] == [(q, s) for _, q, s in expected]
    assert dataset_episodes(dataset, 2) == [(c, q, s) for c, q, s in expected[:2]]


def test_the_test_seed_is_the_official_generator_seed(pascal_tree):
    source = PascalSource(pascal_tree / "data", image_size=32, lists=store(pascal_tree),
                          episodes="official")
    pairs = hsnet_pascal_pairs(source.lists, "val", 0)
    dataset = source.episodic("test", 0, 1, 20, seed=7)
    assert [dataset.episode_ids(i) for i in range(20)] == \
        [(q, s) for _, q, s in reference_pascal(pairs, 1, 20, seed=7)]
    # Seeded episodes (the default) are another stream; validation episodes stay seeded.
    seeded = PascalSource(pascal_tree / "data", image_size=32, lists=store(pascal_tree))
    assert [seeded.episodic("test", 0, 1, 20, 7).episode_ids(i) for i in range(20)] != \
        [dataset.episode_ids(i) for i in range(20)]


def test_a_test_run_draws_the_official_episodes(compose_cfg, pascal_tree, tmp_path):
    from fss.metrics import episodes
    from fss.pipeline import run

    metrics = run(compose_cfg([
        "model=all_foreground", "mode=test", "backbone.weights=none", "data=pascal", "fold=2",
        "shot=5", f"paths.data_root={pascal_tree / 'data'}",
        f"data.lists_dir={pascal_tree / 'lists'}", "data.lists_verify=false",
        "data.image_size=32", "data.module.num_workers=0", "data.module.pin_memory=false",
        "data.module.test_episodes=12", "data.module.test_batch_size=5", "logger=none",
        "callbacks=none", "data.episodes=official"]))
    rows = episodes.read(tmp_path / "episodes.csv")
    pairs = hsnet_pascal_pairs(store(pascal_tree), "val", 2)
    expected = reference_pascal(pairs, 5, 12)
    assert [(r["class"], r["query"], r["supports"].split(";")) for r in rows] == expected
    assert metrics["protocol"]["episodes"] == "official" and metrics["test_seed"] == 0


# --------------------------------------------------------------- official lists (shared)
needs_lists = pytest.mark.skipif(not (OFFICIAL_LISTS / "hsnet").is_dir(),
                                 reason="../shared/data/official-lists not present")


@needs_lists
@pytest.mark.parametrize("shot", [1, 5])
def test_pascal_stream_on_the_official_lists(shot):
    lists = ListStore(OFFICIAL_LISTS, OFFICIAL_LISTS / "cache", verify=False)
    for fold in range(4):
        pairs = hsnet_pascal_pairs(lists, "val", fold)
        assert hsnet_pascal_stream(pairs, shot, EPISODES) == reference_pascal(pairs, shot, EPISODES)


@needs_lists
@pytest.mark.parametrize("shot", [1, 5])
def test_coco_stream_on_the_official_lists(shot):
    for fold in range(4):
        with (OFFICIAL_LISTS / "hsnet" / "coco" / "val" / f"fold{fold}.pkl").open("rb") as f:
            classwise = pickle.load(f)  # the repository's own reference file
        class_ids = [fold + 4 * v for v in range(20)]
        assert hsnet_coco_stream(classwise, class_ids, shot, EPISODES) == \
            reference_coco(classwise, fold, shot, EPISODES)


@needs_lists
@pytest.mark.parametrize("shot", [1, 5])
def test_fss_stream_on_the_official_lists(shot):
    classes = (OFFICIAL_LISTS / "hsnet" / "fss" / "test.txt").read_text().split("\n")[:-1]
    expected = reference_fss(classes, shot, EPISODES)
    queries = [(q, c) for c, q, _ in reference_fss(classes, 1, len(classes) * 10)]
    assert hsnet_fss_stream(queries, shot, EPISODES) == expected


# ------------------------------------------------------------ official checkout (optional)
needs_checkout = pytest.mark.skipif(
    not OFFICIAL_HSNET or not (Path(OFFICIAL_HSNET or ".") / "data" / "pascal.py").is_file(),
    reason="FSS_OFFICIAL_HSNET does not point to a juhongm999/hsnet checkout")


@pytest.fixture
def official(monkeypatch):
    """The checkout's ``data`` package, imported with the checkout as working directory."""
    root = Path(OFFICIAL_HSNET).resolve()
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    for name in [n for n in sys.modules if n == "data" or n.startswith("data.")]:
        monkeypatch.delitem(sys.modules, name)
    yield lambda module: importlib.import_module(f"data.{module}")
    for name in [n for n in sys.modules if n == "data" or n.startswith("data.")]:
        del sys.modules[name]


@needs_checkout
@pytest.mark.parametrize("shot", [1, 5])
def test_pascal_equals_the_official_dataset(official, shot):
    module = official("pascal")
    for fold in range(4):
        dataset = module.DatasetPASCAL("unused", fold, None, "test", shot, False)
        np.random.seed(0)  # what test.py's fix_randseed(0) does to numpy
        drawn = [dataset.sample_episode(i % len(dataset.img_metadata)) for i in range(EPISODES)]
        official_episodes = [(int(c), q, list(s)) for q, s, c in drawn]
        ours = hsnet_pascal_stream(_pascal_pairs(fold), shot, EPISODES)
        assert ours == official_episodes


def _pascal_pairs(fold):
    path = Path(OFFICIAL_HSNET) / "data" / "splits" / "pascal" / "val" / f"fold{fold}.txt"
    lines = path.read_text().split("\n")[:-1]
    return [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines]


@needs_checkout
@pytest.mark.parametrize("shot", [1, 5])
def test_coco_equals_the_official_dataset(official, monkeypatch, shot):
    import torch

    module = official("coco")

    class Picture:  # what load_frame needs of an opened image
        size = (4, 4)

        def convert(self, mode):
            return self

    monkeypatch.setattr(module.Image, "open", lambda *args, **kwargs: Picture())
    for fold in (0, 3):
        dataset = module.DatasetCOCO("unused", fold, None, "test", shot, False)
        dataset.read_mask = lambda name: torch.zeros(4, 4, dtype=torch.uint8)
        np.random.seed(0)
        official_episodes = []
        for _ in range(EPISODES):
            frame = dataset.load_frame()
            official_episodes.append((int(frame[6]), frame[4], list(frame[5])))
        ours = hsnet_coco_stream(dataset.img_metadata_classwise, dataset.class_ids, shot,
                                 EPISODES)
        assert ours == official_episodes


@needs_checkout
@pytest.mark.parametrize("shot", [1, 5])
def test_fss_equals_the_official_dataset(official, tmp_path, shot):
    module = official("fss")
    classes = Path("data/splits/fss/test.txt").read_text().split("\n")[:-1]
    for name in sorted(classes)[:EPISODES // 10 + 1]:
        folder = tmp_path / "FSS-1000" / name
        folder.mkdir(parents=True)
        for n in range(1, 11):
            (folder / f"{n}.jpg").touch()
            (folder / f"{n}.png").touch()
    dataset = module.DatasetFSS(str(tmp_path), 0, None, "test", shot, False)
    np.random.seed(0)
    prefix = str(tmp_path / "FSS-1000") + "/"
    official_episodes = []
    for index in range(EPISODES):
        query, supports, class_id = dataset.sample_episode(index)
        official_episodes.append((int(class_id), query.removeprefix(prefix),
                                  [s.removeprefix(prefix) for s in supports]))
    queries = [(path.removeprefix(prefix), 760 + sorted(classes).index(path.split("/")[-2]))
               for path in dataset.img_metadata]
    assert hsnet_fss_stream(queries, shot, EPISODES) == official_episodes


# --------------------------------------------------------------------------- bad input
def test_official_streams_refuse_what_they_do_not_cover(pascal_tree, coco_tree):
    with pytest.raises(ConfigError, match="data.episodes=official is not available for "
                                          "data.protocol=pfenet on pascal"):
        PascalSource(pascal_tree / "data", protocol="pfenet", lists=store(pascal_tree),
                     episodes="official")
    with pytest.raises(ConfigError, match="data.episodes='exact' is not supported; "
                                          "accepted: seeded, official"):
        PascalSource(pascal_tree / "data", lists=store(pascal_tree), episodes="exact")
    source = CocoSource(coco_tree / "data", fold_scheme="contiguous", lists=store(coco_tree),
                        episodes="official")
    with pytest.raises(ConfigError, match="needs data.fold_scheme=interleaved"):
        source.episodic("test", 0, 1, 5, seed=0)


def test_a_class_without_another_image_is_refused():
    with pytest.raises(ConfigError, match="no support image other than the query 'a'"):
        hsnet_pascal_stream([("a", 3), ("b", 4), ("c", 4)], 1, 5)
