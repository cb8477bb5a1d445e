"""Shared pieces of the benchmarks: episodes, timing, the machine line, Markdown tables.

Not a library of the package: plain helpers for the scripts in this folder, importable
because each script puts this folder and ``src/`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
MASKS = ("box", "full", "random")
DEFAULT_SIZES = {"hsnet": [400], "hdmnet": [473]}


def episode(batch: int, shots: int, size: int, mask: str = "box", seed: int = 0,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images and masks of one batch of episodes, the same for every implementation.

    ``mask``: ``box`` = the centre half of each side foreground (25 % of the image, an
    object-like mask), ``full`` = all foreground (nothing to prune: the worst case for the
    mask-pruned products), ``random`` = independent pixels (p = 0.5).
    Returns query (B,3,S,S), supports (B,K,3,S,S), support masks (B,K,S,S) float {0,1},
    query mask (B,S,S) int64 {0,1}.
    """
    if mask not in MASKS:
        raise SystemExit(f"unknown mask {mask!r}; accepted: {', '.join(MASKS)}")
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    if mask == "random":
        masks = (torch.rand(batch, shots, size, size, generator=generator) > 0.5).float()
    elif mask == "full":
        masks = torch.ones(batch, shots, size, size)
    else:
        masks = torch.zeros(batch, shots, size, size)
        masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    query_mask = torch.zeros(batch, size, size, dtype=torch.long)
    query_mask[:, size // 3 : 2 * size // 3, size // 4 : 3 * size // 4] = 1
    return (query.to(device), supports.to(device), masks.to(device), query_mask.to(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(functions: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn (a, b, a, b, ...) so that a change in
    machine load hits all of them alike; ``warmup`` rounds are not recorded."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_line(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    return (f"{name}; {os.cpu_count()} logical CPUs, {threads} threads; torch {torch.__version__}; "
            f"{isa_line()}")


# The caps that make an AVX-512 machine compute like an AVX2 one (PyTorch's own kernels,
# oneDNN, MKL); a table names the ones in force.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_line() -> str:
    caps = ", ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))
    return (f"get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}; "
            f"caps: {caps or 'none'}")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_model(model: str, backbone: str, shot: int, size: int):
    """Our model with random weights (speed does not depend on the values)."""
    if model == "hsnet":
        from fss.models import HSNet

        return HSNet(backbone=backbone, weights=None)
    if model == "hdmnet":
        from fss.models import HDMNet
        from fss.models.pspnet import check_input_size

        strict = True
        try:
            check_input_size(size, size, strict=True)
        except ValueError:
            strict = False  # tiny smoke-test sizes
        return HDMNet(backbone=backbone, weights=None, shot=shot, strict_size=strict)
    raise SystemExit(f"unknown model {model!r}; accepted: hsnet, hdmnet")


def on_references(function: Callable) -> Callable:
    """``function`` run with every kernel of ``fss.ops`` on its straightforward reference
    (``fss.ops.fast_paths(False)``): the "before" of the speed work, same weights and
    inputs."""
    from fss.ops import fast_paths

    def run(*args, **kwargs):
        with fast_paths(False):
            return function(*args, **kwargs)

    return run


def compile_model(net, mode: str | None = None):
    """``torch.compile`` (in place) every trainable child, as ``model.compile: true`` does."""
    from fss.lightning.few_shot_module import compile_trainable_children

    compile_trainable_children(net, mode=mode)
    return net


def add_worker_arguments(parser) -> None:
    """The hidden flags of one configuration's worker process (see run_configurations)."""
    import argparse

    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--shot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--malloc", default="retain", choices=["retain", "default"],
                        help="retain: keep freed memory in the process (fss.utils.memory, as "
                             "run.py does), for every implementation timed alike; default: "
                             "glibc's own thresholds")


class Configuration(NamedTuple):
    """What every benchmark worker times: the network and one batch of episodes."""

    device: torch.device
    net: torch.nn.Module
    query: torch.Tensor
    supports: torch.Tensor
    masks: torch.Tensor
    query_mask: torch.Tensor
    autocast: contextlib.AbstractContextManager


def prepare_configuration(args, training: bool) -> Configuration:
    """A configuration's worker set-up, shared by the benchmarks: the allocator setting (before
    anything is allocated), threads, the network on its device in train or eval mode (compiled
    with ``--compile``), the episodes, and the autocast context of ``--precision``."""
    if args.malloc == "retain":
        from fss.utils.memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build_model(args.model, args.backbone, args.shot, args.size).to(device).train(training)
    if args.compile:
        compile_model(net)
    query, supports, masks, query_mask = episode(args.batch, args.shot, args.size, args.mask,
                                                 device=args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    return Configuration(device, net, query, supports, masks, query_mask, autocast)


def run_configurations(script: str, args, extra: list[str], seconds_key: str,
                       unit: str) -> list[dict]:
    """Runs ``script --single`` once per (model, backbone, shot, size) in a fresh process, so
    each configuration's peak resident memory is its own; returns the rows they print."""
    import json
    import subprocess
    import sys

    rows = []
    for model in args.models:
        for backbone in args.backbones:
            for shot in args.shots:
                for size in args.sizes or DEFAULT_SIZES.get(model, [400]):
                    command = [
                        sys.executable, script, "--single", "--model", model, "--backbone", backbone,
                        "--shot", str(shot), "--size", str(size), "--device", args.device,
                        "--threads", str(args.threads), "--batch", str(args.batch),
                        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                        "--mask", args.mask, "--precision", args.precision,
                        "--malloc", args.malloc,
                    ]
                    command += ["--compile"] if args.compile else []
                    command += ["--reference"] if args.reference else []
                    done = subprocess.run(command + extra, capture_output=True, text=True)
                    name = f"# {model} {backbone} {shot}-shot {size}"
                    if done.returncode != 0:
                        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                        print(f"{name}: failed: {tail[0]}", file=sys.stderr)
                        continue
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"{name}²: {rows[-1][seconds_key]:.3f} {unit}", file=sys.stderr)
    return rows
