"""The test harness itself: the ``gpu`` marker skips with one reason where CUDA is absent
and lets the test run where it is present (an inner pytest run on a made-up test file)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import NEEDS_CUDA

GPU_TEST = """
import pytest

@pytest.mark.gpu
def test_on_the_gpu():
    assert 1 + 1 == 2

def test_anywhere():
    assert 2 + 2 == 4
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa")
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_inner=GPU_TEST)
    return pytester


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_marker_skips_only_without_cuda(inner, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    result = inner.runpytest_inprocess("-rs", "--strict-markers")
    if cuda:
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED *test_inner.py:*: {NEEDS_CUDA}"])


def test_gpu_marker_is_registered(pytestconfig):
    markers = pytestconfig.getini("markers")
    assert any(line.startswith("gpu:") for line in markers), markers
