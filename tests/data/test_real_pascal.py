"""PASCAL-5i loader on a tiny tree made by the prepare command: both protocols, the
2048-pixel rule, the episode contract, bad-input messages and a run end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fss.data import FewShotDataModule, ListStore, PascalSource, folds
from fss.data.io import save_label_png
from fss.data.transforms import IGNORE_INDEX
from fss.pipeline import run
from fss.prepare import main, tiny
from fss.utils.errors import ConfigError, DataError

SIZE = 64


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pascal")
    raw = tiny.make_pascal_raw(folder / "raw")
    tiny.write_pascal_lists(folder / "lists", raw)
    status = main(["pascal", "--voc", str(raw.voc_tar), "--sbd", str(raw.sbd_tgz), "--out",
                   str(folder / "data"), "--no-list-check"])
    assert status == 0
    return {"root": folder / "data", "lists": folder / "lists", "raw": raw, "folder": folder}


def make_source(tree, protocol="hsnet", root=None, cache=None, **kwargs) -> PascalSource:
    store = ListStore(tree["lists"], cache or tree["folder"] / "cache", verify=False)
    return PascalSource(root or tree["root"], protocol=protocol, image_size=SIZE, lists=store,
                        **kwargs)


def labels_of(tree, image_id: str) -> np.ndarray:
    return np.array(Image.open(tree["root"] / "VOC2012" / "SegmentationClassAug" /
                               f"{image_id}.png"))


def test_hsnet_protocol_follows_the_lists(tree):
    source = make_source(tree)
    assert source.eval_resolution == "network" and source.image_size == SIZE
    assert source.default_episodes("test", 0) == 1000
    pairs = source.hsnet_pairs("test", 1)
    dataset = source.episodic("test", 1, shot=1, num_episodes=len(pairs) + 3, seed=0)
    for index in (0, 1, len(pairs), len(pairs) + 2):  # queries in list order, cycling
        image_id, class_id = pairs[index % len(pairs)]
        item = dataset[index]
        assert item["class_id"].item() == class_id
        original = labels_of(tree, image_id)
        expected = np.where(original == class_id + 1, 1, 0)
        expected[original == IGNORE_INDEX] = IGNORE_INDEX
        np.testing.assert_array_equal(item["query_mask_orig"].numpy(), expected)
        assert item["query_size_orig"].tolist() == list(original.shape)
    train = source.plan("train", 1)
    assert len(train.queries) == len(source.hsnet_pairs("train", 1))
    assert train.order == "shuffle" and set(train.pools) == set(source.base_classes(1))
    assert source.default_episodes("train", 1) == len(train.queries)


def test_episode_contract_determinism_and_supports(tree):
    source = make_source(tree)
    dataset = source.episodic("test", 0, shot=2, num_episodes=6, seed=3)
    for index in range(6):
        item = dataset[index]
        assert item["query_img"].shape == (3, SIZE, SIZE) and item["query_img"].dtype == torch.float32
        assert item["query_mask"].shape == (SIZE, SIZE) and item["query_mask"].dtype == torch.int64
        assert item["support_imgs"].shape == (2, 3, SIZE, SIZE)
        assert set(item["support_masks"].unique().tolist()) <= {0.0, 1.0}
        assert item["support_masks"].sum() > 0
        for support in item["support_imgs"]:
            assert not torch.equal(support, item["query_img"])
        assert not torch.equal(item["support_imgs"][0], item["support_imgs"][1])
        again = source.episodic("test", 0, shot=2, num_episodes=6, seed=3)[index]
        assert all(torch.equal(item[k], again[k]) for k in item)
    # VOC boundaries stay ignore in the query mask; training episodes carry no original.
    assert any((dataset[i]["query_mask"] == IGNORE_INDEX).any() for i in range(6))
    train_item = source.episodic("train", 0, shot=1, num_episodes=2, seed=0)[0]
    assert "query_mask_orig" not in train_item


def test_training_episodes_are_reshuffled_each_epoch(tree):
    source = make_source(tree)
    count = len(source.plan("train", 0).queries)
    first = source.episodic("train", 0, 1, count, seed=0, epoch=0)
    second = source.episodic("train", 0, 1, count, seed=0, epoch=1)
    classes = lambda d: [d[i]["class_id"].item() for i in range(count)]  # noqa: E731
    one, two = classes(first), classes(second)
    assert sorted(one) == sorted(two) == sorted(c for _, (c,) in source.plan("train", 0).queries)
    assert one != two


def test_pfenet_protocol_drops_novel_images_and_applies_2048_pixels(tree):
    source = make_source(tree, protocol="pfenet")
    assert source.eval_resolution == "original" and source.augment
    objects = tree["raw"].objects
    trainaug, val = set(tree["raw"].trainaug), set(tree["raw"].voc_val)
    for fold in range(4):
        novel = set(folds.novel_classes(fold, 20))
        train = source.pfenet_lists("train", fold)
        train_ids = {Path(i).stem for i, _, _ in train.data_list}
        expected = {i for i in trainaug if not {c for c, _ in objects[i]} & novel}
        assert train_ids == expected  # any novel pixel, even a small object, drops the image
        test = source.pfenet_lists("test", fold)
        for image, _, candidates in test.data_list:
            classes = {c for c, _ in objects[Path(image).stem]}
            assert set(candidates) == classes & novel
        for class_id, items in test.sub_class.items():
            for image, _ in items:
                box = dict(objects[Path(image).stem])[class_id]
                assert (box[1] - box[0]) * (box[3] - box[2]) >= 2048
        # A 640-pixel novel object is present (a query candidate) but never a support.
        for image_id in val:
            for class_id, (y0, y1, x0, x1) in objects[image_id]:
                if class_id in novel and (y1 - y0) * (x1 - x0) < 2048:
                    supports = {Path(p).stem for p, _ in test.sub_class[class_id]}
                    assert image_id not in supports
    built = list((tree["folder"] / "cache" / "built" / "pascal").glob("*/fold0/train/*"))
    assert {p.name for p in built} >= {"lists.json", "data_list.txt", "sub_class_file_list.json"}


def test_pfenet_lists_come_from_the_cache(tree, monkeypatch):
    cache = tree["folder"] / "cache-reuse"
    make_source(tree, protocol="pfenet", cache=cache).plan("train", 2)

    def no_reading(*args, **kwargs):
        raise AssertionError("cached lists must not be rebuilt")

    monkeypatch.setattr("fss.data.lists.read_label", no_reading)
    plan = make_source(tree, protocol="pfenet", cache=cache).plan("train", 2)
    assert plan.queries


def test_semantic_images_hold_base_labels(tree):
    source = make_source(tree, protocol="pfenet")
    dataset = source.semantic("train", 0, None, seed=0)
    assert len(dataset) == len(source.pfenet_lists("train", 0).data_list)
    assert dataset.num_labels == 16
    for index in range(len(dataset)):
        label = dataset[index]["label"]
        assert set(label.unique().tolist()) <= set(range(16)) | {IGNORE_INDEX}
    assert len(source.semantic("val", 0, 4, seed=0)) == 4


def test_datamodule_collates_original_masks(tree):
    source = make_source(tree, protocol="pfenet")
    module = FewShotDataModule(source, fold=0, shot=1, test_batch_size=3, val_episodes=3,
                               test_episodes=None, train_episodes=None)
    assert module.num_episodes("test") == 1000 and module.val_classes == [0, 1, 2, 3, 4]
    batch = next(iter(module.val_dataloader()))
    assert batch["query_mask_orig"].shape == (3, 96, 128)
    assert batch["query_size_orig"].tolist() == [[96, 128]] * 3
    train = next(iter(module.train_dataloader()))
    assert train["query_img"].shape == (8, 3, SIZE, SIZE)  # augmented, then resized


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def broken(tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tree["root"], root)
    return root


def first_query(tree, root) -> str:
    return make_source(tree, root=root).hsnet_pairs("test", 0)[0][0]


def test_missing_root_names_path_and_command(tree, tmp_path):
    source = make_source(tree, root=tmp_path / "nowhere")
    with pytest.raises(DataError) as error:
        source.episodic("test", 0, 1, 2, 0)
    message = str(error.value)
    assert f"expected the folder {tmp_path / 'nowhere'}" in message
    assert "python -m fss.prepare pascal" in message and "\n" not in message


def test_missing_subfolder_is_named(tree, broken):
    shutil.rmtree(broken / "VOC2012" / "SegmentationClassAug")
    with pytest.raises(DataError, match="SegmentationClassAug labels not found: expected"):
        make_source(tree, root=broken).episodic("test", 0, 1, 2, 0)


@pytest.mark.parametrize("remove", ["image", "label"])
def test_image_without_mask_and_the_reverse(tree, broken, remove):
    image_id = first_query(tree, broken)
    folder = "JPEGImages" if remove == "image" else "SegmentationClassAug"
    path = broken / "VOC2012" / folder / f"{image_id}.{'jpg' if remove == 'image' else 'png'}"
    path.unlink()
    dataset = make_source(tree, root=broken).episodic("test", 0, 1, 2, 0)
    with pytest.raises(DataError) as error:
        dataset[0]
    assert f"missing {'image' if remove == 'image' else 'label map'} {path}" in str(error.value)


def test_out_of_range_class_ids_name_file_and_values(tree, broken):
    image_id = first_query(tree, broken)
    path = broken / "VOC2012" / "SegmentationClassAug" / f"{image_id}.png"
    label = np.array(Image.open(path))
    label[:3, :3] = 40
    label[-1, -1] = 21
    save_label_png(path, label)
    with pytest.raises(DataError) as error:
        make_source(tree, root=broken).episodic("test", 0, 1, 2, 0)[0]
    assert f"label map {path} has values [21, 40] outside 0..20 and 255" in str(error.value)


def test_corrupt_image_is_named_and_not_dropped(tree, broken):
    image_id = first_query(tree, broken)
    path = broken / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    module = FewShotDataModule(make_source(tree, root=broken), fold=0, shot=1,
                               test_batch_size=2, test_episodes=4)
    with pytest.raises(DataError, match=f"corrupt image {path}"):
        list(module.test_dataloader())


def test_size_mismatch_names_both_files(tree, broken):
    image_id = first_query(tree, broken)
    path = broken / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    Image.open(path).resize((50, 40)).save(path)
    with pytest.raises(DataError, match=f"image {path} is 50x40 but its label map"):
        make_source(tree, root=broken).episodic("test", 0, 1, 2, 0)[0]


def test_unknown_protocol_lists_the_accepted_ones(tree):
    with pytest.raises(ConfigError, match="accepted: hsnet, pfenet, bam, hdmnet"):
        make_source(tree, protocol="panet")


# ------------------------------------------------------------------------- end to end


def test_run_hsnet_on_pascal(compose_cfg, tree, tmp_path):
    cfg = compose_cfg([
        "model=hsnet", "data=pascal", "fold=0", "debug=fdr", "backbone.weights=none",
        f"paths.data_root={tree['root']}", f"data.lists_dir={tree['lists']}",
        "data.lists_verify=false", f"data.image_size={SIZE}", "data.module.pin_memory=false",
        "eval_resolution=original",
    ])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["data"] == "pascal"
    assert metrics["episodes"] == 2 and 0 <= metrics["FB-IoU"] <= 100
