"""fss: few-shot semantic segmentation suite."""

from __future__ import annotations

from typing import Any

from fss.version import __version__

__all__ = ["__version__", "load_model", "predict"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import fss` stays light (no torch / Hydra until a model is loaded).
    if name == "load_model":
        from fss.checkpoints import load_model

        return load_model
    if name == "predict":
        # The implementation lives in fss.prediction: a submodule named `predict` would
        # replace this function by the module once anything imported it.
        from fss.prediction import predict

        return predict
    raise AttributeError(f"module 'fss' has no attribute {name!r}")
