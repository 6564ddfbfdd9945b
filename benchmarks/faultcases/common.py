"""The battery's machinery: running the command line, reading its answer, the shared tiny run, rows.

Cases register themselves with :func:`case` (in the order their modules are imported by
benchmarks/faults.py); each gets a fresh folder and the :class:`Base` run, and returns a :class:`Row`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is benchmarks/faultcases/common.py)
VOC = ROOT.parent / "shared" / "data" / "voc2012-samples" / "VOC2012"
VOC_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BIN = Path(sys.executable).parent  # the venv's console scripts sit beside its python


# -- running the command line ------------------------------------------------------------------------
@dataclass
class Ran:
    argv: list[str]
    rc: int
    out: str
    err: str


def run(argv: list[str], cwd: Path, timeout: float = 300) -> Ran:
    exe = argv[0] if argv[0] == sys.executable else str(BIN / argv[0])
    p = subprocess.run(
        [exe, *argv[1:]], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, errors="replace"
    )
    return Ran(argv, p.returncode, p.stdout, p.stderr)


_ERROR = re.compile(r"((?:fusioner [\w-]+|mosaic4): error: .*)")
_EXCEPTION = re.compile(r"^([\w.]+(?:Error|Exception)\b.*)")


def message(ran: Ran, pick: str | None = None) -> str:
    """The line a user reads as the answer (progress bars and INFO chatter skipped)."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", ran.err) if ln.strip()]
    if pick:  # a success with no warning: the line that shows the outcome (stdout or stderr)
        for ln in [*lines, *ran.out.splitlines()]:
            if m := re.search(pick, ln):
                return m.group(0)
        return ""
    for ln in lines:
        if m := _ERROR.search(ln):
            return m.group(1)
    if "Traceback (most recent call last)" in ran.err:
        found = [m.group(1) for ln in lines if (m := _EXCEPTION.match(ln))]
        return "Traceback: " + (found[-1] if found else lines[-1])
    for ln in lines:
        if ln.startswith("WARNING"):
            return ln
    return lines[0] if lines else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def index_of(cache_root: Path) -> tuple[Path, dict]:
    (index,) = cache_root.glob("*/index.json")
    return index.parent, json.loads(index.read_text())


def shard_tensor(cache_dir: Path, shard: str, key: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(cache_dir / shard))[key]


def voc_image(name: str) -> Path:
    """One of the shared VOC sample photos (``sample_0000`` ...)."""
    return VOC / "JPEGImages" / f"{name}.jpg"


# -- the shared tiny run -------------------------------------------------------------------------------
@dataclass
class Base:
    tmp: Path  # $T
    data: Path  # the VOC samples as a folder dataset (never edited: cases edit copies)
    config: dict  # the tiny training config
    run: Path  # trained once, 4 steps
    cache: Path  # its feature cache, full
    train_ids: list[str]
    val_ids: list[str]

    def write_config(self, path: Path, **changes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**self.config, **changes}, sort_keys=False))
        return path

    def copy_run(self, to: Path) -> Path:
        """A copy of the finished run, its config.yaml pointed at the copy (as a user's moved run)."""
        copy = Path(shutil.copytree(self.run, to))
        config = yaml.safe_load((copy / "config.yaml").read_text())
        (copy / "config.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(copy)}, sort_keys=False))
        return copy

    def copy_data(self, to: Path) -> Path:
        return Path(shutil.copytree(self.data, to))


def build_data(root: Path) -> tuple[list[str], list[str]]:
    """The 14 VOC samples in the folder layout; the cow and sheep images are in val (as tests/conftest.py)."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(VOC_NAMES) + "\n")
    train, val = [], []
    for jpg in sorted((VOC / "JPEGImages").glob("*.jpg")):
        shutil.copy(jpg, root / "images" / jpg.name)
        labels = np.asarray(Image.open(VOC / "SegmentationClass" / f"{jpg.stem}.png")).astype(np.uint8)
        Image.fromarray(labels).save(root / "masks" / f"{jpg.stem}.png")
        (val if set(np.unique(labels).tolist()) & {10, 17} else train).append(jpg.stem)
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(val) + "\n")
    return train, val


def build_base(tmp: Path) -> Base:
    if not VOC.is_dir():
        raise SystemExit(f"the shared VOC samples are not at {VOC}")
    data = tmp / "base" / "data"
    train_ids, val_ids = build_data(data)
    config = {
        "dataset": "folder",
        "data_path": str(data),
        "unseen_classes": ["cow", "sheep"],
        "preset": "tiny",
        "image_size": 64,
        "batch_size": 4,
        "max_steps": 4,
        "checkpoint_every": 2,
        "warmup_steps": 2,
        "num_negatives": 2,
        "lr": 0.002,
        "out_dir": str(tmp / "base" / "run"),
        "cache_dir": str(tmp / "base" / "cache"),
    }
    base = Base(tmp, data, config, tmp / "base" / "run", tmp / "base" / "cache", train_ids, val_ids)
    ran = run(["fusioner", "train", "--config", str(base.write_config(tmp / "base" / "c.yaml"))], tmp)
    if ran.rc != 0:
        raise SystemExit(f"the base run did not train (exit {ran.rc}):\n{ran.err[-3000:]}")
    return base


# -- cases ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    item: str
    case: str
    did: str
    rc: int | None
    expected_rc: int
    message: str
    named: bool  # the message names the file / key / value (or shows the outcome)
    lost_ok: bool
    lost: str  # what was checked, and what was found

    @property
    def good(self) -> bool:
        return self.rc == self.expected_rc and self.named and self.lost_ok


def mentions(msg: str, needles: list[str], absent: tuple[str, ...] = ()) -> bool:
    return bool(msg) and all(n in msg for n in needles) and not any(a in msg for a in absent)


CASES: list[tuple[str, str, Callable[[Base, Path], Row]]] = []


def case(item: str, name: str):
    def register(fn: Callable[[Base, Path], Row]) -> Callable[[Base, Path], Row]:
        CASES.append((item, name, fn))
        return fn

    return register
