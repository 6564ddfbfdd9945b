"""Training samples/s of one model on one dataset, four ways, in one process.

(a) head alone: the engine's training step fed with random tensors of the cached shape, already
    on the device: the ceiling of any data path.
(b) cached: the real ``fusioner.engine.train.train()`` with ``use_cache=True`` (FeatureCache filled
    first), timed per step in steady state.
(c) backbone every step: the real ``train()`` with ``use_cache=False``.
(d) the released Fusioner loop (github.com/chaofanma/Fusioner, train.py + model/): backbone every
    step, ONE class name per forward pass (K passes for an image's K names) and the 32 prompt
    templates of its text encoder re-encoded at every pass. Same head, data, names and optimizer;
    only the loop differs.

(b) and (c) start from the same seed and see the same batches (augmentation off: flipped pixels
and flipped cached tokens are not the same input for a ViT), so their loss curves must agree up to
the fp16 rounding of the cached tokens.

CPU defaults finish in about 5 minutes on one core (``--threads 1``) with the released pairing
(CLIP ViT-L/14 visual + CLIP ViT-L/14 text, random init: timing does not depend on the weights).
GPU-sized run::

    python benchmarks/train_throughput.py --image-size 448 --batch-size 8 --images 64 \
        --steps 30 --warmup 5 --num-negatives 4 --released-images 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from common import (
    Bench,
    add_common_args,
    markdown_table,
    median,
    ms,
    report,
    setup,
    stage,
    synthetic_folder,
    workdir,
)
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from fusioner.config import Config, load_config
from fusioner.data import build_split
from fusioner.engine import train as train_module
from fusioner.engine.cache import prepare_cache
from fusioner.engine.train import head_loss
from fusioner.engine.train_data import CachedSource, ImageSource, make_loader
from fusioner.model import FusionerModel

# The released text encoder's templates (model/text_encoder.py), "{category}" spelled "{}".
RELEASED_TEMPLATES: tuple[str, ...] = (
    "a bad photo of the {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a cropped photo of a {}.", "This is a photo of a {}", "This is a photo of a small {}",
    "This is a photo of a medium {}", "This is a photo of a large {}", "This is a masked photo of a {}",
    "This is a masked photo of a small {}", "This is a masked photo of a medium {}",
    "This is a masked photo of a large {}", "This is a cropped photo of a {}",
    "This is a cropped photo of a small {}", "This is a cropped photo of a medium {}",
    "This is a cropped photo of a large {}", "A photo of a {} in the scene",
    "a bad photo of the {} in the scene", "a photo of the large {} in the scene",
    "a photo of the small {} in the scene", "a cropped photo of a {} in the scene",
    "a photo of a masked {} in the scene", "There is a {} in the scene", "There is the {} in the scene",
    "This is a {} in the scene", "This is the {} in the scene", "This is one {} in the scene",
    "There is a masked {} in the scene", "There is the masked {} in the scene",
    "This is a masked {} in the scene", "This is the masked {} in the scene",
    "This is one masked {} in the scene",
)  # fmt: skip
RELEASED_PAIRING = ("clip_vitl14", "clip_vitl14_text")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default="clip_vitl14")
    p.add_argument("--text", default="clip_vitl14_text")
    p.add_argument("--vision-weights", default="random", help="'random' or a weights id ('' = default)")
    p.add_argument("--text-weights", default="random", help="'random' (CLIP text only) or a weights id")
    p.add_argument("--preset", default="base", help="fusion head preset: base | small | tiny")
    p.add_argument("--decoder", default="default", choices=("default", "paper"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-negatives", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--images", type=int, default=8, help="synthetic training images (each is cached once)")
    p.add_argument("--classes", type=int, default=8, help="synthetic vocabulary size (VOC names)")
    p.add_argument("--data", default="", help="a folder dataset to use instead of synthetic images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (config num_workers)")
    p.add_argument("--compile", action="store_true", help="torch.compile the head (config compile)")
    p.add_argument("--released-images", type=int, default=2, help="images through the released loop (d)")
    p.add_argument("--skip-released", action="store_true")
    add_common_args(p)
    return p.parse_args()


def make_config(args: argparse.Namespace, data_path: Path, work: Path, name: str, **overrides) -> Config:
    max_steps = args.warmup + args.steps + 1
    return load_config(
        None,
        dataset="folder",
        data_path=str(data_path),
        vision=args.vision,
        vision_weights=args.vision_weights or None,
        text=args.text,
        text_weights=args.text_weights or None,
        templates="photo",  # the vocabulary is encoded once either way: templates cost nothing per step
        preset=args.preset,
        decoder=args.decoder,
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        epochs=1000,  # max_steps ends the run; EpochSampler orders one epoch at a time, lazily
        max_steps=max_steps,
        warmup_steps=1,
        augment=[],  # no flip: flipped pixels and flipped cached tokens are not the same ViT input
        num_workers=args.workers,
        compile=args.compile,
        precision=args.precision,
        out_dir=str(work / name),
        cache_dir=str(work / "cache"),
        **overrides,
    )


@contextlib.contextmanager
def step_clock(clock: Callable[[], float]) -> Iterator[list[float]]:
    """Timestamps of every ``mask_loss`` call inside ``train()``: one per step, so their differences
    are whole steady-state steps (data, backbone, head, backward, optimizer, logging)."""
    stamps: list[float] = []
    real = train_module.mask_loss

    def timed(*a, **kw):
        stamps.append(clock())
        return real(*a, **kw)

    train_module.mask_loss = timed
    try:
        yield stamps
    finally:
        train_module.mask_loss = real


def run_train(config: Config, warmup: int, clock: Callable[[], float]) -> tuple[list, list, str]:
    """Real ``train()``: (seconds per steady-state step, losses, vision fingerprint)."""
    with step_clock(clock) as stamps:
        result = train_module.train(config)
    steps = np.diff(stamps)[warmup:].tolist()
    return steps, result.losses, result.model.vision.fingerprint()


class HeadStep:
    """The optimizer step of ``train()`` (same accelerate wrapping, loss, clipping, schedule)."""

    def __init__(self, head: torch.nn.Module, vocab: Tensor, config: Config, precision: str) -> None:
        self.config, self.vocab = config, vocab
        self.accelerator = Accelerator(mixed_precision=precision)
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if config.compile:
            head.compile()
        scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10**6)
        self.head, self.optimizer, self.scheduler = self.accelerator.prepare(head, optimizer, scheduler)
        self.head.train()

    def __call__(self, tokens: Tensor, class_idx: Tensor, target: Tensor) -> float:
        """tokens ``b gh gw c`` (the cache's layout), class_idx ``b k``, target labels ``b h w``."""
        grid = (tokens.shape[1], tokens.shape[2])
        loss = self.loss(tokens.flatten(1, 2), grid, class_idx, target)
        self.accelerator.backward(loss)
        if self.config.clip_grad > 0:
            self.accelerator.clip_grad_norm_(self.head.parameters(), self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return loss.item()

    def loss(self, tokens: Tensor, grid: tuple[int, int], class_idx: Tensor, target: Tensor) -> Tensor:
        """train()'s own loss."""
        return head_loss(self.head, tokens, grid, self.vocab, class_idx, target, self.config.dice_weight)


def loader_only(loader: DataLoader, n: int, clock: Callable[[], float]) -> list[float]:
    """Seconds per batch of the data path alone (no model): what a GPU step cannot hide."""
    times, it = [], iter(loader)
    next(it)
    for _ in range(n):
        start = clock()
        next(it)
        times.append(clock() - start)
    return times


def encode_every_time(model: FusionerModel, name: str, templates: tuple[str, ...]) -> Tensor:
    """The released ``ClipText.get_embed``: encode all templates, normalise, average, normalise."""
    emb = F.normalize(model.text.encode([t.replace("{}", name) for t in templates]).float(), dim=-1)
    return F.normalize(emb.mean(0), dim=-1)  # ct


def released_loop(
    model: FusionerModel, step: HeadStep, loader: DataLoader, seen: list[str], n_images: int, bench: Bench
) -> tuple[list[float], dict[str, float], int]:
    """(seconds per image, seconds per pass by part, passes per image) of the released loop.

    Per image and per name: backbone on the image, 32 templates through the text model, the head
    with that one class token, loss and backward (gradients accumulate); one optimizer step per
    batch. The loss is the engine's (at the decoder's resolution), so only the loop differs.
    """
    acc, clock, device = step.accelerator, bench.clock, bench.device
    parts = {"backbone": 0.0, "text (32 templates)": 0.0, "head + loss + backward": 0.0}
    per_image: list[float] = []
    passes = 0

    def one_pass(image: Tensor, name: str, target: Tensor, scale: float) -> None:
        """image ``1 3 h w``, target ``1 h w`` with 1 where ``name`` is, -1 = ignore."""
        t0 = clock()
        with acc.autocast():  # the release ran both CLIP towers in fp16 on GPUs
            out = model.vision(image)
            bench.sync()
            t1 = clock()
            with torch.no_grad():
                text = encode_every_time(model, name, RELEASED_TEMPLATES)
            bench.sync()
        t2 = clock()
        step.vocab = text[None]  # a vocabulary of one: class index 0
        query = torch.zeros(1, 1, dtype=torch.long, device=device)
        acc.backward(step.loss(out.tokens, out.grid, query, target) * scale)
        bench.sync()
        t3 = clock()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key] += dt

    def one_name(target: Tensor, c: int) -> Tensor:
        # Relabel so that the queried name is class 0 (label 1) of a one-name vocabulary.
        return torch.where(target < 0, target, (target == c + 1).to(target.dtype))

    it = iter(loader)
    batch = next(it)
    one_pass(batch["x"][:1].to(device), seen[0], one_name(batch["target"][:1].to(device), 0), 1)
    step.optimizer.zero_grad()
    parts = dict.fromkeys(parts, 0.0)  # the warm-up pass does not count
    while len(per_image) < n_images:
        batch = next(it)
        x, target = batch["x"].to(device), batch["target"].to(device)
        b, k = batch["class_idx"].shape
        for i in range(min(b, n_images - len(per_image))):
            start = clock()
            for c in batch["class_idx"][i].tolist():
                one_pass(x[i : i + 1], seen[c], one_name(target[i : i + 1], c), 1 / (b * k))
                passes += 1
            per_image.append(clock() - start)
        start = clock()
        if step.config.clip_grad > 0:
            acc.clip_grad_norm_(step.head.parameters(), step.config.clip_grad)
        step.optimizer.step()
        step.optimizer.zero_grad()
        bench.sync()
        per_image[-1] += clock() - start
    return per_image, {key: v / passes for key, v in parts.items()}, passes // len(per_image)


def run(args: argparse.Namespace, work: Path) -> None:
    bench = setup(args)
    device, precision, env = bench.device, bench.precision, bench.environment()
    data_path = Path(args.data) if args.data else synthetic_folder(work / "data", args.images, args.classes)
    config = make_config(args, data_path, work, "unused")
    split = build_split(config)
    n_images = len(split.train)

    # train() seeds, then builds the model: doing the same here gives the very same random
    # backbone, hence the same cache key, so train(use_cache=True) finds the cache already full.
    with stage(f"building {args.vision} + {args.text} + head ({args.preset})"):
        set_seed(config.seed)
        model = FusionerModel.from_config(config)
        model.to(device)
    with stage(f"filling the feature cache ({n_images} images at {args.image_size})"):
        start = bench.clock()
        cache = prepare_cache(config, model.vision, split.train, device)
        fill_s = bench.clock() - start
    with stage("encoding the vocabulary once"):
        vocab = model.text(split.seen)  # v ct

    ids = [split.train.item_id(i) for i in range(n_images)]
    cached_loader = make_loader(CachedSource(cache, ids), split.seen, config)
    image_loader = make_loader(ImageSource(split.train, config.image_size), split.seen, config)
    sample = next(iter(cached_loader))
    b, k = sample["class_idx"].shape
    gh, gw = sample["x"].shape[1:3]

    # (a) head alone: random tensors of the cached shape, on the device before the clock starts.
    # Timed before (b) and again after (c), so a machine that slows down meanwhile (a shared
    # CPU) does not pass for an engine overhead.
    set_seed(config.seed)
    step = HeadStep(copy.deepcopy(model.head), vocab, config, precision)
    tokens = torch.randn(sample["x"].shape, dtype=sample["x"].dtype, device=device)
    class_idx = torch.randint(len(vocab), (b, k), device=device)
    target = torch.randint(-1, len(vocab) + 1, sample["target"].shape, device=device)  # -1 = ignore
    target = target.to(sample["target"].dtype)

    def time_head_alone(warmup: int, steps: int) -> list[float]:
        times = []
        for i in range(warmup + steps):
            bench.sync()
            start = bench.clock()
            step(tokens, class_idx, target)
            bench.sync()
            if i >= warmup:
                times.append(bench.clock() - start)
        return times

    with stage("(a) head alone"):
        head_times = time_head_alone(args.warmup, args.steps)

    with stage("(b) train() with the cache"):
        cached_config = make_config(args, data_path, work, "cached")
        cached_times, cached_losses, fp_cached = run_train(cached_config, args.warmup, bench.clock)
    with stage("(c) train() with the backbone every step"):
        live_times, live_losses, fp_live = run_train(
            make_config(args, data_path, work, "uncached", use_cache=False), args.warmup, bench.clock
        )
    with stage("(a) head alone, again"):
        head_times += time_head_alone(0, args.steps)
    with stage("data path alone, backbone alone"):
        cached_data = loader_only(cached_loader, args.steps, bench.clock)
        image_data = loader_only(image_loader, args.steps, bench.clock)
        images = next(iter(image_loader))["x"].to(device)
        backbone_times = bench.measure(lambda: model.vision(images), warmup=1, repeats=args.steps)
    if len(cache) != n_images or fp_cached != model.vision.fingerprint():
        print("WARNING: train() built another backbone than this script; it refilled the cache")

    released = None
    if not args.skip_released:
        with stage(f"(d) released loop on {args.released_images} images"):
            set_seed(config.seed)
            step_d = HeadStep(copy.deepcopy(model.head), vocab, config, precision)
            released = released_loop(model, step_d, image_loader, split.seen, args.released_images, bench)

    # -- the table ---------------------------------------------------------------------------------
    per_sample = {
        "(a) head alone (random tensors, cached shape)": median(head_times) / b,
        "(b) cached features, real train()": median(cached_times) / b,
        "(c) backbone every step, real train()": median(live_times) / b,
    }
    notes = {
        "(a) head alone (random tensors, cached shape)": "upper bound of any data path",
        "(b) cached features, real train()": f"data path alone: {ms(median(cached_data))} ms/batch",
        "(c) backbone every step, real train()": f"data path alone: {ms(median(image_data))} ms/batch; "
        f"backbone alone: {ms(median(backbone_times))} ms/batch",
    }
    if released is not None:
        per_image, parts, passes = released
        key = "(d) released loop: K passes, 32 templates each"
        per_sample[key] = median(per_image)
        split_up = ", ".join(f"{part} {ms(t)}" for part, t in parts.items())
        notes[key] = f"{passes} passes/image; per pass (ms): {split_up}"
    head_alone = per_sample["(a) head alone (random tensors, cached shape)"]
    rows = [
        [name, f"{1 / s:.3f}", ms(s), f"{head_alone / s:.2f}", notes[name]] for name, s in per_sample.items()
    ]
    table = markdown_table(["variant", "samples/s", "ms/sample", "x head-alone", "notes"], rows)

    cached_s = per_sample["(b) cached features, real train()"]
    live_s = per_sample["(c) backbone every step, real train()"]
    diff = np.abs(np.array(cached_losses) - np.array(live_losses))
    rel = diff / np.maximum(np.abs(np.array(live_losses)), 1e-12)
    lines = [
        f"Setup: {args.vision} ({args.vision_weights or 'default'} weights) + {args.text} "
        f"({args.text_weights or 'default'}), head preset {args.preset}, decoder {args.decoder}, "
        f"image {args.image_size}, batch {b}, K = {k} names per image ({args.num_negatives} negatives), "
        f"grid {gh}x{gw}, {n_images} images, {args.steps} timed steps after {args.warmup} warm-up "
        "(head alone: twice that, before (b) and after (c)); medians.",
        "",
        table,
        "",
        f"- cached / head-alone: {head_alone / cached_s:.1%} (target >= 90%: "
        f"{'met' if head_alone / cached_s >= 0.9 else 'MISSED'})",
        f"- cached over backbone-every-step: {live_s / cached_s:.2f}x faster",
        f"- loss curves, same seed, {len(diff)} steps, cached vs uncached: max |diff| {diff.max():.2e} "
        f"(max relative {rel.max():.2e}; fp16 tolerance 1e-3 relative: "
        f"{'met' if rel.max() <= 1e-3 else 'MISSED'})",
        f"- one-time cost: cache fill {fill_s:.1f} s ({n_images / fill_s:.2f} images/s, one backbone pass "
        "per image)",
    ]
    if released is not None:
        ratio = per_sample["(d) released loop: K passes, 32 templates each"] / cached_s
        pairing = (args.vision, args.text) == RELEASED_PAIRING
        verdict = "met" if ratio >= 5 else "MISSED"
        target = f"target >= 5x: {verdict}" if pairing else "not the released pairing"
        lines.append(f"- cached over the released loop: {ratio:.1f}x more samples/s ({target})")
        lines.append(
            f"- vocabulary with the released 32 templates, once per run: {len(split.seen)} names x "
            f"{ms(parts['text (32 templates)'])} ms = {len(split.seen) * parts['text (32 templates)']:.1f} s "
            "(the released loop pays one name's worth at every pass)"
        )
    report("Training throughput (train_throughput.py)", env, "\n".join(lines), results=bench.results)


def main() -> None:
    args = parse_args()
    with workdir("fusioner-bench-", args.keep) as work:
        run(args, work)


if __name__ == "__main__":
    main()
