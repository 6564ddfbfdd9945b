"""Issue 13's hostile and careless cases, tried as a new user would: through the real command line.

    OMP_NUM_THREADS=1 python benchmarks/faults.py [--out runs/faults/battery.md] [--jobs 2] [--keep]

Every case runs ``fusioner ...`` / ``mosaic4 ...`` (or, for the Python API, ``python -c``) as a
subprocess in a fresh folder of its own. One tiny run (the 14 VOC samples of ../shared, the default
EfficientNet-Lite0 + MiniLM pair, a ``tiny`` head, 64 px, 4 steps, checkpoints at 2 and 4) is trained
once and copied into the cases that need a run. Each row gives the exit code, the message (the
``error:`` / ``WARNING`` line of stderr, the exception line of a traceback, or for a success without
one the line that shows the outcome), a concrete "nothing lost" check, and the verdict: GOOD when the
exit code is the right one (2 for a refusal; 0 where success is right: a re-encoded cache, a fallback
to the previous checkpoint with a warning, ``--allow-repeats``; 1 for the uncaught error of a Python
snippet), the message names the file / key / value, and nothing was lost. Paths in the table are
shown relative to the battery's temporary folder, ``$T``. The table is printed and written
atomically to ``--out``; the exit status is 1 when any row is BAD.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
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


def _named(msg: str, needles: list[str], absent: tuple[str, ...] = ()) -> bool:
    return bool(msg) and all(n in msg for n in needles) and not any(a in msg for a in absent)


CASES: list[tuple[str, str, Callable[[Base, Path], Row]]] = []


def case(item: str, name: str):
    def register(fn: Callable[[Base, Path], Row]) -> Callable[[Base, Path], Row]:
        CASES.append((item, name, fn))
        return fn

    return register


def _stale_setup(base: Base, d: Path) -> tuple[Path, Path, Ran]:
    """A private data copy and cache, filled once with ``fusioner cache``."""
    data = base.copy_data(d / "data")
    config = base.write_config(
        d / "c.yaml", data_path=str(data), cache_dir=str(d / "cache"), out_dir=str(d / "run")
    )
    first = run(["fusioner", "-v", "cache", "--config", str(config)], d)
    if first.rc != 0:
        raise RuntimeError(f"first fill failed: {message(first)}")
    return data, config, first


def _reencoded(before: dict, after: dict) -> list[str]:
    return sorted(k for k, v in after["items"].items() if before["items"].get(k) != v)


@case("1", "stale cache: a mask edited after the first run")
def edited_mask(base: Base, d: Path) -> Row:
    data, config, _ = _stale_setup(base, d)
    cache_dir, before = index_of(d / "cache")
    item = base.train_ids[0]
    mask = np.zeros_like(np.asarray(Image.open(data / "masks" / f"{item}.png")))
    mask[: mask.shape[0] // 2, : mask.shape[1] // 2] = 15  # a "person" square
    Image.fromarray(mask).save(data / "masks" / f"{item}.png")
    second = run(["fusioner", "-v", "cache", "--config", str(config)], d)
    _, after = index_of(d / "cache")
    again = _reencoded(before, after)
    cached = set(np.unique(shard_tensor(cache_dir, after["items"][item]["shard"], f"{item}/mask")).tolist())
    msg = message(second, r"\d+ images of .* changed since they were cached.*")
    return Row(
        "1",
        "",
        f"`fusioner -v cache` twice; between them masks/{item}.png redrawn (a person square)",
        second.rc,
        0,
        msg,
        _named(msg, ["1 images of"]),
        again == [item] and cached == {0, 15},
        f"re-encoded {again} of {len(after['items'])} (others untouched); "
        f"cached mask labels now {sorted(cached)}",
    )


@case("1", "stale cache: an image replaced by another of the same name")
def replaced_image(base: Base, d: Path) -> Row:
    data, config, _ = _stale_setup(base, d)
    cache_dir, before = index_of(d / "cache")
    item = base.train_ids[0]
    old = shard_tensor(cache_dir, before["items"][item]["shard"], f"{item}/tokens").astype(np.float32)
    path = data / "images" / f"{item}.jpg"
    Image.open(path).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(path)
    second = run(["fusioner", "-v", "cache", "--config", str(config)], d)
    _, after = index_of(d / "cache")
    again = _reencoded(before, after)
    new = shard_tensor(cache_dir, after["items"][item]["shard"], f"{item}/tokens").astype(np.float32)
    moved = float(np.abs(new - old).max())
    msg = message(second, r"\d+ images of .* changed since they were cached.*")
    return Row(
        "1",
        "",
        f"`fusioner -v cache` twice; between them images/{item}.jpg replaced (flipped, same name)",
        second.rc,
        0,
        msg,
        _named(msg, ["1 images of"]),
        again == [item] and moved > 0.05,
        f"re-encoded {again} of {len(after['items'])}; its cached tokens moved by up to {moved:.2f}",
    )


@case("1", "stale cache: a class renamed in classes.txt")
def renamed_class(base: Base, d: Path) -> Row:
    data, config, first = _stale_setup(base, d)
    old_dir, before = index_of(d / "cache")
    old_index = (old_dir / "index.json").read_bytes()
    classes = data / "classes.txt"
    classes.write_text(classes.read_text().replace("\ndog\n", "\nhound\n"))
    second = run(["fusioner", "-v", "cache", "--config", str(config)], d)
    dirs = sorted(p.parent for p in (d / "cache").glob("*/index.json"))
    new_dir = next((p for p in dirs if p != old_dir), None)
    names = set()
    if new_dir is not None:
        for entry in json.loads((new_dir / "index.json").read_text())["items"].values():
            names |= set(entry["names"])
    msg = message(second, r"train: \d+ images cached in .*")
    return Row(
        "1",
        "",
        "`fusioner cache` twice; between them `dog` renamed `hound` in classes.txt",
        second.rc,
        0,
        msg,
        new_dir is not None and _named(msg, [str(new_dir)]),
        new_dir is not None
        and "hound" in names
        and "dog" not in names
        and (old_dir / "index.json").read_bytes() == old_index,
        f"a new cache {'$T/' + str(new_dir.relative_to(base.tmp)) if new_dir else '(none)'} whose items "
        f"name {'hound' if 'hound' in names else '?'} (no dog); the old cache's index unchanged",
    )


@case("1", "stale cache: a mask edited to hold an undefined label")
def undefined_label(base: Base, d: Path) -> Row:
    data, config, _ = _stale_setup(base, d)
    old_dir, _ = index_of(d / "cache")
    old_index = (old_dir / "index.json").read_bytes()
    item = base.val_ids[1]
    path = data / "masks" / f"{item}.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[:8, :8] = 42  # classes.txt defines 0..20
    Image.fromarray(mask).save(path)
    written = path.read_bytes()
    second = run(["fusioner", "cache", "--config", str(config)], d)
    msg = message(second)
    return Row(
        "1",
        "",
        f"`fusioner cache` twice; between them label 42 painted into masks/{item}.png",
        second.rc,
        2,
        msg,
        _named(msg, [str(path), "label 42"]),
        path.read_bytes() == written and (old_dir / "index.json").read_bytes() == old_index,
        "the mask's bytes and the cache index unchanged",
    )


@case("2", "resume under another config (unseen_classes, lr)")
def resume_changed(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    before = snapshot(r)
    ran = run(
        [
            "fusioner",
            "train",
            "--config",
            str(r / "config.yaml"),
            "--resume",
            "unseen_classes=cow,horse",
            "lr=0.2",
        ],
        d,
    )
    msg = message(ran)
    same = snapshot(r) == before
    return Row(
        "2",
        "",
        "`fusioner train --config RUN/config.yaml --resume unseen_classes=cow,horse lr=0.2`",
        ran.rc,
        2,
        msg,
        _named(msg, [str(r), "unseen_classes: ['cow', 'sheep'] -> ['cow', 'horse']", "lr: 0.002 -> 0.2"]),
        same,
        f"all {len(before)} files of the run byte-identical (config.yaml not rewritten)",
    )


@case("2", "resume changing only runtime keys")
def resume_runtime(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    model = (r / "model" / "model.safetensors").read_bytes()
    ran = run(
        ["fusioner", "train", "--config", str(r / "config.yaml"), "--resume", "log_every=3", "num_workers=0"],
        d,
    )
    msg = message(ran, r"trained \d+ steps.*")
    config = yaml.safe_load((r / "config.yaml").read_text())
    kept = (r / "model" / "model.safetensors").read_bytes() == model and (
        r / "checkpoints" / "step-00000004"
    ).is_dir()
    return Row(
        "2",
        "",
        "`fusioner train --config RUN/config.yaml --resume log_every=3 num_workers=0`",
        ran.rc,
        0,
        msg,
        _named(msg, ["trained 4 steps"]),
        kept and config.get("log_every") == 3,
        f"config.yaml records log_every={config.get('log_every')}; model and step-00000004 kept",
    )


def _voc_image(name: str) -> Path:
    return VOC / "JPEGImages" / f"{name}.jpg"


@case("3", "predict: inputs sharing a stem")
def colliding_stems(base: Base, d: Path) -> Row:
    sources = {"a/photo.jpg": "sample_0000", "b/photo.jpg": "sample_0008", "a/photo.png": "sample_0060"}
    images = []
    for rel, name in sources.items():
        path = d / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(_voc_image(name)).save(path)
        images.append(path)
    out = d / "out"
    ran = run(
        [
            "fusioner",
            "predict",
            *map(str, images),
            "--model",
            str(base.run),
            "--classes",
            "cat,dog",
            "--out",
            str(out),
        ],
        d,
    )
    manifest = (
        json.loads((out / "predictions.json").read_text()) if (out / "predictions.json").is_file() else {}
    )
    files = manifest.get("files", {})
    fits = 0
    for name, src in files.items():
        if name.endswith("_labels.png") and (out / name).is_file():
            with Image.open(src) as a, Image.open(out / name) as b:
                fits += a.size == b.size
    labels = sorted(n for n in files if n.endswith("_labels.png"))
    msg = message(ran, r".*_labels\.png$") if ran.rc == 0 else message(ran)
    return Row(
        "3",
        "",
        "`fusioner predict in/a/photo.jpg in/b/photo.jpg in/a/photo.png --model RUN --classes cat,dog`",
        ran.rc,
        0,
        f"{len(ran.out.split())} outputs printed, e.g. {msg}",
        ran.rc == 0,
        len(files) == 6 and fits == 3 and all((out / n).is_file() for n in files),
        f"{len(files)} outputs on disk ({', '.join(labels)} + overlays), "
        "each label map the size of its own input",
    )


@case("3", "predict --out into a dataset folder with classes.txt")
def predict_into_dataset(base: Base, d: Path) -> Row:
    data = base.copy_data(d / "data")
    before = snapshot(data)
    ran = run(
        [
            "fusioner",
            "predict",
            str(_voc_image("sample_0000")),
            "--model",
            str(base.run),
            "--classes",
            "cat",
            "--out",
            str(data),
        ],
        d,
    )
    msg = message(ran)
    return Row(
        "3",
        "",
        "`fusioner predict x.jpg --model RUN --classes cat --out DATASET` (holds classes.txt)",
        ran.rc,
        2,
        msg,
        _named(msg, [str(data / "classes.txt"), "did not write it"]),
        snapshot(data) == before,
        "classes.txt byte-identical, nothing added to the dataset folder",
    )


@case("4", "two trainings into one out_dir at once")
def two_trainings(base: Base, d: Path) -> Row:
    out = d / "run"
    config = base.write_config(
        d / "c.yaml", out_dir=str(out), epochs=100000, max_steps=100000, checkpoint_every=100000, log_every=1
    )
    log = open(d / "first.err", "w")  # noqa: SIM115 (closed below)
    first = subprocess.Popen(
        [str(BIN / "fusioner"), "train", "--config", str(config)],
        cwd=d,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "run.lock.json").is_file() or not (out / "config.yaml").is_file():
            if first.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the first training never took its lock (exit {first.poll()})")
            time.sleep(0.2)
        recorded = (out / "config.yaml").read_bytes()
        second = run(["fusioner", "train", "--config", str(config)], d)
        running = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)  # our own process: done with it
        first.wait()
        log.close()
    steps = [
        json.loads(ln)["step"] for ln in (out / "losses.jsonl").read_text().splitlines() if ln.endswith("}")
    ]
    msg = message(second)
    ordered = steps == list(range(steps[0], steps[0] + len(steps))) if steps else True
    return Row(
        "4",
        "",
        "`fusioner train --config c.yaml` started in the background; once its lock exists, the same again",
        second.rc,
        2,
        msg,
        _named(msg, [str(out), f"process {first.pid}", "in use"]),
        running and (out / "config.yaml").read_bytes() == recorded and ordered,
        f"the first kept training meanwhile; its config.yaml unchanged; losses.jsonl steps "
        f"{steps[0] if steps else '-'}..{steps[-1] if steps else '-'} in order, none twice",
    )


def _refused_value(item: str, overrides: list[str], needles: list[str]):
    def check(base: Base, d: Path) -> Row:
        out = d / "run"
        ran = run(
            [
                "fusioner",
                "train",
                "--config",
                str(base.write_config(d / "c.yaml", out_dir=str(out))),
                *overrides,
            ],
            d,
        )
        msg = message(ran)
        return Row(
            item,
            "",
            f"`fusioner train --config c.yaml {' '.join(overrides)}`",
            ran.rc,
            2,
            msg,
            _named(msg, needles),
            not out.exists(),
            "out_dir never created: no config.yaml, no lock file",
        )

    return check


for _item, _override, _needles in [
    ("5", ["temperature=0"], ["'temperature'", "got 0"]),
    ("5", ["threshold=1.5"], ["'threshold'", "1.5"]),
    ("5", ["lr=nan"], ["'lr'", "nan"]),
    ("WEAK", ["batch_size=-2"], ["'batch_size'", "-2"]),
    ("WEAK", ["image_size=0"], ["'image_size'", "got 0"]),
    ("WEAK", ["epochs=-1"], ["'epochs'", "-1"]),
    ("5", ["dataset=pascal5i", "fold=4"], ["'fold'", "4", "pascal5i"]),
]:
    case(_item, f"config value no run can use: {' '.join(_override)}")(
        _refused_value(_item, _override, _needles)
    )


@case("5", "a non-finite loss (lr=1e30, finite and accepted, diverges)")
def non_finite_loss(base: Base, d: Path) -> Row:
    out = d / "run"
    config = base.write_config(d / "c.yaml", out_dir=str(out), max_steps=8)
    ran = run(["fusioner", "train", "--config", str(config), "lr=1e30"], d)
    msg = message(ran)
    named = re.search(r"last good checkpoint: (\S+)", msg)
    ckpt = Path(named.group(1)) if named else None
    return Row(
        "5",
        "",
        "`fusioner train --config c.yaml lr=1e30` (8 steps, checkpoints every 2)",
        ran.rc,
        2,
        msg,
        _named(msg, ["the loss is nan at step"]) and ckpt is not None,
        ckpt is not None and (ckpt / "model.safetensors").is_file() and not (out / "model").exists(),
        f"the named checkpoint {ckpt.name if ckpt else '?'} intact on disk; "
        "no model/ written from the diverged run",
    )


def _overflowing(base: Base, d: Path, overrides: list[str]) -> Row:
    """A training whose lr no float32 step survives: refused, or stopped as divergence, naming lr."""
    out = d / "run"
    config = base.write_config(d / "c.yaml", out_dir=str(out), max_steps=8)
    ran = run(["fusioner", "train", "--config", str(config), *overrides], d)
    msg = message(ran)
    return Row(
        "5+",
        "",
        f"`fusioner train --config c.yaml {' '.join(overrides)}`",
        ran.rc,
        2,
        msg,
        _named(msg, ["lr"], absent=("Traceback",)),
        not (out / "model").exists(),
        "no model/ written from the failed run",
    )


@case("5+", "an lr finite in Python but beyond float32 (lr=1e39; not in the issue's list)")
def overflowing_lr(base: Base, d: Path) -> Row:
    return _overflowing(base, d, ["lr=1e39"])


@case("5+", "an lr within float32 whose first Adam step is not (lr=1e38, no warmup; not in the list)")
def overflowing_update(base: Base, d: Path) -> Row:
    return _overflowing(base, d, ["lr=1e38", "warmup_steps=0"])


def _fss(root: Path) -> Path:
    """Four FSS-1000 classes of one image each (the layout mosaic4 reads): 96 distinct mosaics."""
    for c, name in enumerate(["sample_0000", "sample_0008", "sample_0060", "sample_0120"]):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        Image.open(_voc_image(name)).convert("RGB").resize((16, 16)).save(folder / "1.jpg")
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(folder / "1.png")
    return root


@case("6", "mosaic4 generate --num beyond the distinct count")
def mosaic_too_many(base: Base, d: Path) -> Row:
    fss, out = _fss(d / "fss"), d / "mosaic4"
    ran = run(
        [
            "mosaic4",
            "generate",
            "--fss-root",
            str(fss),
            "--out",
            str(out),
            "--tile-size",
            "8",
            "--num",
            "3000",
        ],
        d,
    )
    msg = message(ran)
    return Row(
        "6",
        "",
        "`mosaic4 generate --fss-root FSS (4 classes x 1 image) --num 3000`",
        ran.rc,
        2,
        msg,
        _named(msg, ["--num 3000", "96 distinct", "--allow-repeats"]),
        not out.exists(),
        "no output folder written",
    )


@case("6", "mosaic4 generate --num beyond the distinct count, with --allow-repeats")
def mosaic_allow_repeats(base: Base, d: Path) -> Row:
    fss, out = _fss(d / "fss"), d / "mosaic4"
    ran = run(
        [
            "mosaic4",
            "generate",
            "--fss-root",
            str(fss),
            "--out",
            str(out),
            "--tile-size",
            "8",
            "--num",
            "150",
            "--allow-repeats",
        ],
        d,
    )
    msg = message(ran, r"wrote \d+ mosaics.*")
    return Row(
        "6",
        "",
        "`mosaic4 generate ... --num 150 --allow-repeats`",
        ran.rc,
        0,
        msg,
        _named(msg, ["wrote 150 mosaics", "distinct", "repeat"]),
        out.is_dir() and any(out.iterdir()),
        "the output folder written, its repeats counted in the message",
    )


@case("7", "folder training: images that hold no seen class")
def no_seen_class(base: Base, d: Path) -> Row:
    unseen = ["cow", "sheep", "aeroplane"]
    config = base.write_config(d / "c.yaml", unseen_classes=unseen, out_dir=str(d / "run"))
    seen_labels = {i for i, n in enumerate(VOC_NAMES) if i and n not in unseen}
    holding = [
        i
        for i in base.train_ids
        if set(np.unique(np.asarray(Image.open(base.data / "masks" / f"{i}.png"))).tolist()) & seen_labels
    ]
    ran = run(["fusioner", "cache", "--config", str(config)], d)
    msg = message(ran, r"train: \d+ images cached in .*")
    shown = re.match(r"train: (\d+)", msg)
    count = int(shown.group(1)) if shown else -1
    return Row(
        "7",
        "",
        "`fusioner cache --config c.yaml` with unseen_classes=cow,sheep,aeroplane (the training split)",
        ran.rc,
        0,
        msg,
        shown is not None,
        count == len(holding) < len(base.train_ids),
        f"train.txt lists {len(base.train_ids)}; {len(holding)} hold a seen class; "
        f"the split trains on {count}",
    )


@case("WEAK", "damaged latest checkpoint (truncated model.safetensors)")
def damaged_checkpoint(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    latest = r / "checkpoints" / "step-00000004"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    damaged = weights.read_bytes()
    ran = run(["fusioner", "train", "--config", str(r / "config.yaml"), "--resume"], d)
    msg = message(ran)
    aside = r / "checkpoints" / "step-00000004.damaged" / "model.safetensors"
    fell_back = "resuming from step-00000002" in ran.err
    return Row(
        "WEAK",
        "",
        "truncate RUN/checkpoints/step-00000004/model.safetensors; `fusioner train ... --resume`",
        ran.rc,
        0,
        msg,
        _named(msg, [str(latest), "damaged", "truncated"]) and fell_back,
        aside.is_file()
        and aside.read_bytes() == damaged
        and (latest / "model.safetensors").is_file()
        and (r / "model" / "model.safetensors").is_file(),
        "resumed from step-00000002 (second warning); the damaged one kept as step-00000004.damaged; "
        "step-00000004 and model/ written again",
    )


def _damaged_model(base: Base, d: Path, damage: Callable[[Path], None], did: str, needles: list[str]) -> Row:
    model = Path(shutil.copytree(base.run / "model", d / "model"))
    damage(model)
    before = snapshot(model)
    out = d / "out"
    ran = run(
        [
            "fusioner",
            "predict",
            str(_voc_image("sample_0000")),
            "--model",
            str(model),
            "--classes",
            "cat",
            "--out",
            str(out),
        ],
        d,
    )
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        f"{did}; `fusioner predict x.jpg --model MODEL --classes cat --out OUT`",
        ran.rc,
        2,
        msg,
        _named(msg, needles, absent=("Traceback",)),
        snapshot(model) == before and not out.exists(),
        "the model folder untouched (not deleted or rewritten); no --out folder created",
    )


@case("WEAK", "truncated model.safetensors")
def truncated_weights(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])

    return _damaged_model(
        base, d, damage, "cut 100 bytes off MODEL/model.safetensors", [str(d / "model" / "model.safetensors")]
    )


@case("WEAK", "cut-off config.json")
def cut_config_json(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[: len(text) // 2])

    return _damaged_model(
        base, d, damage, "cut MODEL/config.json in half", [str(d / "model" / "config.json")]
    )


@case("WEAK", "config.json head width not fitting the backbone")
def head_width(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        record = json.loads((model / "config.json").read_text())
        record["head"]["vision_dim"] = 999
        (model / "config.json").write_text(json.dumps(record))

    return _damaged_model(
        base,
        d,
        damage,
        'set "head.vision_dim": 999 in MODEL/config.json',
        [str(d / "model" / "config.json"), "vision_dim is 999", "wide"],
    )


@case("WEAK", "corrupt cache index.json")
def corrupt_index(base: Base, d: Path) -> Row:
    cache = Path(shutil.copytree(base.cache, d / "cache"))
    cache_dir, before = index_of(cache)
    index = cache_dir / "index.json"
    index.write_bytes(b'{"key": {"vision": "efficientnet_lite0"}, "shards": {')
    config = base.write_config(d / "c.yaml", cache_dir=str(cache), out_dir=str(d / "run"))
    ran = run(["fusioner", "cache", "--config", str(config)], d)
    msg = message(ran)
    try:
        after = json.loads(index.read_text())
        listed = sorted(after["shards"])
    except (ValueError, KeyError):
        after, listed = {"items": {}}, []
    on_disk = sorted(p.name for p in cache_dir.glob("shard-*.safetensors"))
    return Row(
        "WEAK",
        "",
        "cut CACHE/<key>/index.json mid-JSON; `fusioner cache --config c.yaml`",
        ran.rc,
        0,
        msg,
        _named(msg, [str(index), "unreadable"]),
        set(after["items"]) == set(before["items"]) and listed == on_disk,
        f"index rebuilt: {len(after['items'])} of {len(before['items'])} items listed; "
        "shards on disk = listed",
    )


@case("WEAK", "a config file that is not UTF-8")
def not_utf8(base: Base, d: Path) -> Row:
    path = base.write_config(d / "c.yaml", out_dir=str(d / "run"))
    path.write_bytes(path.read_bytes() + "# notes: caf\xe9 au lait\n".encode("latin-1"))
    before = path.read_bytes()
    ran = run(["fusioner", "train", "--config", str(path)], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`fusioner train --config c.yaml` (saved as Latin-1: `caf\\xe9` in a comment)",
        ran.rc,
        2,
        msg,
        _named(msg, [str(path), "not UTF-8", "0xe9"]),
        path.read_bytes() == before and not (d / "run").exists(),
        "the file's bytes unchanged; out_dir never created",
    )


@case("WEAK", "a mistyped local model path")
def mistyped_model(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    typo = d / "rnu"
    ran = run(["fusioner", "eval", "--model", str(typo)], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`fusioner eval --model DIR/rnu` (meant DIR/run; DIR exists)",
        ran.rc,
        2,
        msg,
        _named(msg, [str(typo), "does not exist"], absent=("Hub", "huggingface")),
        not typo.exists() and (r / "model").is_dir(),
        "nothing created; the real run untouched",
    )


@case("WEAK", "evaluation where no image holds an unseen name")
def eval_no_unseen(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    out = d / "metrics.json"
    ran = run(["fusioner", "eval", "--model", str(r), "--out", str(out), "unseen_classes=horse"], d)
    msg = message(ran)
    written = out if out.is_file() else out / "metrics.json"
    miou = json.loads(written.read_text())["one_way"]["miou"] if written.is_file() else 0.0
    undefined = miou is None or (isinstance(miou, float) and math.isnan(miou))
    return Row(
        "WEAK",
        "",
        "`fusioner eval --model RUN --out metrics.json unseen_classes=horse` (no val image holds horse)",
        ran.rc,
        0,
        msg,
        _named(msg, ["horse", "undefined"]),
        written.is_file() and undefined,
        f"metrics.json written, one_way.miou = {miou!r} (not 0.0)",
    )


@case("WEAK", "FusionerModel.predict with 0-255 inputs")
def predict_0_255(base: Base, d: Path) -> Row:
    snippet = (
        "import numpy as np, torch; from PIL import Image; from fusioner.model import FusionerModel\n"
        f"model = FusionerModel.from_pretrained({str(base.run / 'model')!r})\n"
        f"image = torch.from_numpy(np.asarray(Image.open({str(_voc_image('sample_0000'))!r})))\n"
        "image = image.permute(2, 0, 1)\n"
        "labels = model.predict(image.float()[None], ['cat', 'dog'])  # forgot / 255\n"
        "print('labels', labels.unique().tolist())\n"
    )
    ran = run([sys.executable, "-c", snippet], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`python -c` FusionerModel.predict(uint8 image .float(), ['cat','dog']) (no / 255)",
        ran.rc,
        1,
        msg,
        _named(msg, ["FusionerError", "0 to 255", "expected [0, 1]"]),
        "labels" not in ran.out,
        "no labels returned (exit 1 = the uncaught FusionerError of a Python snippet)",
    )


# -- the table -----------------------------------------------------------------------------------------
def _cell(text: str, tmp: Path) -> str:
    return text.replace(str(tmp), "$T").replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row], tmp: Path) -> str:
    lines = [
        "| # | case (issue item) | what the user did | exit code | first line of stderr (the message) "
        "| nothing lost? | verdict GOOD/BAD |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, row in enumerate(rows, 1):
        code = "-" if row.rc is None else str(row.rc)
        if row.rc != row.expected_rc:
            code += f" (want {row.expected_rc})"
        lost = ("yes: " if row.lost_ok else "NO: ") + row.lost
        lines.append(
            f"| {n} | {_cell(row.case, tmp)} ({row.item}) | {_cell(row.did, tmp)} | {code} "
            f"| {_cell(row.message, tmp) or '(none)'} | {_cell(lost, tmp)} "
            f"| {'GOOD' if row.good else 'BAD'} |"
        )
    return "\n".join(lines) + "\n"


def run_case(base: Base, n: int, item: str, name: str, fn: Callable[[Base, Path], Row]) -> Row:
    folder = base.tmp / f"{n:02d}-{fn.__name__}"
    folder.mkdir()
    try:
        row = fn(base, folder)
    except Exception as e:  # the battery's own setup failed: a BAD row that says so, not a crash
        row = Row(
            item,
            name,
            "(setup failed)",
            None,
            0,
            f"battery error: {type(e).__name__}: {e}",
            False,
            False,
            "-",
        )
    row.case, row.item = name, item
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "faults" / "battery.md")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each is a subprocess)")
    parser.add_argument("--only", help="comma-separated substrings of case names to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and say where")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fusioner-faults-"))
    try:
        base = build_base(tmp)
        chosen = [c for c in CASES if not args.only or any(s in c[1] for s in args.only.split(","))]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(run_case, base, n, *c) for n, c in enumerate(chosen, 1)]
            rows = [f.result() for f in futures]
        elapsed = time.monotonic() - t0
        text = table(rows, tmp)
        bad = [f"{n}" for n, r in enumerate(rows, 1) if not r.good]
        summary = (
            f"\n{len(rows)} cases, {len(rows) - len(bad)} GOOD, {len(bad)} BAD"
            f"{' (rows ' + ', '.join(bad) + ')' if bad else ''}; {elapsed:.0f} s with --jobs {args.jobs}\n"
        )
        print(text + summary)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        partial.write_text(f"# Issue 13 fault battery\n\n`python benchmarks/faults.py`\n\n{text}{summary}")
        os.replace(partial, args.out)
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
