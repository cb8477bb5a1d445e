"""Checkpoints and image files for the prediction and export tests.

A checkpoint is made the way a run writes it (the real configs composed, the run
description of :func:`fss.checkpoints.describe_run`, the Lightning ``model.`` state-dict
prefix) from an untrained model, in seconds instead of a training run. Untrained networks
tend to call everything background or everything foreground, which would hide a wrong
resize or upsampling; so the last bias of each model is shifted until the reference
episode's logit differences have median 0 (about half of its pixels foreground).

The fixtures ``checkpoints``, ``models`` and ``files`` (defined as ``*_fixture``) are imported
by the test modules that use them (one set per module).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from fss.checkpoints import CHECKPOINT_KEY, STATE_PREFIX, describe_run
from fss.prediction import load_cached
from tests.helpers.config import compose_config

# Small but real: the synthetic benchmark's trunks (HSNet resnet18, HDMNet resnet_small).
SIZES = {"hsnet": 64, "hdmnet": 65}
# Supports of different sizes; queries of odd sizes and aspect ratios (the masks must come
# back at exactly these sizes).
SUPPORT_SIZES = [(90, 130), (70, 70), (100, 60), (81, 97), (64, 120)]
QUERY_SIZES = [(77, 51), (120, 161), (64, 64)]


def episode_tensors(size: int, shots: int, seed: int = 0):
    """A reference episode at the input size: (1, 3, S, S), (1, K, 3, S, S), (1, K, S, S)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=generator)
    supports = torch.randn(1, shots, 3, size, size, generator=generator)
    masks = torch.zeros(1, shots, size, size)
    masks[..., size // 4: 3 * size // 4, size // 5: 3 * size // 5] = 1
    return query, supports, masks


def _balance(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        logits = model(*episode_tensors(SIZES[name], 1))
        shift = (logits[:, 1] - logits[:, 0]).median()
        if name == "hsnet":
            model.learner.decoder2[-1].bias[1] -= shift
        else:
            # Untrained merge layers pass the meta-learner's softmax through: the output
            # difference is 2p - 1, p the sigmoid of the meta logits' difference.
            p = ((shift + 1) / 2).clamp(1e-6, 1 - 1e-6)
            model.transformer.cls[-1].bias[1] -= torch.log(p / (1 - p))


def make_checkpoint(name: str, directory: Path) -> Path:
    """``directory/<name>.ckpt``: an fss checkpoint of an untrained, balanced ``name``
    (``hsnet`` | ``hdmnet``) with the synthetic benchmark's run description."""
    cfg = compose_config([f"model={name}", f"data.image_size={SIZES[name]}"], directory / name)
    datamodule = instantiate(cfg.data.module)
    torch.manual_seed(0)
    model = instantiate(cfg.model.net, weights=None).eval()
    _balance(model, name)
    path = directory / f"{name}.ckpt"
    state = {STATE_PREFIX + key: value for key, value in model.state_dict().items()}
    torch.save({CHECKPOINT_KEY: describe_run(cfg, datamodule, "network"), "state_dict": state},
               path)
    return path


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 with some structure (a smooth gradient, a bright square, noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows * 255 // max(height - 1, 1), cols * 255 // max(width - 1, 1),
                      np.full_like(rows, 90)], axis=2).astype(np.int64)
    top, left = height // 4, width // 3
    image[top: top + height // 3, left: left + width // 3] = (230, 200, 40)
    image += rng.integers(-30, 30, size=image.shape)
    return image.clip(0, 255).astype(np.uint8)


def box_mask(height: int, width: int, value: int = 255) -> np.ndarray:
    """(H, W) uint8: ``value`` on the bright square of :func:`random_image`, 0 elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    top, left = height // 4, width // 3
    mask[top: top + height // 3, left: left + width // 3] = value
    return mask


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def write_files(directory: Path) -> dict:
    """Support images (:data:`SUPPORT_SIZES`) with 0/255 masks ``s<i>.png`` /
    ``s<i>_label.png``, and ``queries/q<i>.png`` (:data:`QUERY_SIZES`), under ``directory``."""
    supports = []
    for index, (height, width) in enumerate(SUPPORT_SIZES):
        image = save_png(random_image(height, width, seed=index), directory / f"s{index}.png")
        mask = save_png(box_mask(height, width), directory / f"s{index}_label.png")
        supports.append((image, mask))
    queries = directory / "queries"
    queries.mkdir()
    for index, (height, width) in enumerate(QUERY_SIZES):
        save_png(random_image(height, width, seed=10 + index), queries / f"q{index}.png")
    return {"dir": directory, "supports": supports, "queries": queries}


def support_args(files: dict, shots: int) -> list[str]:
    """``--support IMG MASK`` for the first ``shots`` supports of :func:`write_files`."""
    args = []
    for image, mask in files["supports"][:shots]:
        args += ["--support", str(image), str(mask)]
    return args


@pytest.fixture(scope="module", name="checkpoints")
def checkpoints_fixture(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint per model, written as a run writes it."""
    directory = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(name, directory) for name in SIZES}


@pytest.fixture(scope="module", name="models")
def models_fixture(checkpoints) -> dict[str, torch.nn.Module]:
    return {name: load_cached(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module", name="files")
def files_fixture(tmp_path_factory) -> dict:
    """Supports, masks and queries of :data:`SUPPORT_SIZES` / :data:`QUERY_SIZES` as files."""
    return write_files(tmp_path_factory.mktemp("images"))
