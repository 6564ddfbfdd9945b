"""Inference images/s on the CPU of each design (fusioner/methods) at the CCP setting.

Each design's model is built from ``configs/folder/ccp.yaml`` (EfficientNet-Lite0 + MiniLM, image
320, head 128 wide x 2 blocks) with untrained weights (speed does not depend on them), then
``model.logits`` runs the one inference path over random 400 x 600 photos and all 58 CCP names,
one image at a time, after one warm-up image. Training time per design is in QUALITY.md's rows
(``benchmarks/quality.py`` records each row's CPU seconds).

    python benchmarks/methods_speed.py --threads 1 --images 20      # about 3 minutes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import Bench, add_common_args, markdown_table, report, setup

from fusioner.config import load_config
from fusioner.model import FusionerModel

ROOT = Path(__file__).resolve().parents[1]
CCP_CONFIG = ROOT / "configs" / "folder" / "ccp.yaml"
DESIGNS = {
    "fusioner": [],
    "zegclip": ["method=zegclip"],
    "zegformer": ["method=zegformer"],
    "zegformer+spectral-groups": ["method=zegformer", "zegformer_grouping=spectral"],
    "fusioner+spectral": ["refine=spectral"],
}


def names() -> list[str]:
    classes = ROOT.parent / "shared" / "data" / "ccp" / "classes.txt"
    if classes.is_file():
        return [n.strip() for n in classes.read_text().splitlines()[1:] if n.strip()]
    return [f"garment {i}" for i in range(58)]


@torch.no_grad()
def seconds_per_image(bench: Bench, overrides: list[str], images: int, vocabulary: list[str]) -> float:
    model = FusionerModel.from_config(load_config(CCP_CONFIG, overrides)).eval()
    photos = torch.rand(images, 3, 400, 600, generator=torch.Generator().manual_seed(0))
    # One warm-up image: the text embeddings get cached and kernels chosen.
    times = bench.measure(lambda: [model.logits(p, vocabulary) for p in photos], warmup=1, repeats=1)
    return times[0] / images


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS))
    add_common_args(parser)
    args = parser.parse_args()
    bench = setup(args)
    if bench.device.type != "cpu":
        raise SystemExit("methods_speed.py measures the CPU: pass --device cpu")
    env, vocabulary = bench.environment(), names()
    rows = []
    for design in args.designs:
        seconds = seconds_per_image(bench, DESIGNS[design], args.images, vocabulary)
        rows.append([design, f"{1 / seconds:.2f}", f"{seconds * 1e3:,.0f}"])
        print(f"{design}: {1 / seconds:.2f} images/s", flush=True)
    table = markdown_table(["design", "images/s", "ms per image"], rows)
    setting = f"{args.images} random 400x600 photos, all {len(vocabulary)} CCP names in one pass each."
    body = f"{setting}\n\n{table}"
    report("Inference speed of each design on CPU (methods_speed.py)", env, body, results=bench.results)


if __name__ == "__main__":
    main()
