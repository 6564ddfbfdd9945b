"""Shared pieces of the benchmark scripts: device and precision, timing, synthetic data, RESULTS.md.

Every script prints a markdown table and appends it to ``benchmarks/RESULTS.md`` under a header
naming the machine (CPU model, cores, GPU), the library versions and the date, so figures from
different machines never get mixed up. Timings are wall-clock medians over repeats after warm-up,
with the device synchronised around each timed call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import fusioner
from fusioner.config import load_config
from fusioner.data.base import IGNORE
from fusioner.data.splits import VOC_CLASSES
from fusioner.io import atomic_write_text
from fusioner.model import FusionHead, HeadConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


# -- device and precision --------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs that have it, else fp32 ("no"): the engine's own rule."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_head(
    vision_dim: int,
    text_dim: int,
    preset: str = "base",
    decoder: str = "default",
    fusion_attention: str = "decoupled",
) -> FusionHead:
    """A fusion head sized by a config preset (the head's size is what the library trains)."""
    config = load_config(None, preset=preset, decoder=decoder, fusion_attention=fusion_attention)
    return FusionHead(HeadConfig.from_config(config, vision_dim, text_dim))


# -- timing -----------------------------------------------------------------------------------------
CLOCKS: dict[str, tuple[Callable[[], float], str]] = {
    "wall": (time.perf_counter, "wall-clock time"),
    # One CPU thread does the work, so the process's CPU time is the work's duration, and it does
    # not grow when other processes share the cores (they take turns; the CPU time stays).
    "cpu": (time.process_time, "CPU time of this process (1 thread: robust to other work on the machine)"),
}


@dataclass
class Bench:
    """Where and how a benchmark runs: device, precision, clock, and the results file."""

    device: torch.device
    precision: str  # "no" (fp32) | "bf16" | "fp16"
    clock_name: str  # a key of CLOCKS
    results: Path | None

    @property
    def clock(self) -> Callable[[], float]:
        return CLOCKS[self.clock_name][0]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for inference timings (training goes through accelerate, as the engine's does)."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.precision not in dtypes:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.precision])

    def measure(self, fn: Callable[[], Any], *, warmup: int = 0, repeats: int = 3) -> list[float]:
        """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = self.clock()
            fn()
            self.sync()
            times.append(self.clock() - start)
        return times

    def environment(self) -> dict[str, str]:
        """What a figure depends on besides the code: machine, versions, device, clock, date, load."""
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{_cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
            "gpu": gpu,
            "device": f"{self.device} (precision: {'fp32' if self.precision == 'no' else self.precision})",
            "clock": CLOCKS[self.clock_name][1],
            "versions": (
                f"python {platform.python_version()}, torch {torch.__version__}, timm {_version('timm')}, "
                f"open_clip {_version('open_clip')}, fusioner {fusioner.__version__} (git {_git_commit()})"
            ),
            "load average at start (1/5/15 min)": load,
        }


def median(times: Sequence[float]) -> float:
    return float(np.median(times)) if len(times) else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


# -- the machine ------------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__: the header says so instead of failing
        return "n/a"


def _git_commit() -> str:
    """The checkout's commit, "+local changes" when tracked files differ from it (read-only git calls)."""

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(HERE.parent), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + (" + local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a"


# -- output -----------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def report(title: str, env: dict[str, str], body: str, *, results: Path | None) -> str:
    """Print the section and append it to ``results`` (atomically: old file or new file, never half)."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [f"## {title}", "", f"`{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    if hasattr(os, "getloadavg"):  # a shared machine's other work shows here, not in the figures
        lines.append("- load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    section = "\n".join(lines) + "\n\n" + body.strip() + "\n"
    print("\n" + section)
    if results is not None:
        old = results.read_text() if results.is_file() else "# Benchmark results\n"
        atomic_write_text(results, old.rstrip("\n") + "\n\n" + section)
        print(f"appended to {results}")
    return section


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
        help="auto = bf16 autocast on GPUs that support it, fp32 on CPU (the engine's rule)",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS, help="file the section is appended to")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to --results")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data, caches and runs")
    parser.add_argument(
        "--clock", default="auto", choices=("auto", "wall", "cpu"),
        help="auto: the process's CPU time on a CPU with --threads 1 (robust on a shared machine), else wall",
    )  # fmt: skip


def setup(args: argparse.Namespace) -> Bench:
    """Apply the common arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # TF32 for what stays in fp32 (the frozen backbones outside autocast): what a GPU user gets.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu needs --device cpu and --threads 1 (CPU time adds up every thread's)")
    results = None if args.no_record else args.results
    return Bench(device, resolve_precision(args.precision, device), clock, results)


# -- synthetic data ---------------------------------------------------------------------------------
def synthetic_folder(
    root: str | Path, n_images: int, n_classes: int = 8, *, size: tuple[int, int] = (375, 500), seed: int = 0
) -> Path:
    """A folder dataset (``fusioner.data.folder`` layout) of ``n_images`` JPEGs with label masks.

    Images are smooth random colour fields (a VOC-sized JPEG decodes in about the time of a real
    photo; white noise would not compress and decode far slower); each mask holds 1-3 rectangles
    of random classes with a 3-pixel ignore border, as VOC masks have. Every image is in
    ``train``; ``val`` lists the first one (the folder reader wants a non-empty val split).
    """
    if not 1 <= n_classes <= len(VOC_CLASSES):
        raise SystemExit(f"--classes must be in 1..{len(VOC_CLASSES)}, got {n_classes}")
    root = Path(root)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(["background", *VOC_CLASSES[:n_classes]]) + "\n")
    rng = np.random.default_rng(seed)
    h, w = size
    names = [f"img{i:05d}" for i in range(n_images)]
    for name in names:
        coarse = torch.from_numpy(rng.random((1, 3, 6, 8), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        pixels = (smooth.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        pixels = np.clip(pixels.astype(np.int16) + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.jpg", quality=90)
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, h * 3 // 4)), int(rng.integers(0, w * 3 // 4))
            y1, x1 = int(rng.integers(y0 + h // 8, h + 1)), int(rng.integers(x0 + w // 8, w + 1))
            mask[y0:y1, x0:x1] = IGNORE
            mask[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] = int(rng.integers(1, n_classes + 1))
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "splits" / "val.txt").write_text(names[0] + "\n")
    return root


@contextlib.contextmanager
def workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary folder for data, caches and runs (ViT-L checkpoints are large): removed at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Print how long a setup stage took (model builds and cache fills dominate short CPU runs)."""
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    yield
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - start:.1f} s", flush=True)
