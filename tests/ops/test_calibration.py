"""fss.ops.calibration: the per-machine product path (oneDNN 1x1 conv or torch.mm).

The cache is keyed by the machine (CPU model, ISA, ISA caps, torch version, threads) and
recalibrates when any of them changes; the override wins; a corrupt or unwritable cache
costs one log line; both paths equal the reference under the AVX2 caps and without them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fss.ops import calibration
from fss.ops.calibration import (
    CACHE_FILE,
    CONV,
    CORRELATION_COARSE,
    CORRELATION_FINE,
    MM,
    SHAPES,
    SUPPORT_MATRIX,
)
from fss.ops.correlation import correlation_product
from fss.utils.errors import ConfigError
from tests.helpers.isa import AVX2_CAPS as CAPS
from tests.helpers.isa import SRC, run_json_script

# The fake measurement: conv faster for the fine correlation products only.
REAL_MEASURE = calibration.measure
FAKE_RATIO = {CORRELATION_COARSE: 1.5, CORRELATION_FINE: 0.5, SUPPORT_MATRIX: 1.2}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A clean calibration state with its cache in tmp_path and a counting fake
    measurement; returns the list of shapes measured."""
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "_logged", set())
    monkeypatch.setattr(calibration, "_override", calibration.AUTO)
    monkeypatch.setattr(calibration, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(calibration, "_used", {})
    measured: list[tuple[int, int, int]] = []
    class_of = {shape: name for name, shapes in SHAPES.items() for shape in shapes}

    def fake_measure(shape, repeats=calibration.REPEATS, shape_class=None):
        measured.append(shape)
        ratio = FAKE_RATIO[class_of[shape]]
        return {CONV: 0.01 * ratio, MM: 0.01, "ratio": ratio}

    monkeypatch.setattr(calibration, "measure", fake_measure)
    return measured


def _cache_entries(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "cache" / CACHE_FILE).read_text())["entries"]


def test_same_key_is_a_cache_hit_without_timing(fresh, tmp_path) -> None:
    first = calibration.choices()
    assert first == {CORRELATION_COARSE: MM, CORRELATION_FINE: CONV, SUPPORT_MATRIX: MM}
    assert len(fresh) == sum(len(shapes) for shapes in SHAPES.values())
    entries = _cache_entries(tmp_path)
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["key"] == calibration.machine_key()
    assert entry["choices"] == first
    calibration._memo.clear()  # a new process: only the file remains
    fresh.clear()
    assert calibration.choices() == first
    assert fresh == []


@pytest.mark.parametrize("field", ["cpu", "capability", *CAPS, "torch", "threads"])
def test_changed_key_field_recalibrates(fresh, tmp_path, monkeypatch, field) -> None:
    calibration.choices()
    fresh.clear()
    if field == "cpu":
        monkeypatch.setattr(calibration, "cpu_model", lambda: "Another CPU 9000")
    elif field == "capability":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    elif field in CAPS:
        monkeypatch.setenv(field, CAPS[field])
    elif field == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    calibration.choices()
    assert len(fresh) == sum(len(shapes) for shapes in SHAPES.values())
    entries = _cache_entries(tmp_path)
    assert len(entries) == 2  # the first machine's entry is kept beside the new one
    assert any(entry["key"] == calibration.machine_key() for entry in entries.values())
    monkeypatch.undo()  # back to the first key (the fixture's state goes too) ...
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(calibration, "measure", lambda *a, **k: pytest.fail("timed again"))
    assert calibration.choices()[CORRELATION_FINE] == CONV  # ... a cache hit


def test_override_wins(fresh, monkeypatch) -> None:
    calls = []
    original = calibration.use_conv
    monkeypatch.setattr("fss.ops.correlation.matmul_as_conv",
                        lambda q, s: calls.append(q.shape[0]) or q @ s)
    query, support = torch.randn(500, 256, dtype=torch.float32), torch.randn(256, 200)
    coarse = torch.randn(169, 512)
    support_coarse = torch.randn(512, 200)
    correlation_product(query, support)  # auto: the fake calibration says conv (fine)
    correlation_product(coarse, support_coarse)  # ... and mm (coarse)
    assert calls == [500]
    with calibration.product_path("mm"):
        assert calibration.get_product_path() == MM
        correlation_product(query, support)
        assert not original(CORRELATION_FINE, query, support)
    with calibration.product_path("conv"):
        correlation_product(coarse, support_coarse)
        assert original(SUPPORT_MATRIX, torch.randn(2, 3), torch.randn(3, 4))
    assert calls == [500, 169]
    assert calibration.get_product_path() == calibration.AUTO
    with pytest.raises(ConfigError, match="product path 'gemm'"):
        calibration.set_product_path("gemm")
    for value, expected in (("conv", CONV), (" MM ", MM), ("", calibration.AUTO)):
        monkeypatch.setenv(calibration.ENV_VARIABLE, value)
        assert calibration._from_environment() == expected
    monkeypatch.setenv(calibration.ENV_VARIABLE, "fastest")
    with pytest.raises(ConfigError, match="FSS_PRODUCT_PATH='fastest'"):
        calibration._from_environment()


def test_used_paths_record_what_each_class_took(fresh) -> None:
    assert calibration.used_paths() == {}
    large, matrix = torch.randn(3000, 512), torch.randn(512, 99)
    small, small_matrix = torch.randn(100, 64), torch.randn(64, 50)
    calibration.use_conv(CORRELATION_FINE, large, matrix)  # calibrated (fake): conv
    calibration.use_conv(CORRELATION_COARSE, large, matrix)  # calibrated (fake): mm
    calibration.use_conv(CORRELATION_FINE, small, small_matrix)  # the fixed default
    fine = "+".join(sorted({CONV, calibration.fixed_defaults()[CORRELATION_FINE]}))
    assert calibration.used_paths() == {CORRELATION_COARSE: MM, CORRELATION_FINE: fine}
    with calibration.product_path("conv"):
        calibration.use_conv(SUPPORT_MATRIX, large, matrix)
    assert calibration.used_paths()[SUPPORT_MATRIX] == CONV
    calibration.reset_used_paths()
    assert calibration.used_paths() == {}


def test_override_from_the_environment_needs_no_calibration(tmp_path) -> None:
    code = ("import torch; from fss.ops import calibration as c; "
            "c.measure = None; "  # any timing would fail
            "print(c.get_product_path(), "
            "c.use_conv(c.CORRELATION_FINE, torch.randn(3000, 512), torch.randn(512, 99)))")
    env = {**os.environ, "PYTHONPATH": str(SRC), "FSS_PRODUCT_PATH": "mm",
           "FSS_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["mm", "False"]
    assert not (tmp_path / CACHE_FILE).exists()


def test_cache_dir_follows_the_config_default(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(calibration, "_cache_dir", None)
    monkeypatch.setenv("FSS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "root"))
    assert calibration.cache_dir() == tmp_path / "a"
    assert calibration.cache_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("FSS_CACHE")
    assert calibration.cache_dir() == tmp_path / "root" / ".cache"
    monkeypatch.delenv("PROJECT_ROOT")
    monkeypatch.chdir(tmp_path)
    assert calibration.cache_dir() == tmp_path / ".cache"
    calibration.set_cache_dir(tmp_path / "c")
    assert calibration.cache_dir() == tmp_path / "c"


def test_small_products_take_the_fixed_default_without_timing(fresh) -> None:
    rows, matrix = torch.randn(100, 64), torch.randn(64, 50)
    for shape_class in SHAPES:
        assert calibration.use_conv(shape_class, rows, matrix) == (
            calibration.fixed_defaults()[shape_class] == CONV)
    assert fresh == []
    assert set(calibration.fixed_defaults("AVX2").values()) == {MM}
    assert calibration.fixed_defaults("AVX512")[CORRELATION_FINE] == CONV
    assert calibration.fixed_defaults("NEON") == calibration.fixed_defaults("AVX512")


def test_corrupt_cache_is_ignored_with_one_log_line(fresh, tmp_path, caplog) -> None:
    path = tmp_path / "cache" / CACHE_FILE
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "entries": {"trunc')
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        choices = calibration.choices()
    assert choices[CORRELATION_FINE] == CONV
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "ignoring the product-path cache" in lines[0], lines
    assert len(_cache_entries(tmp_path)) == 1  # rewritten, valid


def test_unwritable_cache_falls_back_to_the_fixed_default(fresh, tmp_path, caplog,
                                                          monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(calibration, "_cache_dir", blocker)  # mkdir under a file fails
    rows, matrix = torch.randn(3000, 512), torch.randn(512, 99)
    with caplog.at_level(logging.WARNING, logger=calibration.__name__):
        first = calibration.use_conv(CORRELATION_FINE, rows, matrix)
        calibration._memo.clear()
        second = calibration.use_conv(CORRELATION_FINE, rows, matrix)
    assert first == second == (calibration.fixed_defaults()[CORRELATION_FINE] == CONV)
    assert fresh == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "using the fixed" in lines[0], lines


def test_real_calibration_and_the_command(fresh, monkeypatch, tmp_path, capsys) -> None:
    """The real timing on tiny shapes; the command prints the table from the cache."""
    monkeypatch.setattr(calibration, "measure", REAL_MEASURE)
    tiny = {name: ((40, 16, 30),) for name in SHAPES}
    entry = calibration.calibrate(repeats=2, shapes=tiny)
    assert set(entry["choices"]) == set(SHAPES)
    assert set(entry["choices"].values()) <= {CONV, MM}
    result = entry["timings"][CORRELATION_FINE][0]
    assert result["shape"] == [40, 16, 30] and result[CONV] > 0 and result[MM] > 0
    monkeypatch.setattr(calibration, "SHAPES", tiny)
    assert calibration.main(["--cache-dir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "get_cpu_capability()=" in out and "| correlation_fine | 40 x 16 x 30 |" in out
    assert (tmp_path / "cli" / CACHE_FILE).exists()


# Both product paths at every dispatch site against fp64 references, in a new process so
# that the ISA caps take effect.
EQUIVALENCE = r"""
import json, torch
from fss.ops import calibration as c
from fss.models.hsnet.conv4d import CenterPivotConv4d
from fss.ops.conv4d import center_pivot_conv4d_reference, channels_last_6d
from fss.ops.correlation import correlation_product, hypercorrelation_pyramid
from fss.ops.correlation import hypercorrelation_pyramid_reference
import fss.ops.conv4d as conv4d, fss.ops.correlation as correlation
calls = {}
for module in (conv4d, correlation):
    original = module.matmul_as_conv
    def spy(*args, _original=original, _name=module.__name__):
        calls[_name] = calls.get(_name, 0) + 1
        return _original(*args)
    module.matmul_as_conv = spy
torch.manual_seed(0)
unit = lambda x: x / x.norm(dim=1, keepdim=True)
products = [(unit(torch.randn(p, ch)), unit(torch.randn(s, ch)).t()) for p, ch, s in
            [(169, 2048, 845), (625, 1024, 169), (2500, 512, 150)]]
query = [torch.randn(2, 32, 21, 21), torch.randn(2, 64, 11, 11)]
support = [torch.randn(4, 32, 21, 21), torch.randn(4, 64, 11, 11)]
support[0][:, :, :5] = 0
module = CenterPivotConv4d(16, 16, 3, 1).eval()
x = torch.randn(2, 16, 25, 25, 2, 2)
result = {"key": c.machine_key()}
for path in ("conv", "mm"):
    calls.clear()
    errors = []
    with c.product_path(path), torch.no_grad():
        for q, s in products:
            errors.append((correlation_product(q, s).double() - q.double() @ s.double())
                          .abs().max().item())
        got = hypercorrelation_pyramid(query, support, [0, 1], impl="fast_cpu")
        want = hypercorrelation_pyramid_reference(query, support, [0, 1])
        errors += [(g - w).abs().max().item() for g, w in zip(got, want)]
        reference = center_pivot_conv4d_reference(
            x.double(), module.conv1.weight.double(), module.conv1.bias.double(),
            module.conv2.weight.double(), module.conv2.bias.double(), 1)
        errors.append((module(channels_last_6d(x)).double() - reference).abs().max().item())
    result[path] = {"errors": errors, "calls": dict(calls)}
print(json.dumps(result))
"""


@pytest.mark.parametrize("caps", [False, True], ids=["no-caps", "avx2-caps"])
def test_both_paths_match_the_reference_under_isa_caps(caps, tmp_path) -> None:
    result = run_json_script(EQUIVALENCE, caps, FSS_CACHE=str(tmp_path))
    for name, value in CAPS.items():
        assert result["key"][name] == (value if caps else "")
    for path in (CONV, MM):
        assert max(result[path]["errors"]) <= 1e-4, (path, result[path]["errors"])
    # conv: every product went through the oneDNN conv (3 + 2 levels' and the 4D conv's);
    # mm: none did.
    assert result[CONV]["calls"].get("fss.ops.correlation", 0) >= 5
    assert result[CONV]["calls"].get("fss.ops.conv4d", 0) >= 1
    assert result[MM]["calls"] == {}
