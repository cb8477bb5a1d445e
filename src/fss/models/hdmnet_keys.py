"""Key layout of the official HDMNet checkpoint (Pbihao/HDMNet ``train_epoch_*.pth`` /
``train5_epoch_*.pth`` / ``final.pth``), as data for :mod:`fss.models.checkpoint_io`.

The file is ``{"epoch", "state_dict", "optimizer"}`` of the DDP-wrapped ``OneModel``: its
frozen PSPNet parts (``layer0..4``, ``ppm``, ``cls.0/1``, ``base_learnear.2``),
``down_query`` / ``down_supp`` / ``query_merge`` / ``supp_merge``,
``transformer.mix_transformer.*``, ``gram_merge``, ``cls_merge`` and, for K > 1,
``kshot_rw``. Only prefixes differ from this package's HDMNet (the transformer blocks keep
the official names and indices). Imports only the PSPNet key table.
"""

from __future__ import annotations

from fss.models import pspnet_keys

KIND = "hdmnet"
ORIGIN = "HDMNet (Pbihao/HDMNet)"

# (prefix in the official file, prefix in this package's HDMNet), first match wins.
PREFIXES = (
    *((part, "pspnet." + part) for part in pspnet_keys.PARTS),
    ("cls.0.", "pspnet.cls.0."),
    ("cls.1.", "pspnet.cls.1."),
    ("base_learnear.2.", "pspnet.cls.4."),  # sic: the official attribute name
    ("down_query.", "down_query."),
    ("down_supp.", "down_supp."),
    ("query_merge.", "query_merge."),
    ("supp_merge.", "supp_merge."),
    ("transformer.mix_transformer.", "transformer."),
    ("gram_merge.", "ensemble.gram_merge."),
    ("cls_merge.", "ensemble.cls_merge."),
    ("kshot_rw.", "ensemble.kshot_rw."),
)
UNUSED: tuple[str, ...] = ()
DUPLICATES: tuple[tuple[str, str], ...] = ()

# The base learner's backbone, named as in the PSPNet file.
BACKBONE_BY_KEY = pspnet_keys.BACKBONE_BY_KEY
BACKBONE_BY_STEM = pspnet_keys.BACKBONE_BY_STEM
BACKBONE_BY_BLOCKS = pspnet_keys.BACKBONE_BY_BLOCKS


def matches(keys) -> bool:
    """An HDMNet file: the hierarchical transformer ``transformer.mix_transformer``."""
    return any(key.startswith("transformer.mix_transformer.") for key in keys)


def facts(state) -> dict:
    """Base-learner outputs (``base_learnear.2``) and the K-shot reweighting ``kshot_rw``
    ((hidden, shot, 1, 1); shot 1 and hidden 2 when absent)."""
    classifier = state.get("base_learnear.2.weight")
    kshot = state.get("kshot_rw.0.weight")
    return {
        "num_classes": None if classifier is None else int(classifier.shape[0]),
        "shot": 1 if kshot is None else int(kshot.shape[1]),
        "kshot_hidden": 2 if kshot is None else int(kshot.shape[0]),
    }
