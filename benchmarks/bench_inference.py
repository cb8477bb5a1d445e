"""Inference benchmark: seconds per episode and peak memory, as a Markdown table.

    python benchmarks/bench_inference.py                       # HSNet, every backbone, 1/5-shot, 400²
    python benchmarks/bench_inference.py --models hsnet --backbones resnet50 --shots 1 5
    python benchmarks/bench_inference.py --models hsnet --backbones resnet50 --compare /tmp/official_hsnet
    python benchmarks/bench_inference.py --models hdmnet --backbones resnet50 --shots 1 5 --sizes 473 633
    /path/to/hdmnet-venv/bin/python benchmarks/bench_inference.py --models hdmnet --backbones resnet50 --compare /tmp/official_hdmnet
    python benchmarks/bench_inference.py --reference            # also time the straightforward path
    python benchmarks/bench_inference.py --device cuda --precision bf16   # on a GPU

``--compare PATH`` times the official code in the same process, on the same inputs,
alternating runs with ours, and reports the ratio: for ``--models hsnet`` a checkout of
juhongm999/hsnet at PATH, for ``--models hdmnet`` a checkout of Pbihao/HDMNet, run from a venv
with mmcv 1.6.1 / mmsegmentation 0.27.0 (``docs/performance.md`` gives the commands; see
``benchmarks/official.py``). Both checkouts are kept outside this repository. Our model is given the official
model's (random) weights, so the table also shows the largest |Δ logit| between the two and
the share of pixels where their predicted masks agree. ``--reference`` times the same
model with every kernel on its straightforward reference (``fss.ops.fast_paths(False)``,
docs/ops.md) the same way: the before/after of the speed work.

HDMNet sizes: 473 (PASCAL-5i, the default) and 633 (COCO-20i); both satisfy PSPNet's
(H - 1) % 8 == 0 rule. HDMNet is built with a random base learner and ``shot`` = the
benchmarked K. Masks (``--mask``): ``box`` (default, an object covering 25 % of the image),
``full`` (nothing masked out: the mask-pruned products gain nothing) or ``random`` pixels.

Random weights (no downloads): speed does not depend on the weight values. Each
configuration runs in a fresh subprocess so its peak resident memory is its own. Not a
test: numbers depend on the machine, which the table header names.
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
    """One configuration, in this process."""
    import torch

    device, net, query, supports, masks, _, autocast = common.prepare_configuration(
        args, training=False)
    functions = {}
    outputs = {}

    def ours():
        with torch.inference_mode(), autocast:
            outputs["ours"] = net.predict(query, supports, masks)

    functions["ours"] = ours
    official = None
    if args.compare:
        if args.model == "hsnet":
            from official import OfficialHSNet

            official = OfficialHSNet(args.compare, args.backbone, device)
            net.load_official_state_dict(official.state_dict())
        else:
            from official import OfficialHDMNet

            official = OfficialHDMNet(args.compare, net, device)

        def theirs():
            with torch.inference_mode(), autocast:
                outputs["official"] = official.predict(query, supports, masks)

        functions["official"] = theirs
    if args.reference:
        predict = common.on_references(net.predict)

        def straightforward():
            with torch.inference_mode(), autocast:
                outputs["reference"] = predict(query, supports, masks)

        functions["reference"] = straightforward

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = common.time_alternating(functions, args.warmup, args.repeats, device)
    result = {
        "model": args.model, "backbone": args.backbone, "shot": args.shot, "size": args.size,
        "batch": args.batch, "device": args.device, "threads": args.threads, "mask": args.mask,
        "precision": args.precision, "compile": args.compile,
        "median_s": common.median(times["ours"]) / args.batch,
        "min_s": min(times["ours"]) / args.batch,
        "peak_rss_mib": common.peak_rss_mib(),
    }
    for name in ("official", "reference"):
        if name in times:
            result[f"{name}_median_s"] = common.median(times[name]) / args.batch
            result[f"{name}_mask_agreement"] = float(
                (outputs[name].long() == outputs["ours"].long()).float().mean())
    if official is not None:
        with torch.inference_mode():
            if args.model == "hsnet":
                theirs = official.logits(query, supports[:, 0], masks[:, 0])
                mine = net.per_shot_logits(query, supports[:, :1], masks[:, :1])[:, 0]
            else:
                theirs, mine = official.logits(query, supports, masks), net(query, supports, masks)
        result["official_max_abs_logit_diff"] = float((theirs - mine).abs().max())
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


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
    parser.add_argument("--mask", default="box", choices=common.MASKS)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="bf16: autocast (on a GPU; on a CPU it is slower than fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainable head")
    parser.add_argument("--compare", type=Path, metavar="PATH",
                        help="official HSNet checkout to time side by side")
    parser.add_argument("--reference", action="store_true",
                        help="also time the frozen straightforward implementation")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    common.add_worker_arguments(parser)
    args = parser.parse_args()

    if args.single:
        print(json.dumps(measure(args)))
        return

    extra = ["--compare", str(args.compare)] if args.compare else []
    rows = common.run_configurations(__file__, args, extra, "median_s", "s")

    print(f"\nMachine: {common.machine_line(args.device, args.threads)}; batch {args.batch}; "
          f"mask {args.mask}; precision {args.precision}; compile {args.compile}; malloc "
          f"{args.malloc}; median of "
          f"{args.repeats} alternating runs\n")
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def table(rows: list[dict], args: argparse.Namespace) -> str:
    headers = ["model", "backbone", "shot", "size", "ours s / episode"]
    if args.reference:
        headers += ["straightforward s / episode", "speed-up"]
    if args.compare:
        headers += ["official s / episode", "ours / official", "max abs Δlogit", "mask agreement"]
    headers += ["peak RSS (MiB)"]
    cuda = args.device.startswith("cuda")
    if cuda:
        headers += ["peak CUDA (MiB)"]
    lines = []
    for r in rows:
        line = [r["model"], r["backbone"], str(r["shot"]), f"{r['size']}²", f"{r['median_s']:.3f}"]
        if args.reference:
            line += [f"{r['reference_median_s']:.3f}", f"{r['reference_median_s'] / r['median_s']:.2f}×"]
        if args.compare:
            line += [f"{r['official_median_s']:.3f}", f"{r['median_s'] / r['official_median_s']:.2f}",
                     f"{r['official_max_abs_logit_diff']:.1e}", f"{100 * r['official_mask_agreement']:.2f} %"]
        line += [f"{r['peak_rss_mib']:.0f}"]
        if cuda:
            line += [f"{r['peak_cuda_mib']:.0f}"]
        lines.append(line)
    return common.markdown_table(headers, lines)


if __name__ == "__main__":
    main()
