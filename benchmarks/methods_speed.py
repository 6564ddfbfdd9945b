"""Inference images/s on the CPU of each design (fusioner/methods) at the CCP setting.

Each design's model is built from ``configs/folder/ccp.yaml`` (EfficientNet-Lite0 + MiniLM, image
320, head 128 wide x 2 blocks) with untrained weights (speed does not depend on them), then
``model.logits`` runs the one inference path over random 400 x 600 photos and all 58 CCP names,
one image at a time, after one warm-up image. Training time per design is in QUALITY.md's rows
(``benchmarks/quality.py`` records each row's CPU seconds).

    OMP_NUM_THREADS=1 python benchmarks/methods_speed.py --images 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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
def images_per_second(overrides: list[str], images: int, vocabulary: list[str]) -> float:
    model = FusionerModel.from_config(load_config(CCP_CONFIG, overrides)).eval()
    photos = torch.rand(images + 1, 3, 400, 600, generator=torch.Generator().manual_seed(0))
    model.logits(photos[0], vocabulary)  # warm-up: text embeddings cached, kernels chosen
    start = time.perf_counter()
    for photo in photos[1:]:
        model.logits(photo, vocabulary)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS))
    args = parser.parse_args()
    vocabulary = names()
    for design in args.designs:
        rate = images_per_second(DESIGNS[design], args.images, vocabulary)
        print(json.dumps({"design": design, "images_per_s": round(rate, 2), "names": len(vocabulary)}))


if __name__ == "__main__":
    main()
