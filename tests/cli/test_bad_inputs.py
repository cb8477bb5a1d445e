"""The bad-input catalogue (docs/errors.md): each bad command line ends with exit status 2 and
one line on stderr that names the key, before any stage runs (no trunk, no checkpoint, no
metrics of a finished run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (command-line overrides, a phrase the one stderr line must contain)
CATALOGUE = [
    (["mode=tset"], "mode='tset' is not supported; accepted: train, test"),
    (["fold=7"], "fold=7 is out of range; accepted: 0, 1, 2, 3"),
    (["shot=0"], "shot=0 must be an integer >= 1"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 2**32 - 1]"),
    (["+data.module.test_seed=4294967296"], "data.module.test_seed=4294967296 must be an integer"),
    (["test_seeds=[1,-2]"], "test_seeds=[1, -2] must be null or a non-empty list"),
    (["eval_resolution=full"], "eval_resolution='full' is not supported"),
    (["data.image_size=60"], "data.image_size=60 does not suit model=hsnet"),
    (["data.image_size=0"], "data.image_size=0 must be a positive integer"),
    (["model=hdmnet", "base_learner.strict_size=true"],
     "data.image_size=112 does not suit model=hdmnet"),
    (["model=hdmnet", "backbone=resnet18"], "backbone=resnet18 has no PSPNet variant"),
    (["trainer.accelerator=gpu"], "trainer.accelerator=gpu but this machine has no CUDA device"),
    (["trainer.accelerator=tpu"], "trainer.accelerator=tpu is not supported"),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a GPU"),
    (["trainer.precision=fp8"], "trainer.precision=fp8 is not supported"),
    (["trainer.devices=0"], "trainer.devices=0 must be >= 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer >= 1"),
    (["pretrain.low_resolution.size=8"],
     "pretrain.low_resolution.size=8: expected an integer >= 32"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt does not exist"),
    (["backbone.weights=/nonexistent.pth"], "backbone.weights=/nonexistent.pth is not a file"),
    (["model=hdmnet", "base_learner.ckpt=/nonexistent.pth"],
     "base_learner.ckpt=/nonexistent.pth is not a file"),
    (["data.module.batch_size=0"], "data.module: batch_size must be an integer >= 1, got 0"),
    (["data.module.test_episodes=-5"], "data.module: test_episodes must be an integer >= 1"),
    (["data.level=extreme"], "data.module.source: level must be one of demo, hard"),
    (["data.colour=pink"], "data.module.source: colour must be one of instance, class"),
    (["data=pascal", "paths.data_root=/nonexistent"], "expected the folder /nonexistent"),
    (["shot=abc"], "shot='abc' must be an integer >= 1"),
    (["ckpt_path=README.md"], "checkpoint README.md cannot be read by torch.load"),
    (["backbone.weights=README.md"], "backbone weights 'README.md' cannot be read by torch.load"),
    (["paths.cache_dir=/proc/fss-cache"], "paths.cache_dir=/proc/fss-cache cannot be created"),
    (["backbone=resnet34"], "Could not find 'backbone/resnet34'; Available options in 'backbone'"),
    (["trainer.max_epoch=3"], "Could not override 'trainer.max_epoch'"),
    (["data=nope"], "Could not find 'data/nope'; Available options in 'data': coco"),
    (["model=hsnet,hdmnet"], "Ambiguous value for argument"),
]


# Each in an interpreter of its own, as a user types it.
SEPARATE = {"fold=7", "data.image_size=60", "data.module.batch_size=0", "data=nope"}


def run_bad(overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "FSS_CACHE": str(run_dir / "cache")}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def run_batch(cases: list[tuple[list[str], Path]], cache: Path) -> list[dict]:
    """The other cases through ``tests/helpers/cli_batch.py``: one interpreter runs ``run.py`` once
    per case (the same entry point, exit status and stderr), paying the imports once."""
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "FSS_CACHE": str(cache)}
    arguments = [[*overrides, f"hydra.run.dir={run_dir}"] for overrides, run_dir in cases]
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "cli_batch.py"),
                           json.dumps(arguments)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    dirs = [root / str(number) for number in range(len(CATALOGUE))]
    separate = [n for n, (overrides, _) in enumerate(CATALOGUE) if " ".join(overrides) in SEPARATE]
    batched = [n for n in range(len(CATALOGUE)) if n not in separate]
    results: dict[int, tuple[int, str]] = {}
    for number, result in zip(batched, run_batch([(CATALOGUE[n][0], dirs[n]) for n in batched],
                                                 root / "cache"), strict=True):
        results[number] = (result["code"], result["stderr"])
    for number in separate:
        done = run_bad(CATALOGUE[number][0], dirs[number])
        results[number] = (done.returncode, done.stderr)
    assert not (root / "cache" / "pretrain").exists()  # refused before any stage
    return [(dirs[n], *results[n]) for n in range(len(CATALOGUE))]


@pytest.mark.parametrize("case", range(len(CATALOGUE)),
                         ids=[" ".join(overrides) for overrides, _ in CATALOGUE])
def test_bad_input_is_one_line_with_exit_status_2(outcomes, case):
    overrides, phrase = CATALOGUE[case]
    run_dir, code, stderr = outcomes[case]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
    # Refused before any stage: no trunk was trained, no checkpoint written.
    assert not (run_dir / "cache" / "pretrain").exists()
    assert not (run_dir / "checkpoints").exists()


def test_docs_list_every_catalogue_message():
    text = (ROOT / "docs" / "errors.md").read_text()
    missing = [phrase for _, phrase in CATALOGUE if phrase not in text]
    assert missing == []


def test_a_data_error_in_a_loader_worker_is_reported_as_its_own_sentence():
    """PyTorch re-raises a worker's exception with the worker's traceback in its message."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from fss.cli import as_config_error
    from fss.utils.errors import DataError

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> torch.Tensor:
            raise DataError("corrupt mask /data/x.png (truncated); replace the file")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what PyTorch makes of it
    error = as_config_error(caught.value)
    assert isinstance(error, DataError)
    assert str(error) == "corrupt mask /data/x.png (truncated); replace the file"


def test_test_mode_without_a_checkpoint_is_marked_untrained(compose_cfg, shared_cache):
    from fss.pipeline import run

    metrics = run(compose_cfg(["mode=test", "debug=fdr", "data.image_size=64",
                               "data.module.num_workers=0", "data.semantic.num_workers=0"],
                              cache_dir=shared_cache))
    assert metrics["weights"] == "untrained"
    assert metrics["warning"].startswith("untrained weights: mode=test without ckpt_path")
    proto = run(compose_cfg(["model=proto", "mode=test", "debug=fdr", "data.image_size=64",
                             "data.module.num_workers=0", "data.semantic.num_workers=0"],
                            cache_dir=shared_cache))
    assert proto["weights"] == "training-free" and "warning" not in proto
