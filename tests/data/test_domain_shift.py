"""COCO-20i -> PASCAL-5i domain shift (HSNet's Table 4 setting) on tiny trees made by the
prepare command: RePRI's class folds, which dataset each split draws from, and a run of the
experiment file end to end."""

from __future__ import annotations

import pytest

from fss.data import CocoSource, DomainShiftSource, FewShotDataModule, ListStore, PascalSource
from fss.data.coco import CLASS_NAMES as COCO_NAMES
from fss.data.domain_shift import PASCAL_TO_COCO, class_correspondence
from fss.data.pascal import CLASS_NAMES as PASCAL_NAMES
from fss.data.transforms import IGNORE_INDEX
from fss.pipeline import run
from fss.prepare import main, tiny
from fss.utils.errors import ConfigError

SIZE = 64
# RePRI's COCO -> PASCAL folds (0-based PASCAL ids): the PASCAL classes that are novel in
# COCO-20i's interleaved fold i. Fold 0: aeroplane, boat, chair, diningtable, dog, person.
REPRI_FOLDS = {0: [0, 3, 8, 10, 11, 14], 1: [1, 5, 12, 17], 2: [2, 6, 15, 16, 18, 19],
               3: [4, 7, 9, 13]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Both tiny datasets under one data root, both list sets under one lists folder."""
    folder = tmp_path_factory.mktemp("coco2pascal")
    pascal = tiny.make_pascal_raw(folder / "pascal_raw")
    tiny.write_pascal_lists(folder / "lists", pascal)
    coco = tiny.make_coco_raw(folder / "coco_raw", per_class=3)
    tiny.write_coco_lists(folder / "lists", coco)
    root = folder / "data"
    assert main(["pascal", "--voc", str(pascal.voc_tar), "--sbd", str(pascal.sbd_tgz),
                 "--out", str(root), "--no-list-check"]) == 0
    assert main(["coco", "--images", *map(str, coco.image_zips), "--annotations",
                 str(coco.annotation_zip), "--out", str(root), "--workers", "1",
                 "--no-list-check"]) == 0
    return {"root": root, "lists": folder / "lists", "folder": folder, "pascal": pascal}


def make_source(tree) -> DomainShiftSource:
    store = ListStore(tree["lists"], tree["folder"] / "cache", verify=False)
    coco = CocoSource(tree["root"], image_size=SIZE, lists=store)
    pascal = PascalSource(tree["root"], image_size=SIZE, lists=store)
    return DomainShiftSource(coco, pascal)


def test_every_pascal_class_has_its_coco_counterpart():
    mapping = class_correspondence(list(PASCAL_NAMES), list(COCO_NAMES), PASCAL_TO_COCO)
    assert len(mapping) == 20 and len(set(mapping.values())) == 20
    assert COCO_NAMES[mapping[PASCAL_NAMES.index("sofa")]] == "couch"
    assert COCO_NAMES[mapping[PASCAL_NAMES.index("person")]] == "person"
    with pytest.raises(ConfigError, match=r"test classes \['sofa'\] have no class of that name"):
        class_correspondence(list(PASCAL_NAMES), list(COCO_NAMES),
                             {k: v for k, v in PASCAL_TO_COCO.items() if k != "sofa"})


def test_folds_are_repris(tree):
    source = make_source(tree)
    assert source.num_folds == 4 and source.eval_resolution == "network"
    for fold, expected in REPRI_FOLDS.items():
        assert source.novel_classes(fold) == expected
        # Disjoint from training: no test class's COCO counterpart is a base class.
        coco_base = set(source.base_classes(fold))
        assert not {source.correspondence[c] for c in expected} & coco_base
        assert source.base_classes(fold) == source.train.base_classes(fold)
        assert source.val_classes(fold) == source.train.novel_classes(fold)
    assert sorted(c for classes in REPRI_FOLDS.values() for c in classes) == list(range(20))


def test_test_episodes_come_from_pascal_val_and_the_unseen_classes(tree):
    source = make_source(tree)
    assert source.default_episodes("test", 0) == 1000  # PASCAL's protocol number
    dataset = source.episodic("test", 1, shot=1, num_episodes=12, seed=0)
    plan = dataset.plan
    assert plan.order == "list" and plan.classes == REPRI_FOLDS[1]
    val_ids = set(tree["pascal"].voc_val)
    assert {r.image.stem for r in plan.records} <= val_ids
    pairs = [(plan.records[i].image.stem, c) for i, (c,) in plan.queries]
    # The four HSNet val lists, restricted to the fold's classes, in fold then list order.
    expected = [(image_id, c) for fold in range(4)
                for image_id, c in source.test.hsnet_pairs("test", fold) if c in REPRI_FOLDS[1]]
    assert pairs == expected and len(pairs) > 0
    for index in range(12):
        item = dataset[index]
        assert item["class_id"].item() == pairs[index % len(pairs)][1]
        assert item["query_img"].shape == (3, SIZE, SIZE)
        assert ((item["query_mask"] == 1) | (item["query_mask"] == 0)
                | (item["query_mask"] == IGNORE_INDEX)).all()
        assert item["support_masks"].sum() > 0


def test_training_and_validation_stay_on_coco(tree):
    source = make_source(tree)
    module = FewShotDataModule(source, fold=2, shot=1, train_episodes=4, val_episodes=4,
                               test_episodes=4)
    assert module.novel_classes == REPRI_FOLDS[2]
    train, val = module.train_dataset(), module.val_dataset()
    assert all("COCO2014" in str(r.image) for r in train.plan.records)
    assert set(train.plan.classes) == set(source.train.base_classes(2))
    assert {val[i]["class_id"].item() for i in range(4)} <= set(source.train.novel_classes(2))
    assert all("VOC2012" in str(r.image) for r in module.test_dataset().plan.records)


def test_only_pascal_can_be_the_test_dataset(tree):
    store = ListStore(tree["lists"], tree["folder"] / "cache", verify=False)
    coco = CocoSource(tree["root"], image_size=SIZE, lists=store)
    with pytest.raises(ConfigError, match="cross-dataset testing supports PASCAL-5i"):
        coco.class_episodic([0, 1], shot=1, num_episodes=2, seed=0)
    pascal = PascalSource(tree["root"], image_size=SIZE, lists=store)
    with pytest.raises(ConfigError, match=r"must be a non-empty subset of 0..19"):
        pascal.class_episodic([25], shot=1, num_episodes=2, seed=0)


def test_experiment_runs_end_to_end(compose_cfg, tree):
    cfg = compose_cfg([
        "experiment=hsnet_coco2pascal_r50", "fold=3", "debug=fdr", "backbone=resnet18",
        "backbone.weights=none", f"paths.data_root={tree['root']}",
        f"data.lists_dir={tree['lists']}", "data.lists_verify=false",
        f"data.image_size={SIZE}", "data.module.pin_memory=false",
    ])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["data"] == "coco2pascal"
    assert metrics["episodes"] == 2
    assert metrics["class_iou"] and set(metrics["class_iou"]) <= {str(c) for c in REPRI_FOLDS[3]}
    assert metrics["paper"]["targets"][1]["mean"] == 61.6
