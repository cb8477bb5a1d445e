"""COCO-20i loader on a tiny tree made by the prepare command: interleaved and contiguous
folds, both protocols, the 2048-pixel rule, bad-input messages and a run end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fss.data import CocoSource, ListStore
from fss.data.io import save_label_png
from fss.pipeline import run
from fss.prepare import main, tiny
from fss.utils.errors import DataError

SIZE = 48


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    raw = tiny.make_coco_raw(folder / "raw", per_class=3)
    tiny.write_coco_lists(folder / "lists", raw)
    status = main(["coco", "--images", *map(str, raw.image_zips), "--annotations",
                   str(raw.annotation_zip), "--out", str(folder / "data"), "--workers", "1",
                   "--no-list-check"])
    assert status == 0
    return {"root": folder / "data", "lists": folder / "lists", "raw": raw, "folder": folder}


def make_source(tree, protocol="hsnet", scheme="interleaved", root=None) -> CocoSource:
    store = ListStore(tree["lists"], tree["folder"] / "cache", verify=False)
    return CocoSource(root or tree["root"], protocol=protocol, fold_scheme=scheme,
                      image_size=SIZE, lists=store)


def classes_of(tree, image: str) -> set[int]:
    image_set, name = Path(image).parent.name, Path(image).name
    return {c for c, _ in tree["raw"].objects[image_set][name]}


def test_fold_rules(tree):
    interleaved, contiguous = make_source(tree), make_source(tree, scheme="contiguous")
    for fold in range(4):
        assert interleaved.novel_classes(fold) == list(range(fold, 80, 4))
        assert contiguous.novel_classes(fold) == list(range(20 * fold, 20 * fold + 20))
        assert sorted(interleaved.base_classes(fold) + interleaved.novel_classes(fold)) == list(
            range(80))
    assert CocoSource("x").fold_scheme == "interleaved"  # the default


def test_hsnet_protocol_draws_class_then_query(tree):
    source = make_source(tree)
    assert source.default_episodes("test", 1) == 1000
    plan = source.plan("test", 1)
    assert plan.order == "class" and plan.classes == source.novel_classes(1)
    dataset = source.episodic("test", 1, shot=1, num_episodes=12, seed=0)
    seen = set()
    for index in range(12):
        item = dataset[index]
        class_id = item["class_id"].item()
        seen.add(class_id)
        assert class_id in source.novel_classes(1)
        assert (item["query_mask_orig"] == 1).any() and item["support_masks"].sum() > 0
    assert len(seen) > 3  # classes are drawn, not cycled through one list
    train = source.plan("train", 1)
    assert source.default_episodes("train", 1) == len(train.records)  # distinct images
    assert set(train.classes) == set(source.base_classes(1))


def test_hsnet_protocol_contiguous(tree):
    source = make_source(tree, scheme="contiguous")
    item = source.episodic("test", 0, shot=1, num_episodes=1, seed=0)[0]
    assert item["class_id"].item() in range(20)


@pytest.mark.parametrize("scheme", ["interleaved", "contiguous"])
def test_pfenet_protocol_lists(tree, scheme):
    source = make_source(tree, protocol="pfenet", scheme=scheme)
    assert source.default_episodes("test", 0) == 10000 and source.image_size == SIZE
    novel = set(source.novel_classes(0))
    train = source.pfenet_lists("train", 0)
    assert train.data_list
    for image, _, candidates in train.data_list:
        assert not classes_of(tree, image) & novel and set(candidates) <= set(
            source.base_classes(0))
    test = source.pfenet_lists("test", 0)
    for image, _, candidates in test.data_list:
        assert set(candidates) == classes_of(tree, image) & novel
    for class_id, items in test.sub_class.items():
        for image, _ in items:
            image_set, name = Path(image).parent.name, Path(image).name
            box = dict(tree["raw"].objects[image_set][name])[class_id]
            assert (box[1] - box[0]) * (box[3] - box[2]) >= 2048
    # Every image of the tiny set with a (320-pixel) second object is a query candidate
    # for it but never its support.
    smalls = [(name, items[1][0]) for name, items in tree["raw"].objects["val2014"].items()
              if len(items) == 2 and items[1][0] in novel]
    assert smalls
    for name, class_id in smalls:
        assert f"val2014/{name}" not in {i for i, _ in test.sub_class[class_id]}


def test_masks_reach_the_episode(tree):
    source = make_source(tree, protocol="pfenet")
    dataset = source.episodic("test", 0, shot=1, num_episodes=3, seed=0)
    lists = source.pfenet_lists("test", 0)
    for index in range(3):
        image, label_path, _ = lists.data_list[index]
        item = dataset[index]
        label = np.array(Image.open(source.folder / label_path))
        np.testing.assert_array_equal(item["query_mask_orig"].numpy(),
                                      (label == item["class_id"].item() + 1).astype(np.int64))


@pytest.fixture
def broken(tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tree["root"], root)
    return root


def test_missing_masks_folder_names_path_and_command(tree, broken):
    shutil.rmtree(broken / "COCO2014" / "annotations" / "val2014")
    with pytest.raises(DataError) as error:
        make_source(tree, root=broken).episodic("test", 0, 1, 2, 0)
    message = str(error.value)
    assert str(broken / "COCO2014" / "annotations" / "val2014") in message
    assert "python -m fss.prepare coco" in message


def test_bad_class_ids_are_named(tree, broken):
    masks = broken / "COCO2014" / "annotations" / "train2014"
    path = sorted(masks.glob("*.png"))[0]
    label = np.array(Image.open(path))
    label[0, 0] = 90
    save_label_png(path, label)
    source = make_source(tree, protocol="pfenet", root=broken)
    source.cache_dir = broken / "cache"
    with pytest.raises(DataError, match=rf"label map {path} has values \[90\] outside 0..80"):
        source.plan("train", 0)


def test_run_hsnet_on_coco(compose_cfg, tree):
    cfg = compose_cfg([
        "model=hsnet", "data=coco", "fold=0", "debug=fdr", "backbone.weights=none",
        f"paths.data_root={tree['root']}", f"data.lists_dir={tree['lists']}",
        "data.lists_verify=false", f"data.image_size={SIZE}", "data.module.pin_memory=false",
    ])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["data"] == "coco" and metrics["episodes"] == 2
