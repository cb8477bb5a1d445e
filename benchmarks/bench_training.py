"""Training benchmark: seconds per optimizer step, episodes / s and peak memory (Markdown).

    python benchmarks/bench_training.py --models hsnet --backbones resnet50 --batch 1
    python benchmarks/bench_training.py --models hdmnet --backbones resnet50 --sizes 473 --reference
    python benchmarks/bench_training.py --models hsnet --backbones resnet50 --batch 2 --compare /tmp/official_hsnet
    python benchmarks/bench_training.py --device cuda --precision bf16 --batch 5    # HSNet per-GPU batch
    python benchmarks/bench_training.py --device cuda --precision bf16 --models hdmnet --batch 4

One step = ``training_loss`` forward, backward and the optimizer step (Adam for HSNet,
AdamW for HDMNet, every trainable parameter), in ``train()`` mode (dropout on, frozen
backbones and BatchNorms in eval, as the models define). The paper's per-GPU batches:
HSNet 5 (20 on 4 GPUs), HDMNet 4 (PASCAL) / 6 (COCO). ``--precision bf16`` runs the
forward under bf16 autocast (Lightning's ``bf16-mixed``). ``--reference`` also times the
forward with every kernel on its straightforward reference (``fss.ops.fast_paths(False)``,
docs/ops.md) with the same backward and step.
Peak memory: resident set of the process (CPU) and ``max_memory_allocated`` (CUDA). Each
configuration runs in its own subprocess. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    import torch

    device, net, query, supports, masks, query_mask, autocast = common.prepare_configuration(
        args, training=True)
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = (torch.optim.Adam(parameters, lr=1e-3) if args.model == "hsnet"
                 else torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01))

    def step(loss_function):
        def run():
            with autocast:
                loss = loss_function()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    functions = {"ours": step(lambda: net.training_loss(query, supports, masks, query_mask)["loss"])}
    if args.reference:
        loss = common.on_references(net.training_loss)
        functions["reference"] = step(lambda: loss(query, supports, masks, query_mask)["loss"])
    if args.compare:
        if args.model != "hsnet" or args.shot != 1:
            raise SystemExit("--compare: the official training step is timed for HSNet 1-shot "
                             "(HSNet trains 1-shot)")
        from official import OfficialHSNet

        official = OfficialHSNet(args.compare, args.backbone, device)
        net.load_official_state_dict(official.state_dict())
        official_step = official.training_step()
        functions["official"] = lambda: official_step(query, supports[:, 0], masks[:, 0],
                                                      (query_mask == 1).long())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = common.time_alternating(functions, args.warmup, args.repeats, device)
    result = {
        "model": args.model, "backbone": args.backbone, "shot": args.shot, "size": args.size,
        "batch": args.batch, "device": args.device, "threads": args.threads,
        "precision": args.precision, "compile": args.compile,
        "step_s": common.median(times["ours"]),
        "episodes_per_s": args.batch / common.median(times["ours"]),
        "peak_rss_mib": common.peak_rss_mib(),
    }
    if "reference" in times:
        result["reference_step_s"] = common.median(times["reference"])
    if "official" in times:
        result["official_step_s"] = common.median(times["official"])
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hsnet", "hdmnet"])
    parser.add_argument("--backbones", nargs="+", default=["resnet50"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1])
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="default: 400 for HSNet, 473 for HDMNet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask", default="box", choices=common.MASKS)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainable parts")
    parser.add_argument("--reference", action="store_true",
                        help="also time the frozen straightforward implementation")
    parser.add_argument("--compare", type=Path, metavar="PATH",
                        help="official HSNet checkout whose training step is timed side by side")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    common.add_worker_arguments(parser)
    args = parser.parse_args()

    if args.single:
        print(json.dumps(measure(args)))
        return

    extra = ["--compare", str(args.compare)] if args.compare else []
    rows = common.run_configurations(__file__, args, extra, "step_s", "s / step")

    print(f"\nMachine: {common.machine_line(args.device, args.threads)}; batch {args.batch}; "
          f"mask {args.mask}; precision {args.precision}; compile {args.compile}; median of "
          f"{args.repeats} alternating steps\n")
    headers = ["model", "backbone", "shot", "size", "batch", "s / step", "episodes / s"]
    if args.reference:
        headers += ["straightforward s / step", "speed-up"]
    if args.compare:
        headers += ["official s / step", "ours / official"]
    headers += ["peak RSS (MiB)"] + (["peak CUDA (MiB)"] if args.device.startswith("cuda") else [])
    lines = []
    for r in rows:
        line = [r["model"], r["backbone"], str(r["shot"]), f"{r['size']}²", str(r["batch"]),
                f"{r['step_s']:.3f}", f"{r['episodes_per_s']:.2f}"]
        if args.reference:
            line += [f"{r['reference_step_s']:.3f}", f"{r['reference_step_s'] / r['step_s']:.2f}×"]
        if args.compare:
            line += [f"{r['official_step_s']:.3f}", f"{r['step_s'] / r['official_step_s']:.2f}"]
        line += [f"{r['peak_rss_mib']:.0f}"]
        if "peak_cuda_mib" in r:
            line += [f"{r['peak_cuda_mib']:.0f}"]
        lines.append(line)
    print(common.markdown_table(headers, lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
