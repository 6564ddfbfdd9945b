"""GPU figures for the paper configs in one call: training and inference speed, memory, attention kernel.

Random weights at real size (speed does not depend on the weights), every figure from one process:

- **cached training**: steps/s and images/s of the head's training step (forward, BCE + dice on
  logits at the image size, backward, AdamW) fed with random patch tokens of the cached shape, for
  the paper head (joint fusion, released decoder, ``RELEASED`` in fusioner/model/head.py) and the
  default head (decoupled), at 448 px with the token grids of CLIP ViT-B/16 (28 x 28 x 768, text
  512) and ViT-L/14 (32 x 32 x 1024, text 768), batch 8 and 32, fp32 and bf16 autocast, and
  ``torch.compile`` off / on (on for bf16 batch 8 only: compiling costs tens of seconds a config);
- **inference**: images/s at K = 1, 20, 150, 847 names, one image at a time as evaluation runs,
  through the library's path (``fusioner.inference``: head in passes, best name per pixel at the
  image size, ``fusioner.labels``), with the frozen backbone (a random timm ViT of the same size)
  and without it (cached tokens); the ratio says how far inference is from the backbone's forward,
  which it can never beat;
- **peak memory** per configuration (CUDA only) and **which SDPA kernel** ran in the fusion blocks
  (from the profiler's op names: flash, memory-efficient, cuDNN or math).

A configuration that runs out of memory is reported as OOM and the run goes on; configurations
left when ``--budget-s`` is spent are reported as skipped. The GPU run (about 5 minutes on one
H100-class GPU)::

    python benchmarks/gpu.py

On a CPU, ``--device cpu --tiny`` runs every code path at toy sizes in seconds (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from common import add_common_args, markdown_table, report, setup
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F

from fusioner.config import load_config
from fusioner.inference import _head_logits
from fusioner.labels import best_name
from fusioner.model import FusionHead, HeadConfig
from fusioner.model import head as head_module


@dataclass(frozen=True)
class Backbone:
    name: str
    patch: int
    dim: int
    depth: int
    heads: int
    text_dim: int


# CLIP's towers: ViT-B/16 (visual 768 wide, text 512) and ViT-L/14 (visual 1024, text 768).
BACKBONES = {
    "ViT-B/16": Backbone("ViT-B/16", 16, 768, 12, 12, 512),
    "ViT-L/14": Backbone("ViT-L/14", 14, 1024, 24, 16, 768),
}
TINY_BACKBONES = {
    "tiny-B": Backbone("tiny-B", 16, 32, 1, 2, 24),
    "tiny-L": Backbone("tiny-L", 16, 48, 1, 2, 32),
}
# The paper head: the released settings where this checkout knows them, else its closest rule.
PAPER = getattr(head_module, "RELEASED", {"fusion_attention": "joint", "decoder": "paper"})
KERNELS = {"flash": "flash", "efficient": "memory-efficient", "cudnn": "cuDNN", "math": "math"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes: every code path in seconds (CPU tests)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 20, 150, 847])
    p.add_argument("--train-names", type=int, default=2, help="names per training image (1 + negatives)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--images", type=int, default=10, help="timed inference images per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", default="auto", choices=("auto", "off", "both"), help="auto: both on CUDA")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip what is left after this many seconds")
    p.add_argument("--json", type=Path, default=None, help="also write every row as JSON here")
    add_common_args(p)
    return p.parse_args()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.end


def _head_config(kind: str, bb: Backbone, tiny: bool) -> HeadConfig:
    keys = {"preset": "tiny"} if tiny else {}
    if kind == "paper":
        keys.update(PAPER)
    return HeadConfig.from_config(load_config(None, **keys), bb.dim, bb.text_dim)


def _autocast(device: torch.device, precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _peak(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> float:
    """Seconds per call (wall clock, device synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A configuration's figures, or why there are none (out of memory goes on to the next one)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except RuntimeError as error:  # e.g. a compile failure: recorded, the run goes on
        return {"status": f"failed: {str(error).splitlines()[0][:80]}"}


def train_row(args, device, bb: Backbone, kind: str, batch: int, precision: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    grid = args.image_size // bb.patch
    head = FusionHead(_head_config(kind, bb, args.tiny)).to(device).train()
    step_head = torch.compile(head) if compiled else head
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    tokens = torch.randn(batch, grid * grid, bb.dim, device=device)
    text = F.normalize(torch.randn(batch, args.train_names, bb.text_dim, device=device), dim=-1)
    target = (
        torch.rand(batch, args.train_names, args.image_size, args.image_size, device=device) > 0.5
    ).float()
    size = (args.image_size, args.image_size)

    def step() -> None:
        with _autocast(device, precision):
            logits = step_head(tokens, (grid, grid), text, size=size).float()
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((2, 3)) + 1) / (prob.sum((2, 3)) + target.sum((2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _reset_peak(device)
    seconds = _time(step, args.warmup, args.steps, device)
    return {"steps_s": 1 / seconds, "images_s": batch / seconds, "peak": _peak(device)}


def _vit(bb: Backbone, image_size: int, device: torch.device) -> VisionTransformer:
    vit = VisionTransformer(
        img_size=image_size, patch_size=bb.patch, embed_dim=bb.dim, depth=bb.depth, num_heads=bb.heads,
        num_classes=0, class_token=True, pre_norm=True,
    )  # fmt: skip
    return vit.to(device).eval()


def infer_row(args, device, bb: Backbone, vit: VisionTransformer, kind: str, k: int, precision: str) -> dict:
    torch.manual_seed(0)
    grid = args.image_size // bb.patch
    model = SimpleNamespace(
        head=FusionHead(_head_config(kind, bb, args.tiny)).to(device).eval(), refiner=None
    )
    image = torch.rand(1, 3, args.image_size, args.image_size, device=device)
    text = F.normalize(torch.randn(k, bb.text_dim, device=device), dim=-1)
    size = (args.image_size, args.image_size)

    def tokens_of(x: torch.Tensor) -> torch.Tensor:
        return vit.forward_features(x)[:, vit.num_prefix_tokens :]

    def head_only(tokens: torch.Tensor) -> None:
        logits = _head_logits(model, tokens, (grid, grid), text, None, None, args.image_size)[0]
        best_name(logits.float(), size)

    with torch.no_grad(), _autocast(device, precision):
        cached = tokens_of(image)
        backbone = _time(lambda: tokens_of(image), args.warmup, args.images, device)
        _reset_peak(device)
        without = _time(lambda: head_only(cached), args.warmup, args.images, device)
        peak = _peak(device)
        with_bb = _time(lambda: head_only(tokens_of(image)), args.warmup, args.images, device)
    return {
        "images_s": 1 / with_bb, "images_s_cached": 1 / without, "backbone_images_s": 1 / backbone,
        "ratio": with_bb / backbone, "peak": peak,
    }  # fmt: skip


def sdpa_kernel(args, device, bb: Backbone, precision: str) -> dict[str, str]:
    """The scaled-dot-product-attention kernel the default head's fusion blocks ran (profiler op names)."""
    head = FusionHead(_head_config("default", bb, args.tiny)).to(device).eval()
    grid = args.image_size // bb.patch
    tokens = torch.randn(1, grid * grid, bb.dim, device=device)
    text = torch.randn(1, 4, bb.text_dim, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), _autocast(device, precision), torch.profiler.profile(activities=activities) as prof:
        head.fusion(tokens, text)
    names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key}
    found = [label for key, label in KERNELS.items() if any(key in n for n in names)]
    return {"kernel": ", ".join(found) or f"none matched ({', '.join(sorted(names)) or 'no attention op'})"}


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.image_size = min(args.image_size, 64)
        args.batches, args.ks = [1, 2], [k for k in args.ks if k <= 20] or [1]
        args.steps, args.images, args.warmup = 1, 1, 1
    bench = setup(args)
    device = bench.device
    compile_modes = (
        [False, True]
        if args.compile == "both" or (args.compile == "auto" and device.type == "cuda")
        else [False]
    )
    backbones = TINY_BACKBONES if args.tiny else BACKBONES
    precisions = ["fp32", "bf16"]
    budget = Budget(args.budget_s)
    rows: list[dict[str, Any]] = []

    for bb in backbones.values():
        for kind in ("paper", "default"):
            for batch in args.batches:
                for precision in precisions:
                    for compiled in compile_modes:
                        if compiled and (precision != "bf16" or batch != args.batches[0]):
                            continue  # compiling costs tens of seconds: one setting per head
                        row = {"part": "train", "backbone": bb.name, "head": kind, "batch": batch,
                               "precision": precision, "compile": compiled}  # fmt: skip
                        run = functools.partial(train_row, args, device, bb, kind, batch, precision, compiled)
                        rows.append(_record(row, run, budget))
    for bb in backbones.values():
        vit = _vit(bb, args.image_size, device)
        for precision in precisions:
            kernel = functools.partial(sdpa_kernel, args, device, bb, precision)
            rows.append(
                _record({"part": "sdpa", "backbone": bb.name, "precision": precision}, kernel, budget)
            )
            for kind in ("default", "paper"):
                for k in args.ks:
                    row = {"part": "infer", "backbone": bb.name, "head": kind, "k": k, "precision": precision}
                    rows.append(
                        _record(
                            row,
                            functools.partial(infer_row, args, device, bb, vit, kind, k, precision),
                            budget,
                        )
                    )

    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    report("GPU: training, inference, memory, attention kernel (benchmarks/gpu.py)", bench.environment(),
           _tables(rows), results=bench.results)  # fmt: skip


def _record(row: dict[str, Any], run: Callable[[], dict[str, Any]], budget: Budget) -> dict[str, Any]:
    row.update({"status": "skipped (budget)"} if budget.spent() else _guard(run))
    print(json.dumps(row), flush=True)
    return row


def _fmt(row: dict, key: str, spec: str = ".1f") -> str:
    return row.get("status") or format(row[key], spec)


def _tables(rows: list[dict]) -> str:
    train = [r for r in rows if r["part"] == "train"]
    infer = [r for r in rows if r["part"] == "infer"]
    sdpa = [r for r in rows if r["part"] == "sdpa"]
    t1 = markdown_table(
        ["backbone tokens", "head", "batch", "precision", "compile", "steps/s", "images/s", "peak memory"],
        [[r["backbone"], r["head"], r["batch"], r["precision"], "on" if r["compile"] else "off",
          _fmt(r, "steps_s", ".2f"), _fmt(r, "images_s"), r.get("peak", "")] for r in train],
    )  # fmt: skip
    t2 = markdown_table(
        ["backbone", "head", "K", "precision", "images/s", "images/s (cached tokens)", "backbone alone",
         "time / backbone", "peak memory (cached)"],
        [[r["backbone"], r["head"], r["k"], r["precision"], _fmt(r, "images_s"), _fmt(r, "images_s_cached"),
          _fmt(r, "backbone_images_s"), _fmt(r, "ratio", ".2f"), r.get("peak", "")] for r in infer],
    )  # fmt: skip
    t3 = markdown_table(
        ["backbone", "precision", "SDPA kernel in the fusion blocks"],
        [[r["backbone"], r["precision"], r.get("kernel") or r.get("status")] for r in sdpa],
    )
    return (
        f"Cached training (random tokens of the backbone's grid):\n\n{t1}\n\n"
        f"Inference, one image at a time:\n\n{t2}\n\n{t3}\n"
    )


if __name__ == "__main__":
    main()
