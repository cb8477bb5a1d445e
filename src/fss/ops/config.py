"""The one switch between the fast kernels and their straightforward references.

Modelled on timm's ``layers/config.py`` (``use_fused_attn`` / ``set_fused_attn`` / env
``TIMM_FUSED_ATTN``): the environment variable ``FSS_FAST_PATHS`` (``1`` by default, ``0``
for the references) is read once at import; :func:`set_fast_paths` changes it for the
process, :func:`fast_paths` for a ``with`` block, and every op of :mod:`fss.ops` reads it
through :func:`choose_impl` unless its caller passes an explicit ``impl=``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from fss.utils.errors import ConfigError

ENV_VARIABLE = "FSS_FAST_PATHS"
FAST = "fast"
REFERENCE = "reference"
# Ops whose fast path differs between the CPU and accelerators also accept each form by
# name, so that both run (and are tested) on any device.
FAST_CPU = "fast_cpu"
FAST_ACCELERATOR = "fast_accelerator"
DEVICE_IMPLS = (FAST, FAST_CPU, FAST_ACCELERATOR, REFERENCE)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _from_environment() -> bool:
    value = os.environ.get(ENV_VARIABLE, "1").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{ENV_VARIABLE}={value!r} is not a switch: set it to 1 (fast kernels, "
                      "the default) or 0 (the straightforward references)")


_enabled = _from_environment()


def use_fast_paths() -> bool:
    """Whether the ops run their fast kernels (else their straightforward references)."""
    return _enabled


def set_fast_paths(enabled: bool) -> None:
    """Turn the fast kernels on or off for the whole process."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ConfigError(f"fast_paths={enabled!r} must be true or false")
    _enabled = enabled


@contextlib.contextmanager
def fast_paths(enabled: bool | None) -> Iterator[None]:
    """``with fast_paths(False):`` runs the block on the references and restores the
    previous setting after it; ``None`` leaves the switch as it is."""
    if enabled is None:
        yield
        return
    previous = use_fast_paths()
    set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(previous)


def choose_impl(impl: str | None, accepted: tuple[str, ...]) -> str:
    """The implementation an op runs: ``impl`` when given (one of ``accepted``), else
    ``fast`` or ``reference`` after the switch."""
    if impl is None:
        return FAST if _enabled else REFERENCE
    if impl not in accepted:
        raise ValueError(f"impl={impl!r} is not an implementation of this op; accepted: "
                         f"{', '.join(accepted)}")
    return impl


def device_impl(impl: str, on_cpu: bool) -> str:
    """An op's chosen ``impl`` with ``fast`` resolved to the device's form: ``fast_cpu``
    where ``on_cpu`` (the CPU, and whatever else the op's CPU form needs), else
    ``fast_accelerator``; any other value unchanged."""
    if impl == FAST:
        return FAST_CPU if on_cpu else FAST_ACCELERATOR
    return impl
