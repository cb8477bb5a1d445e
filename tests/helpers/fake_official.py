"""A stand-in for a checkout of juhongm999/hsnet, for the benchmark's side-by-side plumbing.

``make_hsnet_checkout(root)`` writes ``root/model/hsnet.py`` with the official class name and
methods (``HypercorrSqueezeNetwork(backbone, use_original_imgsize)``, ``predict_mask_nshot``,
``train_mode``, ``compute_objective``, a state dict in the official key layout) computed by
this package's HSNet. It tests how the benchmark loads, feeds, times and compares an
official model; equivalence with the real official code is tested when a real checkout is
given (``FSS_OFFICIAL_HSNET``).
"""

from __future__ import annotations

from pathlib import Path

_HSNET = '''
import torch
import torch.nn.functional as F

from fss.models import HSNet
from fss.models.checkpoint_io import to_official_state_dict


class HypercorrSqueezeNetwork(torch.nn.Module):
    def __init__(self, backbone, use_original_imgsize):
        super().__init__()
        self.inner = HSNet(backbone=backbone, weights=None)

    def state_dict(self, *args, **kwargs):
        return to_official_state_dict(self.inner.state_dict(), "hsnet")

    def forward(self, query_img, support_img, support_mask):
        return self.inner.per_shot_logits(query_img, support_img[:, None],
                                          support_mask[:, None])[:, 0]

    def predict_mask_nshot(self, batch, nshot):
        return self.inner.predict(batch["query_img"], batch["support_imgs"],
                                  batch["support_masks"])

    def train_mode(self):
        self.train()
        self.inner.backbone.eval()

    def compute_objective(self, logit_mask, gt_mask):
        return F.cross_entropy(logit_mask, gt_mask.long())
'''


def make_hsnet_checkout(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "hsnet.py").write_text(_HSNET)
    return root
