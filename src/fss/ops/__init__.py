"""Kernels of the models, each fast implementation beside its straightforward reference.

One module per kernel family (:mod:`~fss.ops.correlation`, :mod:`~fss.ops.conv4d`,
:mod:`~fss.ops.matmul`, :mod:`~fss.ops.folding`, :mod:`~fss.ops.boxes`,
:mod:`~fss.ops.priors`, :mod:`~fss.ops.pyramid`,
:mod:`~fss.ops.attention`; docs/ops.md) and one switch:
``FSS_FAST_PATHS=0`` in the environment, :func:`set_fast_paths`, the :func:`fast_paths`
context manager or the models' ``fast_paths`` argument (config ``model.fast_paths``) run
every op on its reference. A caller that must choose passes ``impl=`` to the op.

The ops import torch and :mod:`fss.utils` only: models import ops, never the reverse.
"""

from fss.ops.config import (
    ENV_VARIABLE,
    FAST,
    REFERENCE,
    choose_impl,
    fast_paths,
    set_fast_paths,
    use_fast_paths,
)

__all__ = [
    "ENV_VARIABLE",
    "FAST",
    "REFERENCE",
    "choose_impl",
    "fast_paths",
    "set_fast_paths",
    "use_fast_paths",
]
