"""Lightning callbacks of the few-shot runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from fss.data.transforms import IGNORE_INDEX, denormalize
from fss.models.inputs import empty_support_kwargs

FOREGROUND_RGB = (0, 230, 60)    # mask overlays
IGNORE_RGB = (255, 255, 255)     # ignored pixels of the ground truth
OVERLAY_ALPHA = 0.55
GAP = 2                          # pixels between tiles


@dataclass(frozen=True)
class Episode:
    """What one panel row shows, on the CPU."""

    query: torch.Tensor          # (3, H, W) normalised
    support: torch.Tensor        # (3, H, W) normalised, the first shot
    support_mask: torch.Tensor   # (H, W) {0, 1}
    query_mask: torch.Tensor     # (H, W) {0, 1, 255}
    prediction: torch.Tensor     # (H, W) {0, 1}
    class_id: int
    episode_index: int

    @property
    def iou(self) -> float:
        """Foreground IoU of the prediction (ignored pixels left out), in %."""
        valid = self.query_mask != IGNORE_INDEX
        target = (self.query_mask == 1) & valid
        predicted = (self.prediction == 1) & valid
        union = (target | predicted).sum().item()
        return 100.0 * (target & predicted).sum().item() / union if union else 100.0


class PredictionOverlays(L.Callback):
    """Shows the first ``num_episodes`` validation episodes of every validation: query,
    first support (its mask overlaid), ground truth and prediction (overlaid on the query).

    Each episode is one row image. Loggers with ``log_image`` (wandb) get the rows under
    ``key`` at the current step, captioned with class and IoU; without such a logger the rows
    are stacked into ``<dirpath>/epoch_XXX.png``. The prediction is the model's ``predict``
    at the network size, recomputed here for those few episodes only.

    Args:
        num_episodes: episodes shown per validation (0 disables the callback).
        dirpath: folder of the PNG files (used when no logger takes images).
        tile_size: height in pixels of each tile.
        key: the logged image key.
    """

    def __init__(self, num_episodes: int = 4, dirpath: str | Path = "predictions",
                 tile_size: int = 160, key: str = "val/predictions") -> None:
        if num_episodes < 0 or tile_size < 8:
            raise ValueError(f"num_episodes must be >= 0 and tile_size >= 8, got "
                             f"{num_episodes} and {tile_size}")
        self.num_episodes = int(num_episodes)
        self.dirpath = Path(dirpath)
        self.tile_size = int(tile_size)
        self.key = key
        self._episodes: list[Episode] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._episodes = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        wanted = self.num_episodes - len(self._episodes)
        if (wanted <= 0 or trainer.sanity_checking or not trainer.is_global_zero
                or not isinstance(batch, dict) or "query_img" not in batch):
            return
        query = batch["query_img"][:wanted]
        supports, support_masks = batch["support_imgs"][:wanted], batch["support_masks"][:wanted]
        with trainer.precision_plugin.val_step_context():
            predict = pl_module.model.predict
            predictions = predict(query, supports, support_masks, **empty_support_kwargs(predict))
        for i in range(query.shape[0]):
            self._episodes.append(Episode(
                query=query[i].float().cpu(), support=supports[i, 0].float().cpu(),
                support_mask=support_masks[i, 0].cpu(), query_mask=batch["query_mask"][i].cpu(),
                prediction=predictions[i].cpu(), class_id=int(batch["class_id"][i]),
                episode_index=int(batch["episode_index"][i]) if "episode_index" in batch else i,
            ))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._episodes or trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = [episode_row(e, self.tile_size) for e in self._episodes]
        # Looked up on the class: fast_dev_run's DummyLogger answers any attribute.
        image_loggers = [lg for lg in trainer.loggers if callable(getattr(type(lg), "log_image", None))]
        for logger in image_loggers:
            logger.log_image(key=self.key, images=rows, step=trainer.global_step,
                             caption=[caption(e) for e in self._episodes])
        if not image_loggers:
            save_png(stack_rows(rows), self.dirpath / f"epoch_{trainer.current_epoch:03d}.png")
        self._episodes = []


def episode_row(episode: Episode, tile_size: int) -> np.ndarray:
    """(tile, 4 * tile + 3 * GAP, 3) uint8: query | support + mask | GT | prediction."""
    query = _to_uint8(episode.query)
    support = _to_uint8(episode.support)
    tiles = [
        query,
        overlay(support, episode.support_mask == 1),
        overlay(query, episode.query_mask == 1, ignore=episode.query_mask == IGNORE_INDEX),
        overlay(query, episode.prediction == 1),
    ]
    tiles = [_resize(t, tile_size) for t in tiles]
    gap = np.full((tiles[0].shape[0], GAP, 3), 255, dtype=np.uint8)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [gap, tile]
    return np.concatenate(parts, axis=1)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of possibly different widths, top to bottom, on white."""
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + GAP * (len(rows) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    top = 0
    for row in rows:
        canvas[top:top + row.shape[0], :row.shape[1]] = row
        top += row.shape[0] + GAP
    return canvas


def overlay(image: np.ndarray, mask: torch.Tensor, ignore: torch.Tensor | None = None) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with ``mask`` (H, W) bool tinted; ``ignore`` in white."""
    out = image.astype(np.float32)
    for region, colour in ((mask, FOREGROUND_RGB), (ignore, IGNORE_RGB)):
        if region is None:
            continue
        selected = region.numpy().astype(bool)
        out[selected] = (1 - OVERLAY_ALPHA) * out[selected] + OVERLAY_ALPHA * np.array(colour)
    return out.round().clip(0, 255).astype(np.uint8)


def caption(episode: Episode) -> str:
    return (f"episode {episode.episode_index}, class {episode.class_id}, IoU {episode.iou:.1f} "
            "(query | support | ground truth | prediction)")


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    return (denormalize(image) * 255).round().byte().permute(1, 2, 0).numpy()


def _resize(image: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def display_callbacks(cfg: Any) -> list[L.Callback]:
    """The run's progress display (``callbacks.progress_bar``), for the stages that train with
    a trainer of their own (trunk pretraining, the base learner): every stage of a run then
    shows one progress-bar style instead of Lightning's default for the stages."""
    from hydra.utils import instantiate

    node = (cfg.get("callbacks") or {}).get("progress_bar")
    if node is None or "_target_" not in node:
        return []
    return [instantiate(node)]
