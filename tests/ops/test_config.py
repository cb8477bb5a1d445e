"""fss.ops' switch: set_fast_paths, the fast_paths context, FSS_FAST_PATHS, impl=."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fss.ops
from fss.ops import choose_impl, fast_paths, set_fast_paths, use_fast_paths
from fss.utils.errors import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"


def test_set_and_context_restore() -> None:
    assert use_fast_paths()  # the default (the suite runs without FSS_FAST_PATHS=0)
    try:
        set_fast_paths(False)
        assert not use_fast_paths() and choose_impl(None, ("fast", "reference")) == "reference"
        with fast_paths(True):
            assert use_fast_paths()
        assert not use_fast_paths()
    finally:
        set_fast_paths(True)
    with fast_paths(None):
        assert use_fast_paths()
    with pytest.raises(RuntimeError), fast_paths(False):
        raise RuntimeError("the block failed")
    assert use_fast_paths()  # restored after an exception too


def test_explicit_impl_wins_and_unknown_impl_is_refused() -> None:
    with fast_paths(False):
        assert choose_impl("fast", ("fast", "reference")) == "fast"
    with pytest.raises(ValueError, match="impl='gpu'"):
        choose_impl("gpu", ("fast", "reference"))
    with pytest.raises(ConfigError, match="must be true or false"):
        set_fast_paths("no")


def _read_switch(value: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, fss.ops.ENV_VARIABLE: value, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", "import fss.ops; print(fss.ops.use_fast_paths())"],
        capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.parametrize(("value", "expected"), [("0", "False"), ("1", "True"),
                                                 ("false", "False")])
def test_environment_variable_sets_the_switch_at_import(value, expected) -> None:
    done = _read_switch(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_environment_variable_must_be_a_switch() -> None:
    done = _read_switch("maybe")
    assert done.returncode != 0
    assert "FSS_FAST_PATHS='maybe' is not a switch" in done.stderr
