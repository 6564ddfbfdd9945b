"""Issue 13, items 1-3: a stale feature cache, a resume under another config, predict's output names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from faultcases.common import (
    Base,
    Ran,
    Row,
    case,
    index_of,
    mentions,
    message,
    run,
    shard_tensor,
    snapshot,
    voc_image,
)


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
        mentions(msg, ["1 images of"]),
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
        mentions(msg, ["1 images of"]),
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
        new_dir is not None and mentions(msg, [str(new_dir)]),
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
        mentions(msg, [str(path), "label 42"]),
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
        mentions(msg, [str(r), "unseen_classes: ['cow', 'sheep'] -> ['cow', 'horse']", "lr: 0.002 -> 0.2"]),
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
        mentions(msg, ["trained 4 steps"]),
        kept and config.get("log_every") == 3,
        f"config.yaml records log_every={config.get('log_every')}; model and step-00000004 kept",
    )


@case("3", "predict: inputs sharing a stem")
def colliding_stems(base: Base, d: Path) -> Row:
    sources = {"a/photo.jpg": "sample_0000", "b/photo.jpg": "sample_0008", "a/photo.png": "sample_0060"}
    images = []
    for rel, name in sources.items():
        path = d / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(voc_image(name)).save(path)
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
            str(voc_image("sample_0000")),
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
        mentions(msg, [str(data / "classes.txt"), "did not write it"]),
        snapshot(data) == before,
        "classes.txt byte-identical, nothing added to the dataset folder",
    )
