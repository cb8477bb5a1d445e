"""Named protocols: their settings, where they are recorded (metrics.json, the report),
and the one-line refusals of what they do not cover."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fss.data import ListStore, PascalSource
from fss.data.protocols import PROTOCOLS, get_protocol, official_seed_array
from fss.pipeline import run
from fss.report.cli import write_report
from fss.utils.errors import ConfigError
from tests.helpers.trees import prepared_pascal_tree

ROOT = Path(__file__).resolve().parents[2]
SIZE = 48


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pascal")
    prepared_pascal_tree(folder)
    return folder


def test_the_protocols_and_their_settings():
    assert list(PROTOCOLS) == ["hsnet", "pfenet", "bam", "hdmnet"]
    hsnet = get_protocol("hsnet").settings("pascal")
    assert hsnet == {
        "name": "hsnet", "lists": "hsnet", "image_size": 400, "eval_resolution": "network",
        "ignore_boundary": True, "train_filter": "none", "test_episodes": 1000,
        "test_seeds": [0], "report": "one seed",
        "official_streams": ["pascal", "coco", "fss1000"]}
    assert get_protocol("hdmnet").settings("coco")["test_episodes"] == 10000
    assert get_protocol("bam").settings("coco")["image_size"] == 633
    # BAM's and HDMNet's seed arrays: numpy's legacy global generator after seed(123).
    np.random.seed(123)
    expected = [int(s) for s in np.random.randint(0, 1000, 10)]
    assert official_seed_array(10) == expected == list(PROTOCOLS["hdmnet"].test_seeds)
    assert list(PROTOCOLS["bam"].test_seeds) == expected[:5]
    assert "mean and best" in PROTOCOLS["hdmnet"].report
    with pytest.raises(ConfigError, match="data.protocol='panet' does not exist; accepted: "
                                          "hsnet, pfenet, bam, hdmnet"):
        get_protocol("panet")
    with pytest.raises(ConfigError, match="does not cover fss1000; accepted there: hsnet"):
        get_protocol("hdmnet", "fss1000")


def test_bam_and_hdmnet_use_the_pfenet_data(tree):
    store = ListStore(tree / "lists", tree / "cache", verify=False)
    pfenet = PascalSource(tree / "data", protocol="pfenet", lists=store)
    hdmnet = PascalSource(tree / "data", protocol="hdmnet", lists=store)
    assert (hdmnet.family, hdmnet.image_size, hdmnet.eval_resolution, hdmnet.augment) == \
        ("pfenet", 473, "original", True)
    assert hdmnet.default_episodes("test", 0) == pfenet.default_episodes("test", 0)
    ids = [hdmnet.episodic("test", 0, 1, 6, seed=3).episode_ids(i) for i in range(6)]
    assert ids == [pfenet.episodic("test", 0, 1, 6, seed=3).episode_ids(i) for i in range(6)]


def test_more_shots_than_images_of_a_class_is_refused(tree):
    store = ListStore(tree / "lists", tree / "cache", verify=False)
    source = PascalSource(tree / "data", image_size=SIZE, lists=store)
    with pytest.raises(ConfigError, match=r"shot=40: pascal5i test fold 0 has \d+ image\(s\) "
                                          r"of class \d+, so at most \d+ support\(s\)"):
        source.episodic("test", 0, 40, 10, seed=0)


def test_protocol_lands_in_metrics_and_every_report_row(compose_cfg, tree, tmp_path):
    overrides = ["model=all_foreground", "mode=test", "backbone.weights=none", "data=pascal",
                 f"paths.data_root={tree / 'data'}", f"data.lists_dir={tree / 'lists'}",
                 "data.lists_verify=false", f"data.image_size={SIZE}",
                 "data.module.num_workers=0", "data.module.pin_memory=false",
                 "data.module.test_episodes=8", "data.module.test_batch_size=4",
                 "logger=csv", "callbacks=none", "data.protocol=hdmnet", "test_seeds=[0,1,2]"]
    for fold in (0, 1):
        run(compose_cfg([*overrides, f"fold={fold}",
                         f"paths.output_dir={tmp_path / 'sweep' / str(fold)}"]))
    metrics = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    protocol = metrics["protocol"]
    assert protocol["name"] == "hdmnet" and protocol["image_size"] == SIZE
    assert protocol["eval_resolution"] == "original" and protocol["ignore_boundary"] is True
    assert protocol["test_seeds"] == official_seed_array(10)
    assert protocol["report"] == "mean and best of 10 seeds"
    assert protocol["episodes"] == "seeded" and protocol["lists"] == "pfenet"
    # The CSV logger got the protocol as a hyperparameter.
    hparams = list((tmp_path / "sweep" / "0").rglob("hparams.yaml"))
    assert hparams and "mean and best of 10 seeds" in hparams[0].read_text()

    report = write_report(tmp_path / "sweep")
    assert len(report.rows) == 1
    row = report.rows[0]
    assert row.protocol_label == f"hdmnet {SIZE}² original-size 255 ignored seeded"
    assert row.seed_count == 3
    per_seed = [[s["mIoU"] for s in json.loads((tmp_path / "sweep" / str(f) /
                                                "metrics.json").read_text())["seeds"]]
                for f in (0, 1)]
    assert row.best_of_n == pytest.approx((max(per_seed[0]) + max(per_seed[1])) / 2)
    from scipy import stats

    fold_means = np.mean(per_seed, axis=0)
    half = stats.t.ppf(0.975, 2) * fold_means.std(ddof=1) / np.sqrt(3)
    assert row.mean_ci95 == pytest.approx(half)
    csv_text = report.csv.read_text()
    assert "best of N seeds" in csv_text.splitlines()[0]
    assert "(best of 3)" in csv_text and f"hdmnet {SIZE}² original-size" in csv_text
    markdown = report.markdown.read_text()
    assert "Protocol `hdmnet" in markdown and "train_filter=drop training images" in markdown


CLI_CASES = [
    (["data.protocol=panet"], "data.protocol='panet' does not exist; accepted: hsnet, pfenet, "
                              "bam, hdmnet"),
    (["data.protocol=pfenet", "data.episodes=official"],
     "data.episodes=official is not available for data.protocol=pfenet on pascal"),
    (["data.episodes=all"], "data.episodes='all' is not supported; accepted: seeded, official"),
    (["data.ignore_boundary=maybe"], "data.ignore_boundary='maybe' must be true, false or null"),
]


def test_bad_protocol_settings_are_one_line(tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    arguments = [["data=pascal", f"paths.data_root={data_root}", *overrides,
                  f"hydra.run.dir={tmp_path / str(n)}"]
                 for n, (overrides, _) in enumerate(CLI_CASES)]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "FSS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "cli_batch.py"),
                           json.dumps(arguments)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (_, phrase), result in zip(CLI_CASES, results, strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1, result["stderr"]
        assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]


def test_a_protocol_with_several_seeds_tests_on_them_unless_test_seeds_is_set():
    """BAM's 5 and HDMNet's 10 official seeds are the default test seeds of their protocols;
    an explicit test_seeds wins; a one-seed protocol (or a source without one) runs once."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from fss.data.protocols import official_seed_array
    from fss.pipeline import _test_seeds

    def seeds(protocol, test_seeds=None):
        source = SimpleNamespace(protocol=protocol) if protocol else SimpleNamespace()
        return _test_seeds(OmegaConf.create({"test_seeds": test_seeds}),
                           SimpleNamespace(source=source))

    assert seeds("hdmnet") == official_seed_array(10) and len(seeds("hdmnet")) == 10
    assert seeds("bam") == official_seed_array(5)
    assert seeds("hdmnet", [1, 2]) == [1, 2]
    assert seeds("hsnet") == [] and seeds("pfenet") == [] and seeds(None) == []


def test_several_seeds_report_the_best_labelled_beside_the_mean():
    from fss.pipeline import _seed_summary

    summary = _seed_summary([(1, {"test/miou": 50.0, "test/fbiou": 70.0}),
                             (2, {"test/miou": 54.0, "test/fbiou": 69.0})])
    assert summary["mIoU_mean"] == 52.0
    assert summary["best_of_seeds"] == {"seeds": 2, "mIoU": 54.0, "FB-IoU": 70.0}
