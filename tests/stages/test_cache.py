"""The stage cache (fss.stages.cache), once for every stage, with a tiny stage that counts."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fss.stages import run_stages
from fss.stages.cache import META_FILE, Stage, StageContext, obtain, preserved_rng


class CountingStage(Stage):
    """Saves a tensor drawn from the global RNG; counts its trainings."""

    name = "counting"
    description = "counting stage"
    folder = "counting"
    filename = "weights.pth"

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.trained = 0
        self.seconds = seconds
        self.fail = fail

    def key_payload(self, cfg):
        return {"width": cfg.width}

    def missing(self, cfg, path):
        return LookupError(f"missing {path}")

    def train(self, cfg, context: StageContext) -> None:
        self.trained += 1
        weights = torch.randn(cfg.width)  # the stage consumes random numbers
        np.random.rand(3)
        random.random()
        os.environ["PL_GLOBAL_SEED"] = "321"  # as Lightning's seed_everything does
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("killed while training")
        context.save(weights, {"width": cfg.width})


def config(tmp_path, width: int = 4):
    return OmegaConf.create({"width": width, "fold": 0, "data": {"name": "synth"},
                             "backbone": {"name": "resnet18"},
                             "paths": {"cache_dir": str(tmp_path)}})


def test_key_covers_the_payload_and_names_data_fold_backbone(tmp_path):
    stage = CountingStage()
    key = stage.key(config(tmp_path))
    assert key.startswith("synth-fold0-resnet18-") and len(key.rsplit("-", 1)[1]) == 10
    assert key == stage.key(config(tmp_path / "elsewhere"))  # the cache folder is not hashed
    assert key != stage.key(config(tmp_path, width=5))
    assert stage.path(config(tmp_path)) == tmp_path / "counting" / key / "weights.pth"


def test_trains_once_then_reuses_with_meta(tmp_path):
    stage = CountingStage()
    cfg = config(tmp_path)
    first = obtain(stage, cfg)
    assert first.trained and stage.trained == 1
    meta = json.loads((first.path.parent / META_FILE).read_text())
    assert meta == {"key": stage.key(cfg), "width": 4} == first.meta
    assert torch.load(first.path, weights_only=True).shape == (4,)
    second = obtain(stage, cfg)
    assert (second.path, second.trained, stage.trained) == (first.path, False, 1)
    assert second.meta == meta
    # Nothing temporary is left beside the entry.
    assert sorted(p.name for p in first.path.parent.iterdir()) == [META_FILE, "weights.pth"]


def test_missing_entry_is_refused_when_training_is_not_allowed(tmp_path):
    stage = CountingStage()
    with pytest.raises(LookupError, match="missing"):
        obtain(stage, config(tmp_path), train_if_missing=False)
    assert stage.trained == 0


def test_a_crash_leaves_no_entry_and_the_next_run_trains(tmp_path, monkeypatch):
    stage = CountingStage(fail=True)
    cfg = config(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        obtain(stage, cfg)
    assert not stage.path(cfg).exists()
    # A crash while writing: the half-written file never takes the entry's name.
    stage.fail = False
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        obtain(stage, cfg)
    assert not stage.path(cfg).exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert obtain(stage, cfg).trained and stage.trained == 3


def test_parallel_jobs_train_an_entry_once(tmp_path):
    stage = CountingStage(seconds=0.3)
    cfg = config(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(obtain(stage, cfg)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stage.trained == 1
    assert sorted(r.trained for r in results) == [False, False, True]


def test_the_random_state_is_the_same_after_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    obtain(CountingStage(), config(tmp_path))  # trains, drawing random numbers
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    assert os.environ["PL_GLOBAL_SEED"] == "7"


def test_preserved_rng_restores_after_an_error():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with pytest.raises(ValueError), preserved_rng():
        torch.rand(10)
        raise ValueError
    assert torch.equal(torch.get_rng_state(), state)


def test_a_run_given_a_checkpoint_runs_no_stage(compose_cfg, tmp_path):
    cfg = compose_cfg(["model=hdmnet", "mode=test", f"ckpt_path={tmp_path / 'x.ckpt'}"])
    assert run_stages(cfg) is None
    assert not (tmp_path / "cache" / "base_learner").exists()
