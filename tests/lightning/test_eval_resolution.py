"""Scoring at the network size or at each label's original size, for any batch size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fss.data.episodes import collate_episodes
from fss.lightning import FewShotModule
from fss.metrics import FewShotIoU
from fss.models.hsnet.model import vote
from fss.pipeline import resolve_eval_resolution

IGN = 255


class FixedLogits(nn.Module):
    """forward -> the given (2, h, w) logits for every episode of the batch."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, query_img, support_imgs, support_masks):
        return self.logits.expand(query_img.shape[0], -1, -1, -1)

    def predict(self, query_img, support_imgs, support_masks):
        return self(query_img, support_imgs, support_masks).argmax(dim=1)

    def training_loss(self, *args):
        raise NotImplementedError


class InputDependent(nn.Module):
    """Logits from the query image and the support mask mean (differs per episode)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.randn(2, generator=generator))

    def forward(self, query_img, support_imgs, support_masks):
        return self.conv(query_img) * support_masks.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)

    def predict(self, query_img, support_imgs, support_masks):
        return self(query_img, support_imgs, support_masks).argmax(dim=1)

    def training_loss(self, *args):
        raise NotImplementedError


class PerShot(InputDependent):
    """An HSNet-like model: one logit map per shot, voted at prediction."""

    def per_shot_logits(self, query_img, support_imgs, support_masks):
        shots = support_imgs.shape[1]
        return torch.stack([
            self.conv(query_img) * (k + 1) * support_masks[:, k].mean(dim=(1, 2)).view(-1, 1, 1, 1)
            - k for k in range(shots)], dim=1)

    def forward(self, query_img, support_imgs, support_masks):
        return self.per_shot_logits(query_img, support_imgs, support_masks).mean(dim=1)

    def combine_shots(self, logits):
        return vote(logits)  # the model's K-shot rule, as HSNet's

    def predict(self, query_img, support_imgs, support_masks):
        return self.combine_shots(self.per_shot_logits(query_img, support_imgs, support_masks))


def episode(size: int, original: torch.Tensor, class_id: int = 0, shots: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query_mask = original[
        (torch.arange(size) * original.shape[0]) // size][:, (torch.arange(size) * original.shape[1]) // size]
    return {
        "query_img": torch.randn(3, size, size, generator=generator),
        "query_mask": query_mask.long(),
        "support_imgs": torch.randn(shots, 3, size, size, generator=generator),
        "support_masks": (torch.rand(shots, size, size, generator=generator) > 0.5).float(),
        "support_ignore": torch.zeros(shots, size, size, dtype=torch.bool),
        "class_id": torch.tensor(class_id),
        "episode_index": torch.tensor(seed),
        "query_mask_orig": original.long(),
        "query_size_orig": torch.tensor(original.shape),
    }


def scores(module: FewShotModule, batches) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        for batch in batches:
            module.test_step(batch, 0)
    values = module.test_iou.compute()
    module.test_iou.reset()
    return values


def test_collate_pads_original_masks_with_ignore():
    items = [episode(4, torch.ones(3, 5, dtype=torch.long)),
             episode(4, torch.zeros(6, 2, dtype=torch.long), seed=1)]
    batch = collate_episodes(items)
    assert batch["query_mask_orig"].shape == (2, 6, 5)
    assert batch["query_size_orig"].tolist() == [[3, 5], [6, 2]]
    assert (batch["query_mask_orig"][0, 3:] == IGN).all()
    assert (batch["query_mask_orig"][0, :3] == 1).all()
    assert (batch["query_mask_orig"][1, :, 2:] == IGN).all()
    plain = collate_episodes([{k: v for k, v in item.items() if "orig" not in k}
                              for item in items])
    assert set(plain) == set(items[0]) - {"query_mask_orig", "query_size_orig"}


def test_hand_made_case_scores_differently_at_the_two_sizes():
    # 2 x 2 network logits: foreground on the left column.
    logits = torch.zeros(2, 2, 2)
    logits[1] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    # Original label 2 x 4: foreground on the three left columns.
    original = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    batch = collate_episodes([episode(2, original)])
    # Network size: target = nearest (columns 0 and 2) = all foreground; prediction = left.
    assert batch["query_mask"][0].tolist() == [[1, 1], [1, 1]]
    network = scores(FewShotModule(FixedLogits(logits), eval_class_ids=[0]), [batch])
    assert network["miou"].item() == pytest.approx(50.0)        # fg: I 2 / U 4
    assert network["fbiou"].item() == pytest.approx(25.0)       # bg: I 0 / U 2 -> 0
    # Original size: logits upsampled (align_corners) to 2 x 4 -> fg logit 1, 1/3, -1/3, -1:
    # prediction = two left columns.
    module = FewShotModule(FixedLogits(logits), eval_class_ids=[0], eval_resolution="original")
    assert module.predict_original_size(batch)[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    full = scores(module, [batch])
    assert full["miou"].item() == pytest.approx(400 / 6, abs=1e-4)   # fg: I 4 / U 6
    assert full["fbiou"].item() == pytest.approx((400 / 6 + 50) / 2, abs=1e-4)  # bg: I 2 / U 4


def test_ignore_pixels_of_the_original_label_are_not_scored():
    logits = torch.zeros(2, 2, 2)
    logits[1] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    original = torch.tensor([[1, 1, IGN, 0], [1, 1, IGN, 0]])  # the disputed column ignored
    module = FewShotModule(FixedLogits(logits), eval_class_ids=[0], eval_resolution="original")
    values = scores(module, [collate_episodes([episode(2, original)])])
    assert values["miou"].item() == pytest.approx(100.0)
    assert values["fbiou"].item() == pytest.approx(100.0)


@pytest.mark.parametrize("model_class,shots", [(InputDependent, 1), (PerShot, 3)])
def test_batch_size_does_not_change_original_size_scores(model_class, shots):
    torch.manual_seed(0)
    originals = [(torch.rand(h, w) > 0.5).long() for h, w in ((20, 30), (33, 17), (25, 25))]
    originals[1][0, :5] = IGN
    items = [episode(16, o, class_id=i % 2, shots=shots, seed=i) for i, o in enumerate(originals)]
    module = FewShotModule(model_class(), eval_class_ids=[0, 1], eval_resolution="original")
    one_by_one = scores(module, [collate_episodes([item]) for item in items])
    together = scores(module, [collate_episodes(items)])
    for key in ("miou", "fbiou"):
        assert one_by_one[key].item() == pytest.approx(together[key].item(), abs=1e-5)
    assert one_by_one["episodes"].item() == together["episodes"].item() == 3
    # And it is the per-episode upsample-then-vote by hand.
    metric = FewShotIoU([0, 1])
    model = module.model
    for item in items:
        inputs = (item["query_img"][None], item["support_imgs"][None], item["support_masks"][None])
        if shots > 1:
            per_shot = model.per_shot_logits(*inputs)[0]
            pred = vote(F.interpolate(per_shot, size=item["query_mask_orig"].shape,
                                      mode="bilinear", align_corners=True)[None])
        else:
            pred = F.interpolate(model(*inputs), size=item["query_mask_orig"].shape,
                                 mode="bilinear", align_corners=True).argmax(dim=1)
        metric.update(pred, item["query_mask_orig"][None], item["class_id"][None])
    assert metric.compute()["miou"].item() == pytest.approx(together["miou"].item(), abs=1e-5)


def test_batches_without_original_masks_score_at_network_size():
    torch.manual_seed(0)
    items = [episode(16, (torch.rand(16, 16) > 0.5).long(), seed=i) for i in range(3)]
    plain = [{k: v for k, v in item.items() if "orig" not in k} for item in items]
    network = scores(FewShotModule(InputDependent(), eval_class_ids=[0]),
                     [collate_episodes(plain)])
    original = scores(FewShotModule(InputDependent(), eval_class_ids=[0],
                                    eval_resolution="original"), [collate_episodes(plain)])
    assert network["miou"].item() == original["miou"].item()


def test_eval_resolution_is_checked_and_resolved():
    with pytest.raises(ValueError, match="eval_resolution must be one of network, original"):
        FewShotModule(InputDependent(), eval_class_ids=[0], eval_resolution="full")
    datamodule = SimpleNamespace(source=SimpleNamespace(eval_resolution="original"))
    cfg = OmegaConf.create({"eval_resolution": None, "model": {}})
    assert resolve_eval_resolution(cfg, datamodule) == "original"  # the data protocol's
    cfg.model.eval_resolution = "network"
    assert resolve_eval_resolution(cfg, datamodule) == "network"  # the model config's
    cfg.eval_resolution = "original"
    assert resolve_eval_resolution(cfg, datamodule) == "original"  # the command line's
    assert resolve_eval_resolution(OmegaConf.create({"model": {}}), SimpleNamespace()) == "network"


def test_validation_can_use_its_own_classes():
    module = FewShotModule(InputDependent(), eval_class_ids=[760, 761], val_class_ids=[520])
    assert module.val_iou.class_ids == [520] and module.test_iou.class_ids == [760, 761]
