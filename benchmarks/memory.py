"""Peak memory of training with and without the feature cache, and the cache's size on disk.

Each training variant runs the real ``fusioner.engine.train.train()`` in its own child process
(a process's peak is a one-way counter), after a first child has filled the cache, so the cached
child's peak is training's and not the fill's. On a CPU the figure is resident memory (RSS): the
process's lifetime peak (``getrusage``) and, from a 5 ms sampler, the peak during training steps
(from the second step on) above the RSS when training began; on a GPU it is
``torch.cuda.max_memory_allocated`` over the training steps, next to what was allocated when they
began (the frozen backbones' weights).

Cache size per 1,000 images is measured on a cache of ``--cache-images`` images for each
``backbone@size`` of ``--cache-configs`` and extrapolated linearly (each image is one fp16
``gh gw c`` token tensor plus its uint8 ``size x size`` mask).

CPU defaults take about 2 minutes on one core (``--threads 1``). GPU-sized run::

    python benchmarks/memory.py --image-size 448 --batch-size 8 --steps 10 \
        --cache-configs clip_vitl14@448 dino_vitb16@448 --cache-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import add_common_args, markdown_table, report, setup, stage, synthetic_folder, workdir

from fusioner.adapters import create_vision
from fusioner.config import load_config
from fusioner.data import build_split
from fusioner.engine import train as train_module
from fusioner.engine.cache import FeatureCache, cache_key, fill_cache, prepare_cache

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default="clip_vitl14")
    p.add_argument("--text", default="clip_vitl14_text")
    p.add_argument("--vision-weights", default="random", help="'random' or a weights id ('' = default)")
    p.add_argument("--text-weights", default="random", help="'random' (CLIP text only) or a weights id")
    p.add_argument("--preset", default="base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-negatives", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="synthetic training images")
    p.add_argument(
        "--cache-configs", nargs="+", default=["dino_vits16@224", "dino_vitb16@448", "clip_vitl14@224"],
        help="backbone@size pairs whose cache size is measured",
    )  # fmt: skip
    p.add_argument("--cache-images", type=int, default=4)
    p.add_argument("--child", choices=("fill", "cached", "uncached"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    add_common_args(p)
    return p.parse_args(argv)


# -- child: one training run ----------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssSampler(threading.Thread):
    """Highest RSS seen every 5 ms since ``start`` (torch's CPU allocator is invisible to tracemalloc)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_bytes())


def child(args: argparse.Namespace) -> dict:
    device = setup(args).device
    config = load_config(
        None,
        dataset="folder",
        data_path=str(args.workdir / "data"),
        vision=args.vision,
        vision_weights=args.vision_weights or None,
        text=args.text,
        text_weights=args.text_weights or None,
        templates="photo",
        preset=args.preset,
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        epochs=1000,
        max_steps=args.steps + 1,
        use_cache=args.child != "uncached",
        precision=args.precision,
        out_dir=str(args.workdir / f"run-{args.child}"),
        cache_dir=str(args.workdir / "cache"),
    )
    if args.child == "fill":
        # The very backbone train() will build (same seed, same order), so its cache is found full.
        from accelerate.utils import set_seed

        from fusioner.model import FusionerModel

        set_seed(config.seed)
        model = FusionerModel.from_config(config).to(device)
        cache = prepare_cache(config, model.vision, build_split(config).train, device)
        return {"cache_bytes": cache.size_bytes(), "cache_items": len(cache)}

    state: dict = {}
    real = train_module.mask_loss

    def hooked(*a, **kw):
        # The first call comes after step 1's forward: measure from step 2 on, the steady state.
        if "sampler" not in state:
            state["rss_start"] = rss_bytes()
            state["sampler"] = RssSampler()
            state["sampler"].start()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                state["cuda_start"] = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
        return real(*a, **kw)

    train_module.mask_loss = hooked
    train_module.train(config)
    out = {
        "rss_start_mb": state["rss_start"] / MB,
        "rss_train_peak_mb": state["sampler"].stop() / MB,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,  # KiB on Linux
    }
    if device.type == "cuda":
        out["cuda_start_mb"] = state["cuda_start"] / MB
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return out


# -- parent ---------------------------------------------------------------------------------------
def run_child(variant: str, folder: Path) -> dict:
    argv = [*sys.argv[1:], "--child", variant, "--workdir", str(folder)]
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {variant} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_size(name: str, size: int, n: int, folder: Path, device: torch.device) -> tuple[int, int, int]:
    """(bytes on disk, payload bytes per image, images) of a cache of ``n`` images."""
    vision = create_vision(name, "random").to(device)
    split = build_split(load_config(None, dataset="folder", data_path=str(folder / "data")))
    dataset = split.train.select(range(min(n, len(split.train))))
    cache = FeatureCache(folder / "size-cache", cache_key(vision, size, f"bench:{name}@{size}"))
    fill_cache(cache, vision, dataset, size, device=device, batch_size=4, progress=False)
    gh, gw = vision.grid(size, size)
    payload = gh * gw * vision.embed_dim * 2 + size * size
    return cache.size_bytes(), payload, len(cache)


def parent(args: argparse.Namespace, folder: Path) -> None:
    bench = setup(args)
    device, env = bench.device, bench.environment()
    synthetic_folder(folder / "data", max(args.images, args.cache_images))
    start = time.perf_counter()
    with stage("filling the training cache (child process)"):
        fill = run_child("fill", folder)
    runs = {}
    for variant in ("cached", "uncached"):
        with stage(f"training, {variant} (child process)"):
            runs[variant] = run_child(variant, folder)

    gpu = device.type == "cuda"
    headers = ["training", "RSS when steps begin (MiB)", "RSS peak in steps (MiB)", "above start (MiB)",
               "process peak RSS (MiB)"]  # fmt: skip
    if gpu:
        headers += ["CUDA at start (MiB)", "CUDA peak in steps (MiB)"]
    rows = []
    for variant, r in runs.items():
        row = [variant, f"{r['rss_start_mb']:,.0f}", f"{r['rss_train_peak_mb']:,.0f}",
               f"{r['rss_train_peak_mb'] - r['rss_start_mb']:,.0f}", f"{r['ru_maxrss_mb']:,.0f}"]  # fmt: skip
        if gpu:
            row += [f"{r['cuda_start_mb']:,.0f}", f"{r['cuda_peak_mb']:,.0f}"]
        rows.append(row)

    size_rows = []
    per_1k = fill["cache_bytes"] / fill["cache_items"] * 1000
    n_fill = fill["cache_items"]
    size_rows.append(
        [
            f"{args.vision}@{args.image_size} (training)",
            n_fill,
            f"{fill['cache_bytes'] / MB:,.2f}",
            "",
            f"{per_1k / 2**30:,.2f}",
        ]  # fmt: skip
    )
    for spec in args.cache_configs:
        name, _, size = spec.partition("@")
        with stage(f"cache size of {spec}"):
            size_px = int(size or args.image_size)
            on_disk, payload, n = cache_size(name, size_px, args.cache_images, folder, device)
        per_1k = on_disk / n * 1000
        size_rows.append([spec, n, f"{on_disk / MB:,.2f}", f"{payload / 1024:,.0f}", f"{per_1k / 2**30:.2f}"])

    lines = [
        f"Setup: real train() of {args.vision} + {args.text} (random weights), head preset {args.preset}, "
        f"image {args.image_size}, batch {args.batch_size}, {args.steps + 1} steps, one child process "
        f"per variant; total {time.perf_counter() - start:.0f} s.",
        "",
        markdown_table(headers, rows),
        "",
        "Feature cache on disk (fp16 tokens + uint8 mask per image, safetensors shards):",
        "",
        markdown_table(
            ["backbone@size", "images", "measured (MiB)", "payload/image (KiB)", "per 1,000 images (GiB)"],
            size_rows,
        ),
    ]
    report("Training memory and cache size (memory.py)", env, "\n".join(lines), results=bench.results)


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with workdir("fusioner-memory-", args.keep) as folder:
        parent(args, folder)


if __name__ == "__main__":
    main()
