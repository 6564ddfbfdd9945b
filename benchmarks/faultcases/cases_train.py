"""Issue 13, items 4-7: two trainings at once, refused or overflowing values, Mosaic-4, no seen class."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from faultcases.common import (
    BIN,
    ENV,
    VOC_NAMES,
    Base,
    Row,
    case,
    mentions,
    message,
    run,
    voc_image,
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
        mentions(msg, [str(out), f"process {first.pid}", "in use"]),
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
            mentions(msg, needles),
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
        mentions(msg, ["the loss is nan at step"]) and ckpt is not None,
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
        mentions(msg, ["lr"], absent=("Traceback",)),
        not (out / "model").exists(),
        "no model/ written from the failed run",
    )


@case("5+", "an lr finite in Python but beyond float32 (lr=1e39; not in the issue's list)")
def overflowing_lr(base: Base, d: Path) -> Row:
    return _overflowing(base, d, ["lr=1e39"])


@case("5+", "an lr within float32 whose first Adam step is not (lr=1e38, no warmup; not in the list)")
def overflowing_update(base: Base, d: Path) -> Row:
    return _overflowing(base, d, ["lr=1e38", "warmup_steps=0"])


def fss_tree(root: Path) -> Path:
    """Four FSS-1000 classes of one image each (the layout mosaic4 reads): 96 distinct mosaics."""
    for c, name in enumerate(["sample_0000", "sample_0008", "sample_0060", "sample_0120"]):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        Image.open(voc_image(name)).convert("RGB").resize((16, 16)).save(folder / "1.jpg")
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(folder / "1.png")
    return root


@case("6", "mosaic4 generate --num beyond the distinct count")
def mosaic_too_many(base: Base, d: Path) -> Row:
    fss, out = fss_tree(d / "fss"), d / "mosaic4"
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
        mentions(msg, ["--num 3000", "96 distinct", "--allow-repeats"]),
        not out.exists(),
        "no output folder written",
    )


@case("6", "mosaic4 generate --num beyond the distinct count, with --allow-repeats")
def mosaic_allow_repeats(base: Base, d: Path) -> Row:
    fss, out = fss_tree(d / "fss"), d / "mosaic4"
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
        mentions(msg, ["wrote 150 mosaics", "distinct", "repeat"]),
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
