"""Per-machine choice of the CPU product path: a oneDNN 1x1 convolution or ``torch.mm``.

Several fast kernels multiply two matrices (:func:`fss.ops.matmul.matmul_as_conv` against
``rows @ matrix``). Both compute the same product (they differ by float rounding only);
which one is faster depends on the CPU: on the AVX-512 machine measured oneDNN's
convolution ran 2.1-2.7x MKL's sgemm, on an AVX2 machine the order can differ. So the
choice is measured once per machine, per *shape class*:

- ``correlation_coarse``: HSNet's correlation products with fewer than
  :data:`COARSE_BELOW` query positions (the deepest level, 13 x 13 at 400²);
- ``correlation_fine``: the other correlation products (levels 2 and 3);
- ``support_matrix``: the center-pivot 4D conv's support branch on maps every kernel
  window covers (2 x 2 at 400²), as one matrix product (:mod:`fss.ops.conv4d`).

:func:`calibrate` times both candidates at the shapes of HSNet R50 at 400² (alternating,
a few repeats, medians; about a second) and keeps the faster per class. The result is
cached as JSON in ``<cache dir>/ops/product_paths.json`` (cache dir: :func:`set_cache_dir`,
else ``$FSS_CACHE``, else ``$PROJECT_ROOT/.cache``, else ``./.cache``, as the config's
``paths.cache_dir``), keyed by the CPU model,
``torch.backends.cpu.get_cpu_capability()``, the ISA caps in the environment
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``), the torch
version and the thread count: a change of any of them calibrates again.

The calibration is lazy: it runs on the first CPU product of at least
:data:`MIN_CALIBRATED_MACS` multiply-adds (smaller products take the fixed default of the
ISA without measuring: there the choice costs microseconds), or explicitly with
``python -m fss.ops.calibration`` (prints the table; ``--force`` measures again). When it
cannot run (no writable cache dir, a failed measurement) the fixed default of the ISA
(:data:`FIXED_DEFAULTS`) is used and one log line says so. Off the CPU the convolution is
used (the accelerator kernels are not calibrated).

Override: ``FSS_PRODUCT_PATH=conv|mm|auto`` in the environment (read at import; ``auto``,
the default, is the calibrated choice), :func:`set_product_path` for the process, or the
:func:`product_path` context manager for a block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from fss.utils.errors import ConfigError
from fss.utils.filelock import file_lock

log = logging.getLogger(__name__)

ENV_VARIABLE = "FSS_PRODUCT_PATH"
CACHE_ENV_VARIABLE = "FSS_CACHE"
CONV = "conv"
MM = "mm"
AUTO = "auto"
PATHS = (CONV, MM, AUTO)
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CACHE_FILE = Path("ops") / "product_paths.json"
FORMAT_VERSION = 1

CORRELATION_COARSE = "correlation_coarse"
CORRELATION_FINE = "correlation_fine"
SUPPORT_MATRIX = "support_matrix"
# Query positions from which a correlation product is of the fine class.
COARSE_BELOW = 400
# Products smaller than this (P·C·S multiply-adds) do not start a calibration.
MIN_CALIBRATED_MACS = 1 << 24
# (P, C, S) products timed per class: HSNet R50 at 400², 1 and 5 shots, `box` support mask.
SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    CORRELATION_COARSE: ((169, 2048, 169), (169, 2048, 845)),  # level 4 (13 x 13)
    CORRELATION_FINE: ((625, 1024, 625), (2500, 512, 625)),  # levels 3 (25²) and 2 (50²)
    SUPPORT_MATRIX: ((625, 512, 512), (2500, 512, 512)),  # mix_l43 and mix_l32, 2 x 2 maps
}
REPEATS = 5
# Used when no calibration can run, per get_cpu_capability(); measured (docs/performance.md,
# "Per-machine choices"). Other ISAs take the AVX-512 choices, the code's behaviour before
# calibration existed.
FIXED_DEFAULTS: dict[str, dict[str, str]] = {
    "AVX512": {CORRELATION_COARSE: MM, CORRELATION_FINE: CONV, SUPPORT_MATRIX: CONV},
    "AVX2": {CORRELATION_COARSE: MM, CORRELATION_FINE: MM, SUPPORT_MATRIX: MM},
}


def _from_environment() -> str:
    value = os.environ.get(ENV_VARIABLE, AUTO).strip().lower() or AUTO
    if value not in PATHS:
        raise ConfigError(f"{ENV_VARIABLE}={value!r} is not a product path: set it to conv "
                          "(oneDNN 1x1 convolution), mm (torch.mm) or auto (measured per "
                          "machine, the default)")
    return value


_override = _from_environment()
_cache_dir: Path | None = None
_memo: dict[tuple[str, str], dict[str, str]] = {}
_logged: set[str] = set()
# The paths the CPU products of this process took, per class (what a run records).
_used: dict[str, set[str]] = {}


def set_product_path(path: str) -> None:
    """``conv``, ``mm`` or ``auto`` (calibrated) for every product of the process."""
    global _override
    if path not in PATHS:
        raise ConfigError(f"product path {path!r} is not one of {', '.join(PATHS)}")
    _override = path


def get_product_path() -> str:
    """The override in force: ``conv``, ``mm`` or ``auto``."""
    return _override


@contextlib.contextmanager
def product_path(path: str) -> Iterator[None]:
    """``with product_path("mm"): ...`` runs the block's products on that path."""
    previous = _override
    set_product_path(path)
    try:
        yield
    finally:
        set_product_path(previous)


def set_cache_dir(directory: str | Path | None) -> None:
    """Where the calibration is cached (``None``: ``$FSS_CACHE`` or ``./.cache``)."""
    global _cache_dir
    _cache_dir = None if directory is None else Path(directory)


def cache_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else :func:`set_cache_dir`'s, else ``$FSS_CACHE``, else
    ``$PROJECT_ROOT/.cache`` (``PROJECT_ROOT``: set by ``run.py``), else ``./.cache``: the
    default of the config's ``paths.cache_dir``."""
    if directory is not None:
        return Path(directory)
    if _cache_dir is not None:
        return _cache_dir
    if os.environ.get(CACHE_ENV_VARIABLE):
        return Path(os.environ[CACHE_ENV_VARIABLE])
    return Path(os.environ.get("PROJECT_ROOT") or ".").absolute() / ".cache"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_key() -> dict[str, str | int]:
    """What the choice depends on; a change of any field calibrates again."""
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ.get(name, "") for name in CAP_VARIABLES},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _key_string(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def fixed_defaults(capability: str | None = None) -> dict[str, str]:
    """The uncalibrated choice per class for an ISA (default: this CPU's)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return dict(FIXED_DEFAULTS.get(capability, FIXED_DEFAULTS["AVX512"]))


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


# ---------------------------------------------------------------------------- measuring
def _conv_product(rows: Tensor, matrix: Tensor, bias: Tensor | None) -> Tensor:
    from fss.ops.matmul import matmul_as_conv  # matmul imports nothing of this module

    return matmul_as_conv(rows, matrix, bias)


def _mm_product(rows: Tensor, matrix: Tensor, bias: Tensor | None) -> Tensor:
    return rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)


def measure(shape: tuple[int, int, int], repeats: int = REPEATS,
            shape_class: str = CORRELATION_FINE) -> dict[str, float]:
    """Median seconds of the conv and mm products at ``shape`` (P, C, S), timed
    alternately (the order swapped every repeat) after one warm-up each, and the median of
    the per-pair ratios conv / mm (``ratio``; all of them: ``ratios``). The operands are
    laid out as at the call site: the correlation's query rows a transposed (C, P) view,
    the support matrix's rows contiguous and a bias added."""
    positions, channels, columns = shape
    generator = torch.Generator().manual_seed(0)
    if shape_class == SUPPORT_MATRIX:
        rows = torch.randn(positions, channels, generator=generator)
        bias = torch.randn(columns, generator=generator)
    else:
        rows = torch.randn(channels, positions, generator=generator).t()
        bias = None
    matrix = torch.randn(channels, columns, generator=generator)
    candidates = {CONV: _conv_product, MM: _mm_product}
    times: dict[str, list[float]] = {CONV: [], MM: []}
    with torch.inference_mode():
        for run in candidates.values():
            run(rows, matrix, bias)
        for repeat in range(repeats):
            order = (CONV, MM) if repeat % 2 == 0 else (MM, CONV)
            for name in order:
                start = time.perf_counter()
                candidates[name](rows, matrix, bias)
                times[name].append(time.perf_counter() - start)
    ratios = [c / m for c, m in zip(times[CONV], times[MM], strict=True)]
    return {CONV: statistics.median(times[CONV]), MM: statistics.median(times[MM]),
            "ratio": statistics.median(ratios), "ratios": ratios}


def calibrate(repeats: int = REPEATS,
              shapes: dict[str, tuple[tuple[int, int, int], ...]] | None = None) -> dict:
    """Time both paths per class; the entry cached for :func:`machine_key`: the key, the
    choice per class (``conv`` when the median of the per-pair conv / mm time ratios over
    all its shapes is below 1) and the timings."""
    shapes = SHAPES if shapes is None else shapes
    timings: dict[str, list[dict]] = {}
    choices: dict[str, str] = {}
    for shape_class, class_shapes in shapes.items():
        results = [{"shape": list(shape), **measure(shape, repeats, shape_class)}
                   for shape in class_shapes]
        timings[shape_class] = results
        # The median over every pair of the class's shapes: one disturbed pair (a busy
        # machine) cannot flip the choice.
        pooled = statistics.median(
            ratio for result in results for ratio in result.get("ratios", [result["ratio"]]))
        choices[shape_class] = CONV if pooled < 1 else MM
    return {"version": FORMAT_VERSION, "key": machine_key(), "choices": choices,
            "timings": timings, "repeats": repeats,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------ caching
def _read_cache(path: Path) -> dict:
    """The cache file's entries by key string; {} (and one log line) if it is unreadable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} product-path cache")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not a mapping")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as error:
        _log_once(f"ignoring the product-path cache {path} ({error}); calibrating again")
        return {}


def _valid_choices(entry: object) -> dict[str, str] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("choices"), dict):
        return None
    choices = entry["choices"]
    if set(choices) != set(SHAPES) or not all(v in (CONV, MM) for v in choices.values()):
        return None
    return dict(choices)


def cached_entry(directory: str | Path | None = None) -> dict | None:
    """This machine's cached calibration entry, or ``None``."""
    entry = _read_cache(cache_dir(directory) / CACHE_FILE).get(_key_string(machine_key()))
    return entry if _valid_choices(entry) is not None else None


def _write_entry(path: Path, key: str, entry: dict) -> None:
    entries = _read_cache(path)
    entries[key] = entry
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"version": FORMAT_VERSION, "entries": entries},
                                    indent=1, sort_keys=True))
    os.replace(temporary, path)


def choices(directory: str | Path | None = None, *, force: bool = False) -> dict[str, str]:
    """The product path per class on this machine: cached, else calibrated and cached;
    the ISA's fixed default (one log line) if that fails."""
    key = _key_string(machine_key())
    folder = cache_dir(directory)
    memo_key = (key, str(folder))
    if not force and memo_key in _memo:
        return _memo[memo_key]
    path = folder / CACHE_FILE
    try:
        with file_lock(path.with_suffix(".lock")):
            entry = None if force else _valid_choices(_read_cache(path).get(key))
            if entry is None:
                calibration = calibrate()
                entry = calibration["choices"]
                _write_entry(path, key, calibration)
                log.info("product paths calibrated for this machine (%s): %s; cached in %s",
                         key, entry, path)
    except Exception as error:  # noqa: BLE001 - any failure falls back to the fixed default
        entry = fixed_defaults()
        _log_once(f"product-path calibration could not run ({type(error).__name__}: {error}; "
                  f"cache {path}); using the fixed {torch.backends.cpu.get_cpu_capability()} "
                  f"default {entry}. Set {CACHE_ENV_VARIABLE} to a writable folder or "
                  f"{ENV_VARIABLE}=conv|mm")
    _memo[memo_key] = entry
    return entry


@torch.compiler.assume_constant_result
def use_conv(shape_class: str, rows: Tensor, matrix: Tensor) -> bool:
    """Whether the product ``rows @ matrix`` of ``shape_class`` runs as a oneDNN 1x1
    convolution (else ``torch.mm``): the override, else off the CPU yes, else for a small
    product the ISA's fixed default, else the calibrated choice. CPU decisions are recorded
    for :func:`used_paths`."""
    on_cpu = rows.device.type == "cpu"
    if _override != AUTO:
        conv = _override == CONV
    elif not on_cpu:
        return True
    elif rows.shape[0] * rows.shape[1] * matrix.shape[1] < MIN_CALIBRATED_MACS:
        conv = fixed_defaults()[shape_class] == CONV
    else:
        conv = choices()[shape_class] == CONV
    if on_cpu:
        _used.setdefault(shape_class, set()).add(CONV if conv else MM)
    return conv


def used_paths() -> dict[str, str]:
    """The product path each class's CPU products took in this process so far (``conv``,
    ``mm``, or ``conv+mm`` when small and large products of a class went different ways),
    for a run's record: the chosen path changes float rounding, so a score is reproduced
    exactly only on the same paths (pin them with ``FSS_PRODUCT_PATH``). Empty when no
    CPU product ran."""
    return {name: "+".join(sorted(paths)) for name, paths in sorted(_used.items())}


def reset_used_paths() -> None:
    """Forget the recorded paths (a new job in the same process starts its own record)."""
    _used.clear()


# ---------------------------------------------------------------------------------- CLI
def machine_line(key: dict | None = None) -> str:
    key = key or machine_key()
    caps = " ".join(f"{name}={key[name] or '-'}" for name in CAP_VARIABLES)
    return (f"CPU {key['cpu']}, get_cpu_capability()={key['capability']}, {caps}, "
            f"torch {key['torch']}, {key['threads']} threads")


def format_table(entry: dict) -> str:
    lines = [machine_line(entry["key"]),
             "| class | P x C x S | conv ms | mm ms | conv / mm | choice |",
             "|---|---|---|---|---|---|"]
    for shape_class, results in entry["timings"].items():
        for result in results:
            p, c, s = result["shape"]
            lines.append(f"| {shape_class} | {p} x {c} x {s} | {1e3 * result[CONV]:.2f} | "
                         f"{1e3 * result[MM]:.2f} | {result['ratio']:.2f} | "
                         f"{entry['choices'][shape_class]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fss.ops.calibration",
        description="Measure (or show the cached) product path per shape class on this CPU.")
    parser.add_argument("--cache-dir",
                        help="default: $FSS_CACHE, else $PROJECT_ROOT/.cache, else ./.cache")
    parser.add_argument("--force", action="store_true", help="measure again")
    args = parser.parse_args(argv)
    folder = cache_dir(args.cache_dir)
    entry = None if args.force else cached_entry(folder)
    if entry is None:
        choices(folder, force=True)
        entry = cached_entry(folder)
    if entry is None:
        print(f"could not calibrate (cache {folder / CACHE_FILE} not writable?); "
              f"fixed default: {fixed_defaults()}")
        return 1
    print(format_table(entry))
    print(f"cached in {folder / CACHE_FILE}; override: {ENV_VARIABLE}=conv|mm "
          f"(now {get_product_path()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
