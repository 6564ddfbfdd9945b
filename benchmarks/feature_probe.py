"""What the frozen features allow: a supervised probe over every name of a folder dataset.

A per-token linear classifier (``--probe linear``) or a two-layer 3x3 conv net (``--probe conv``)
over the vision adapter's tokens, trained with softmax cross-entropy on every name of the dataset
(background included, nothing held out) on ``train`` and scored on ``test`` as GZSS is (dataset-level
IoU, names absent from both target and prediction left out of the mean). No name embedding is
involved: this is the ceiling a fusion head that must *also* generalise to unseen names works
under, on the same tokens, so a GZSS target above it is a target for the backbone, not the head.

    python benchmarks/feature_probe.py                                   # CCP, the adapter's tokens
    python benchmarks/feature_probe.py --feature-indices 3               # stride-16 map only
    python benchmarks/feature_probe.py --probe conv --epochs 30

Prints one markdown row and appends it to the committed record ``benchmarks/probe_results.jsonl``
(QUALITY.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.adapters import create_vision
from fusioner.adapters.timm_vision import TimmVision
from fusioner.data.folder import FolderDataset
from fusioner.data.transforms import resize
from fusioner.engine.metrics import GZSSMeter
from fusioner.errors import FusionerError
from fusioner.model.losses import resize_labels

HERE = Path(__file__).resolve().parent


def encode(vision, dataset: FolderDataset, size: int) -> tuple[Tensor, Tensor]:
    """Every image at ``size x size`` -> tokens ``b c gh gw`` (fp16) and masks ``b s s`` at size / 4."""
    tokens, masks = [], []
    for i in range(len(dataset)):
        sample = resize(dataset[i], size)
        out = vision(sample["image"][None])
        tokens.append(rearrange(out.tokens, "1 (h w) c -> 1 c h w", h=out.grid[0]).half())
        masks.append(resize_labels(sample["mask"][None], (size // 4,) * 2)[0].to(torch.uint8))
    return torch.cat(tokens), torch.stack(masks)


def make_probe(kind: str, channels: int, classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(channels, classes, 1)
    width = 256
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.GroupNorm(32, width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.GroupNorm(32, width),
        nn.ReLU(),
        nn.Conv2d(width, classes, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "ccp"))
    parser.add_argument("--vision", default="efficientnet_lite0")
    parser.add_argument("--feature-indices", type=int, nargs="*", help="timm CNNs: the maps to stack")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--probe", choices=("linear", "conv"), default="linear")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--unseen", default="jeans,purse,coat,sweater,sandals,sunglasses,t-shirt,skirt")
    parser.add_argument("--results", default=str(HERE / "probe_results.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        vision = create_vision(args.vision).eval()
        if args.feature_indices is not None:
            if not isinstance(vision, TimmVision):
                parser.error(f"--feature-indices: {args.vision} is not a timm CNN")
            vision = TimmVision(vision.name, vision.model, feature_indices=args.feature_indices).eval()
        train, test = FolderDataset(args.data, "train"), FolderDataset(args.data, "test")
    except (FusionerError, ValueError) as e:
        parser.error(str(e))
    names = train.vocabulary
    start = time.process_time()
    x_train, y_train = encode(vision, train, args.image_size)
    x_test, y_test = encode(vision, test, args.image_size)
    # Standardised channels: the maps stacked into one token differ in scale by 10x.
    mean = x_train.float().mean((0, 2, 3), keepdim=True)
    std = x_train.float().std((0, 2, 3), keepdim=True) + 1e-5

    probe = make_probe(args.probe, x_train.shape[1], len(names) + 1)
    batch, n = 16, len(x_train)
    steps = args.epochs * (n // batch)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(args.epochs):
        order = torch.randperm(n)
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            x, y = (x_train[idx].float() - mean) / std, y_train[idx].long()
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            logits = F.interpolate(probe(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()

    unseen = [u for u in args.unseen.split(",") if u]
    meter = GZSSMeter(names, unseen)
    with torch.no_grad():
        for i in range(len(x_test)):
            logits = probe((x_test[i : i + 1].float() - mean) / std)
            pred = F.interpolate(logits, size=y_test.shape[-2:], mode="bilinear", align_corners=False).argmax(
                1
            )
            meter.update(pred[0], y_test[i].long())
    m = meter.compute()
    row = {
        "data": Path(args.data).name,
        "vision": args.vision,
        "tokens": f"{vision.embed_dim} ch, feature_indices {list(getattr(vision, 'feature_indices', ()))}",
        "image_size": args.image_size,
        "probe": args.probe,
        "epochs": args.epochs,
        "train_ce": round(loss.item(), 3),
        "miou_all": round(m["miou"], 3),
        "miou_seen": round(m["miou_seen"], 3),
        "miou_unseen": round(m["miou_unseen"], 3),
        "background_iou": round(m["per_class"]["background"], 3),
        "cpu_s": round(time.process_time() - start),
        "date": time.strftime("%Y-%m-%d"),
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
