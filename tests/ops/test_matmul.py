"""fss.ops.matmul: matrix products as 1x1 convolutions against torch.mm."""

from __future__ import annotations

import pytest
import torch

from fss.ops import fast_paths
from fss.ops.matmul import matmul, matmul_as_conv, matmul_reference


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(("positions", "channels", "columns"),
                         [(500, 32, 7), (3, 32, 0), (0, 32, 5), (10, 0, 4)])
def test_matmul_matches_mm(impl, positions, channels, columns) -> None:
    """Bias included; an empty side (no support rows kept, say) falls back to matmul."""
    torch.manual_seed(positions + columns)
    rows, matrix, bias = (torch.randn(positions, channels), torch.randn(channels, columns),
                          torch.randn(columns))
    got = matmul(rows, matrix, bias, impl=impl)
    assert got.shape == (positions, columns)
    torch.testing.assert_close(got, rows @ matrix + bias, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matmul(rows, matrix, impl=impl), rows @ matrix,
                               rtol=1e-5, atol=1e-4)


def test_matmul_follows_the_switch(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("fss.ops.matmul.matmul_as_conv",
                        lambda *args: calls.append(1) or matmul_reference(*args))
    rows, matrix = torch.randn(4, 3), torch.randn(3, 2)
    matmul(rows, matrix)
    with fast_paths(False):
        matmul(rows, matrix)
    assert calls == [1]


def test_matmul_as_conv_takes_strided_rows() -> None:
    rows = torch.randn(6, 700).t()  # (700, 6), not contiguous
    matrix = torch.randn(6, 9)
    torch.testing.assert_close(matmul_as_conv(rows, matrix), rows @ matrix, rtol=1e-5, atol=1e-5)
