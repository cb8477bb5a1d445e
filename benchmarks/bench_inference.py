"""Inference benchmark: seconds per episode and peak memory, as a Markdown table.

    python benchmarks/bench_inference.py                       # HSNet, every backbone, 1/5-shot, 400²
    python benchmarks/bench_inference.py --models hsnet --backbones resnet50 --shots 1 --size 400
    python benchmarks/bench_inference.py --device cuda         # on a GPU (also reports CUDA peak memory)
    python benchmarks/bench_inference.py --models hdmnet --backbones resnet50 --shots 1 5 --sizes 473 633

HDMNet sizes: 473 (PASCAL-5i, the default) and 633 (COCO-20i); both satisfy PSPNet's
(H - 1) % 8 == 0 rule. HDMNet is built with a random base learner (``weights=None``) and
``shot`` = the benchmarked K (its 5-shot model carries the trained ``kshot_rw``).

Random weights (no downloads): speed does not depend on the weight values. Each
configuration runs in a fresh subprocess so its peak resident memory is its own.
Not a test: numbers depend on the machine, which the table header names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(model: str, backbone: str, shot: int):
    import torch  # noqa: F401

    if model == "hsnet":
        from fss.models import HSNet

        return HSNet(backbone=backbone, weights=None)
    if model == "hdmnet":
        from fss.models import HDMNet

        return HDMNet(backbone=backbone, weights=None, shot=shot)
    raise SystemExit(f"unknown model {model!r}; accepted: hsnet, hdmnet")


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build(args.model, args.backbone, args.shot).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    size = args.size
    query = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    supports = torch.randn(args.batch, args.shot, 3, size, size, generator=generator).to(device)
    masks = (torch.rand(args.batch, args.shot, size, size, generator=generator) > 0.5).float().to(device)

    def episode():
        with torch.inference_mode():
            net.predict(query, supports, masks)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        episode()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        episode()
        times.append(time.perf_counter() - start)
    times.sort()
    result = {
        "model": args.model, "backbone": args.backbone, "shot": args.shot, "size": size,
        "batch": args.batch, "device": args.device, "threads": args.threads,
        "median_s": times[len(times) // 2] / args.batch, "min_s": times[0] / args.batch,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def machine_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
    return f"{name}; torch {torch.__version__}; {os.cpu_count()} logical CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hsnet"])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50", "resnet101"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="input sizes (default: 400 for HSNet, 473 for HDMNet; "
                             "HDMNet on COCO: 633)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--shot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        print(json.dumps(measure(args)))
        return

    default_size = {"hsnet": [400], "hdmnet": [473]}
    rows = []
    for model in args.models:
        for backbone in args.backbones:
            for shot in args.shots:
                for size in args.sizes or default_size.get(model, [400]):
                    command = [
                        sys.executable, __file__, "--single", "--model", model, "--backbone", backbone,
                        "--shot", str(shot), "--size", str(size), "--device", args.device,
                        "--threads", str(args.threads), "--batch", str(args.batch),
                        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                    ]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                        print(f"# {model} {backbone} {shot}-shot {size}: failed: {tail[0]}", file=sys.stderr)
                        continue
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"# {model} {backbone} {shot}-shot {size}²: {rows[-1]['median_s']:.3f} s", file=sys.stderr)

    print(f"\nMachine: {machine_line(args.device)}; {args.threads} threads; batch {args.batch}\n")
    cuda = args.device.startswith("cuda")
    header = "| model | backbone | shot | size | s / episode (median) | peak RSS (MiB) |"
    if cuda:
        header += " peak CUDA (MiB) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        line = (f"| {r['model']} | {r['backbone']} | {r['shot']} | {r['size']}² | "
                f"{r['median_s']:.3f} | {r['peak_rss_mib']:.0f} |")
        if cuda:
            line += f" {r['peak_cuda_mib']:.0f} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
