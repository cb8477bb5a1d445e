"""Base-class trunk benchmark: seconds per training step at each image size (Markdown).

    python benchmarks/bench_trunk.py                         # resnet18, batch 16, 112² and 80²
    python benchmarks/bench_trunk.py --sizes 112 96 80 64 --repeats 10

One step = the trunk stage's step: ``PyramidSegmenter`` forward on synthetic scenes, the
cross-entropy (ignore 255), backward and the fused AdamW step, as ``conf/pretrain/default.yaml``
sets it. The sizes are timed in turn (112², 80², 112², 80², ...), so a change in machine load
hits all of them alike; the table gives medians and each size's cost relative to the first.
This is what ``pretrain.low_resolution`` saves per early epoch. Not a test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine_line, markdown_table, median, time_alternating  # noqa: E402

from fss.data import SyntheticSource  # noqa: E402
from fss.data.transforms import IGNORE_INDEX  # noqa: E402
from fss.lightning.segmentation_module import downsample  # noqa: E402
from fss.models.segmenter import PyramidSegmenter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 80])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--head-channels", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = SyntheticSource(image_size=max(args.sizes), level="hard", colour="instance")
    dataset = source.semantic("train", 0, args.batch, 0)
    samples = [dataset[i] for i in range(args.batch)]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    net = PyramidSegmenter(args.backbone, len(source.base_classes(0)) + 1,
                           head_channels=args.head_channels)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    # The scenes are rendered at the largest size and shrunk as the trunk stage shrinks them.
    batches = {size: downsample(images, labels, size) for size in args.sizes}

    def step(size: int) -> None:
        batch_images, batch_labels = batches[size]
        loss = F.cross_entropy(net(batch_images), batch_labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = time_alternating({size: (lambda s=size: step(s)) for size in args.sizes},
                             args.warmup, args.repeats, torch.device("cpu"))
    first = median(times[args.sizes[0]])
    rows = [{"size": size, "step_s": median(times[size]), "relative": median(times[size]) / first}
            for size in args.sizes]
    print(f"Machine: {machine_line('cpu', torch.get_num_threads())}; {args.backbone}, batch "
          f"{args.batch}; median of {args.repeats} alternating steps\n")
    print(markdown_table(["size", "s / step", "relative"],
                         [[f"{r['size']}²", f"{r['step_s']:.3f}", f"{r['relative']:.2f}"]
                          for r in rows]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
