"""Inference time against the number of class names K: one pass with K names vs K passes of one.

The backbone runs once per image either way (its features are the same), so both variants share
one timed backbone pass; the head runs once with all K class tokens, or K times with one. The
head's output is resized to the image size, as ``FusionerModel.forward`` does. Text embeddings are
random unit vectors: a vocabulary is encoded once per adapter and cached, so it costs nothing per
image. On a CPU the K-passes column for large K is extrapolated from ``--max-passes`` measured
passes (each pass is the same work); on a GPU pass ``--max-passes 171`` to measure them all.

CPU defaults take about a minute on one core (``--threads 1``). GPU-sized run::

    python benchmarks/inference_k.py --image-size 448 --batch-size 8 --repeats 20 --max-passes 171
"""

from __future__ import annotations

import argparse

import torch
from common import add_common_args, make_head, markdown_table, median, ms, report, setup, stage
from torch.nn import functional as F

from fusioner.adapters import create_vision


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default="dino_vitb16")
    p.add_argument("--vision-weights", default="random", help="'random' or a weights id ('' = default)")
    p.add_argument("--text-dim", type=int, default=768, help="text embedding width (BERT, CLIP-L: 768)")
    p.add_argument("--preset", default="base")
    p.add_argument("--decoder", default="default", choices=("default", "paper"))
    p.add_argument("--fusion-attention", default="decoupled", choices=("decoupled", "joint"))
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20, 80, 171])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-passes", type=int, default=5, help="one-name passes timed per K (then scaled)")
    add_common_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    bench = setup(args)
    device, env = bench.device, bench.environment()
    with stage(f"building {args.vision} + head ({args.preset}, {args.fusion_attention}, {args.decoder})"):
        vision = create_vision(args.vision, args.vision_weights or None).to(device)
        head = make_head(vision.embed_dim, args.text_dim, args.preset, args.decoder, args.fusion_attention)
        head = head.to(device).eval()
    size = (args.image_size, args.image_size)
    images = torch.rand(args.batch_size, 3, *size, device=device)
    generator = torch.Generator().manual_seed(0)

    with torch.inference_mode(), bench.autocast():
        with stage("backbone"):
            times = bench.measure(lambda: vision(images), warmup=args.warmup, repeats=args.repeats)
            backbone_s = median(times)
            out = vision(images)
        rows, one_pass = [], {}
        for k in args.ks:
            with stage(f"K = {k}"):
                text = F.normalize(torch.randn(k, args.text_dim, generator=generator), dim=-1).to(device)
                times = bench.measure(
                    lambda text=text: head(out.tokens, out.grid, text, size),
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
                one_pass[k] = median(times)
                n = min(k, args.max_passes)

                def passes(text=text, n=n):
                    for i in range(n):
                        head(out.tokens, out.grid, text[i : i + 1], size)

                k_passes = median(bench.measure(passes, repeats=max(1, args.repeats // 2)))
                k_passes *= k / n
            base = one_pass[args.ks[0]]
            rows.append(
                [
                    k,
                    ms(one_pass[k]),
                    ms(k_passes) + ("" if n == k else f" (from {n})"),
                    f"{k_passes / one_pass[k]:.1f}x",
                    ms(backbone_s + one_pass[k]),
                    ms(backbone_s + k_passes),
                    f"{one_pass[k] / base:.2f}",
                    f"{(backbone_s + one_pass[k]) / (backbone_s + base):.2f}",
                ]
            )
    k0 = args.ks[0]
    table = markdown_table(
        [
            "K", "head, 1 pass (ms)", "head, K passes (ms)", "1 pass faster by", "end-to-end, 1 pass (ms)",
            "end-to-end, K passes (ms)", f"head vs K={k0}", f"end-to-end vs K={k0}",
        ],
        rows,
    )  # fmt: skip
    lines = [
        f"Setup: {args.vision} ({args.vision_weights or 'default'} weights), "
        f"head preset {args.preset}, {args.fusion_attention} attention, {args.decoder} decoder, "
        f"text width {args.text_dim}, image {args.image_size}, "
        f"batch {args.batch_size}, "
        f"grid {out.grid[0]}x{out.grid[1]}; backbone {ms(backbone_s)} ms per batch (once per image in both "
        f"variants); medians of {args.repeats} after {args.warmup} warm-up.",
        "",
        table,
    ]
    if 20 in one_pass and 1 in one_pass:
        e2e = (backbone_s + one_pass[20]) / (backbone_s + one_pass[1])
        verdict = "met" if e2e <= 1.5 else "MISSED"
        lines += [
            "",
            f"- K=20 in one pass vs K=1, end to end: {e2e:.2f}x (target <= 1.5x: {verdict}); "
            f"head alone: {one_pass[20] / one_pass[1]:.2f}x",
        ]
    title = "Inference time vs number of names K (inference_k.py)"
    report(title, env, "\n".join(lines), results=bench.results)


if __name__ == "__main__":
    main()
