"""Share of end-to-end inference time spent outside the frozen backbone (fusion + decoder).

For each backbone, image size and batch size: the backbone's forward, then the fusion head's
forward with K class names (logits resized to the image size, as ``FusionerModel.forward`` does),
split into the joint fusion transformer and the rest (decoder, normalisation, scoring, resize).
Text embeddings are random unit vectors (encoded once per vocabulary in real use). Weights are
random: timing does not depend on them.

Default grid: DINO ViT-S/16 and ViT-B/16 at 224 and 448, batch 1 and 8, default decoder; then CLIP
ViT-L/14 at 224, batch 8, with the default decoder (target: fusion + decoder <= 20% of the
backbone's time) and the ``paper`` decoder. Warm-up runs at batch 1 (cheap, and it is what
initialises the kernels); on a CPU the defaults time each configuration once (about 4 minutes on
one core, ``--threads 1``). GPU-sized run::

    python benchmarks/head_share.py --repeats 20 --large-repeats 20
"""

from __future__ import annotations

import argparse
import time

import torch
from common import Bench, add_common_args, make_head, markdown_table, median, ms, report, setup, stage
from torch import Tensor
from torch.nn import functional as F

from fusioner.adapters import VisionAdapter, create_vision
from fusioner.model import FusionHead


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["dino_vits16", "dino_vitb16"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--large", default="clip_vitl14", help="the large backbone ('' to skip it)")
    p.add_argument("--large-size", type=int, default=224)
    p.add_argument("--large-batch", type=int, default=8)
    p.add_argument("--large-decoders", nargs="+", default=["default", "paper"])
    p.add_argument("--classes", type=int, default=20, help="K class names per image (PASCAL VOC: 20)")
    p.add_argument("--text-dim", type=int, default=768, help="text embedding width (BERT, CLIP-L: 768)")
    p.add_argument("--preset", default="base")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--large-repeats", type=int, default=1)
    add_common_args(p)
    return p.parse_args()


def time_config(
    vision: VisionAdapter, head: FusionHead, images: Tensor, text: Tensor, repeats: int, bench: Bench
) -> dict:
    """Seconds per batch: backbone, whole head, and the head's fusion transformer alone.

    images ``b 3 s s``, text ``k ct``; the head's logits come out at ``s x s``.
    """
    size = tuple(images.shape[-2:])
    out1 = vision(images[:1])  # warm-up at batch 1: kernels, threads, caches
    head(out1.tokens, out1.grid, text, size)
    backbone = median(bench.measure(lambda: vision(images), repeats=repeats))
    out = vision(images)
    text_b = text.expand(len(images), -1, -1).to(out.tokens.dtype)
    whole = median(bench.measure(lambda: head(out.tokens, out.grid, text, size), repeats=repeats))
    fusion = median(bench.measure(lambda: head.fusion(out.tokens, text_b), repeats=repeats))
    return {"backbone": backbone, "head": whole, "fusion": fusion, "grid": out.grid}


def main() -> None:
    args = parse_args()
    bench = setup(args)
    device, env = bench.device, bench.environment()
    grid = [(v, s, b) for v in args.backbones for s in args.sizes for b in args.batches]
    plan = [(*point, "default", args.repeats, False) for point in grid]
    if args.large:
        large = (args.large, args.large_size, args.large_batch)
        plan += [(*large, decoder, args.large_repeats, True) for decoder in args.large_decoders]

    rows, large_shares = [], {}
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(args.classes, args.text_dim, generator=generator), dim=-1).to(device)
    visions, start = {}, time.perf_counter()
    with torch.inference_mode(), bench.autocast():
        for name, size, batch, decoder, repeats, is_large in plan:
            if name not in visions:
                visions.clear()  # one backbone in memory at a time
                with stage(f"building {name}"):
                    visions[name] = create_vision(name, "random").to(device)
            vision = visions[name]
            head = make_head(vision.embed_dim, args.text_dim, args.preset, decoder).to(device).eval()
            with stage(f"{name} {size}px batch {batch} ({decoder} decoder)"):
                images = torch.rand(batch, 3, size, size, device=device)
                t = time_config(vision, head, images, text, repeats, bench)
            share = t["head"] / (t["backbone"] + t["head"])
            if is_large:
                large_shares[decoder] = t["head"] / t["backbone"]
            rows.append(
                [
                    name, size, batch, f"{t['grid'][0]}x{t['grid'][1]}", decoder, ms(t["backbone"]),
                    ms(t["fusion"]), ms(t["head"] - t["fusion"]), ms(t["head"]), f"{share:.1%}",
                    f"{t['head'] / t['backbone']:.0%}",
                ]
            )  # fmt: skip
    table = markdown_table(
        [
            "backbone", "image", "batch", "grid", "decoder", "backbone (ms)", "fusion (ms)",
            "decoder + scoring (ms)", "head (ms)", "head share of end-to-end", "head / backbone",
        ],
        rows,
    )  # fmt: skip
    lines = [
        f"Setup: random weights, head preset {args.preset}, K = {args.classes} names, text width "
        f"{args.text_dim}; times per batch; backbone and head timed {args.repeats} time(s) "
        f"({args.large}: {args.large_repeats}) after a warm-up at batch 1; total "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        table,
        "",
    ]
    for decoder, ratio in large_shares.items():
        verdict = "met" if ratio <= 0.2 else "MISSED"
        target = f"target <= 20%: {verdict}" if decoder == "default" else "no target"
        lines.append(
            f"- {args.large} {args.large_size}px batch {args.large_batch}, {decoder} decoder: fusion + "
            f"decoder = {ratio:.0%} of the backbone's time ({target})"
        )
    report("Head share of inference time (head_share.py)", env, "\n".join(lines), results=bench.results)


if __name__ == "__main__":
    main()
