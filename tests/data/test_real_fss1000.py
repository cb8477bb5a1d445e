"""FSS-1000 loader on a tiny tree made by the prepare command: class splits and ids, every
image a query once, thresholded masks, bad-input messages and a run end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fss.data import FewShotDataModule, FSS1000Source, ListStore
from fss.pipeline import run
from fss.prepare import main, tiny
from fss.utils.errors import ConfigError, DataError

NAMES = [f"class{i:02d}" for i in range(9)]
SPLITS = {"trn": NAMES[:3], "val": NAMES[3:6], "test": NAMES[6:]}
SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fss")
    archive = tiny.make_fss_raw(folder / "raw", NAMES)
    tiny.write_fss_lists(folder / "lists", SPLITS)
    assert main(["fss1000", "--zip", str(archive), "--out", str(folder / "data"),
                 "--no-list-check"]) == 0
    return {"root": folder / "data", "lists": folder / "lists", "folder": folder}


def make_source(tree, root=None) -> FSS1000Source:
    store = ListStore(tree["lists"], tree["folder"] / "cache", verify=False)
    return FSS1000Source(root or tree["root"], image_size=SIZE, lists=store)


def test_class_ids_follow_the_official_offsets(tree):
    source = make_source(tree)
    assert source.base_classes(0) == [0, 1, 2]
    assert source.val_classes(0) == [520, 521, 522]
    assert source.novel_classes(0) == [760, 761, 762]
    assert source.class_names[:3] == NAMES[:3] and source.num_folds == 1


def test_every_test_image_is_a_query_in_list_order(tree):
    source = make_source(tree)
    assert source.default_episodes("test", 0) == 30
    dataset = source.episodic("test", 0, shot=5, num_episodes=30, seed=0)
    plan = source.plan("test", 0)
    # Lexicographic file order within a class, as the official code (1, 10, 2, ...).
    assert [r.image.name for r in plan.records[:3]] == ["1.jpg", "10.jpg", "2.jpg"]
    for index in (0, 11, 29):
        item = dataset[index]
        record = plan.records[plan.queries[index][0]]
        assert item["class_id"].item() == record.class_id == 760 + index // 10
        # The tiny masks are white rectangles 4..(12 + n) x 4..24 of a 32 x 32 image.
        n = int(record.image.stem)
        expected = np.zeros((32, 32), dtype=np.int64)
        expected[4:12 + n, 4:24] = 1
        np.testing.assert_array_equal(item["query_mask_orig"].numpy(), expected)
        assert item["support_imgs"].shape == (5, 3, SIZE, SIZE)


def test_validation_uses_the_val_classes(tree):
    module = FewShotDataModule(make_source(tree), fold=0, shot=1, test_batch_size=4,
                               val_episodes=None)
    assert module.num_episodes("val") == 30 and module.val_classes == [520, 521, 522]
    batch = next(iter(module.val_dataloader()))
    assert set(batch["class_id"].tolist()) <= {520, 521, 522}


def test_only_fold_zero_and_no_semantic_split(tree):
    source = make_source(tree)
    with pytest.raises(ValueError, match="fold must be an integer in 0..0"):
        FewShotDataModule(source, fold=1)
    with pytest.raises(ConfigError, match="base-class pretraining is not available"):
        source.semantic("train", 0, None, 0)
    with pytest.raises(ConfigError, match="accepted: hsnet"):
        FSS1000Source(tree["root"], protocol="pfenet")


def test_missing_class_folder_and_mask_are_named(tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tree["root"], root)
    (root / "FSS-1000" / NAMES[6] / "3.png").unlink()
    dataset = make_source(tree, root=root).episodic("test", 0, 1, 30, 0)
    with pytest.raises(DataError, match=f"missing mask {root / 'FSS-1000' / NAMES[6] / '3.png'}"):
        [dataset[i] for i in range(10)]
    shutil.rmtree(root / "FSS-1000" / NAMES[7])
    with pytest.raises(DataError, match=f"FSS-1000 class '{NAMES[7]}' not found"):
        make_source(tree, root=root).episodic("test", 0, 1, 2, 0)


def test_run_hsnet_on_fss1000(compose_cfg, tree):
    cfg = compose_cfg([
        "model=hsnet", "data=fss1000", "debug=fdr", "backbone.weights=none",
        f"paths.data_root={tree['root']}", f"data.lists_dir={tree['lists']}",
        "data.lists_verify=false", f"data.image_size={SIZE}", "data.module.pin_memory=false",
    ])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["data"] == "fss1000" and metrics["episodes"] == 2
