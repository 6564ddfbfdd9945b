"""Make Mosaic-4 from FSS-1000: plan each mosaic from the seed, render it, write it out atomically.

A mosaic is decided before any pixel is read (:func:`plan_sample`): four distinct classes, one
image of each, and the tile each lands on. Sample ``i`` draws from its own generator seeded with
``(seed, i)``, so a sample does not depend on the others: the first 100 samples of a 1000-sample
set are the 100-sample set, and worker processes can render any range of indices.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fusioner.data.mosaic import FEATURES, TILES
from fusioner.errors import ConfigError, DataError, FusionerError
from mosaic4.fss import FSSClass, FSSImage, load_image, load_mask

SPLIT = "test"  # Mosaic-4 is an evaluation set: one split
IMAGE_FORMATS = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 95}}
MAX_PARQUET_SHARD_BYTES = 500 << 20  # the Hub's recommended parquet shard size


@dataclass(frozen=True)
class MosaicOptions:
    """Everything that, with the source files, fixes the output bytes."""

    num: int = 1000
    seed: int = 0
    tile_size: int = 224  # each tile is resized to tile_size x tile_size; mosaics are twice that
    query_tile: int | None = None  # None: uniform over the four tiles; 0..3: always that tile
    image_format: str = "png"  # png (lossless) | jpeg (quality 95, ~5x smaller)

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ConfigError(f"option 'num': {self.num} samples; expected at least 1")
        if self.seed < 0:
            raise ConfigError(f"option 'seed': {self.seed}; expected a non-negative integer")
        if self.tile_size < 8:
            raise ConfigError(f"option 'tile_size': {self.tile_size}; expected at least 8 pixels")
        if self.query_tile is not None and not 0 <= self.query_tile < TILES:
            raise ConfigError(f"option 'query_tile': {self.query_tile}; expected 0..{TILES - 1} or None")
        if self.image_format not in IMAGE_FORMATS:
            known = ", ".join(IMAGE_FORMATS)
            raise ConfigError(f"option 'image_format': {self.image_format!r}; expected one of {known}")


@dataclass(frozen=True)
class Plan:
    """One mosaic before rendering: the source of each tile (row-major) and the query's tile."""

    index: int
    tiles: tuple[FSSImage, ...]
    names: tuple[str, ...]
    query: int


def check_classes(classes: Sequence[FSSClass]) -> None:
    """Refuse a pool too small for four distinct classes per mosaic."""
    if len(classes) < TILES:
        where = ", ".join(str(c.path) for c in classes) or "none"
        raise DataError(f"Mosaic-4 needs at least {TILES} classes with images; got {len(classes)}: {where}")


def distinct_mosaics(classes: Sequence[FSSClass], options: MosaicOptions) -> int:
    """How many different mosaics ``classes`` allow: four distinct classes placed on the four tiles,
    one image of each, times the query's tile (4 choices, or 1 with a fixed ``query_tile``)."""
    # by_count[k]: the ways to pick k classes (unordered) and one image of each; a class of n images
    # adds n ways to every pick that lacks it.
    by_count = [1] + [0] * TILES
    for c in classes:
        for k in range(TILES, 0, -1):
            by_count[k] += by_count[k - 1] * len(c.images)
    return by_count[TILES] * math.factorial(TILES) * (TILES if options.query_tile is None else 1)


def drawn_distinct(classes: Sequence[FSSClass], options: MosaicOptions) -> int:
    """How many of the ``options.num`` planned mosaics differ (plans read no pixels: this is cheap)."""
    plans = (plan_sample(classes, options, i) for i in range(options.num))
    return len({(tuple(t.id for t in p.tiles), p.query) for p in plans})


def check_repeats(classes: Sequence[FSSClass], options: MosaicOptions, source: str | Path) -> int:
    """Refuse a set in which some mosaics repeat others, saying how many distinct ones there are.

    Returns the number of distinct mosaics drawn; the caller may skip this check to allow repeats.
    """
    possible = distinct_mosaics(classes, options)
    where = f"the {len(classes)} classes under {source}"
    remedy = "add classes or images, or pass --allow-repeats"
    if options.num > possible:
        raise DataError(
            f"--num {options.num} asks for more mosaics than {where} make: they allow {possible} distinct "
            f"mosaics; ask for at most {possible}, {remedy}"
        )
    drawn = drawn_distinct(classes, options)
    if drawn < options.num:
        raise DataError(
            f"--num {options.num} with --seed {options.seed} draws {drawn} distinct mosaics from {where} "
            f"({possible} possible); the other {options.num - drawn} repeat one of them: ask for fewer, "
            f"{remedy}"
        )
    return drawn


def plan_sample(classes: Sequence[FSSClass], options: MosaicOptions, index: int) -> Plan:
    """Sample ``index``: four distinct classes (the first drawn is the query), one image of each."""
    rng = np.random.default_rng(np.random.SeedSequence(options.seed, spawn_key=(index,)))
    picked = rng.choice(len(classes), size=TILES, replace=False)
    images = [classes[c].images[rng.integers(len(classes[c].images))] for c in picked]
    if options.query_tile is None:
        order = rng.permutation(TILES).tolist()  # order[t]: which drawn class sits on tile t
    else:
        order = list(range(1, TILES))
        order.insert(options.query_tile, 0)
    return Plan(
        index=index,
        tiles=tuple(images[o] for o in order),
        names=tuple(classes[picked[o]].name for o in order),
        query=order.index(0),
    )


def render(plan: Plan, tile_size: int) -> tuple[Image.Image, np.ndarray]:
    """The mosaic (RGB, ``2t x 2t``) and its label map (uint8 ``2t 2t``, tile j's object = j + 1)."""
    t = tile_size
    mosaic = Image.new("RGB", (2 * t, 2 * t))
    label = np.zeros((2 * t, 2 * t), dtype=np.uint8)  # h w
    for j, source in enumerate(plan.tiles):
        image, mask = load_image(source.image), load_mask(source.mask)
        if image.size != mask.shape[::-1]:  # checked at scan time; the files may have changed since
            raise DataError(f"mask {source.mask} is not the size of its image {source.image}")
        row, col = divmod(j, 2)
        # Bilinear (antialiased when shrinking) for pixels; nearest for the mask keeps it binary.
        mosaic.paste(image.resize((t, t), Image.Resampling.BILINEAR), (col * t, row * t))
        tile_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize((t, t), Image.Resampling.NEAREST)
        label[row * t : (row + 1) * t, col * t : (col + 1) * t][np.asarray(tile_mask) > 127] = j + 1
    return mosaic, label


def _encode(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def make_example(plan: Plan, options: MosaicOptions) -> dict:
    """One row of the dataset (see ``FEATURES``), both images already encoded; the label map as PNG."""
    mosaic, label = render(plan, options.tile_size)
    sources = [tile.id for tile in plan.tiles]
    # The id names the content, so a feature cache keyed on it can never mix up two Mosaic-4 sets.
    content = "|".join([*sources, str(plan.query), str(options.tile_size), options.image_format])
    return {
        "id": f"{plan.index:06d}-{hashlib.sha1(content.encode()).hexdigest()[:8]}",
        "image": {"bytes": _encode(mosaic, **IMAGE_FORMATS[options.image_format]), "path": None},
        "label": {"bytes": _encode(Image.fromarray(label), format="PNG"), "path": None},
        "names": list(plan.names),
        "sources": sources,
        "query": plan.query,
    }


def _examples(
    chunks: list[range], classes: tuple[FSSClass, ...], options: MosaicOptions, progress: bool
) -> Iterator[dict]:
    # Top-level and fed a list of ranges so datasets can hand one range to each worker process.
    for chunk in chunks:
        for index in tqdm(chunk, desc="mosaics", unit="mosaic", disable=not progress):
            yield make_example(plan_sample(classes, options, index), options)


def fingerprint(classes: Sequence[FSSClass], options: MosaicOptions) -> str:
    """A digest of everything the output depends on except pixel values: options and source files."""
    pool = [[c.folder, [image.id for image in c.images]] for c in classes]
    payload = json.dumps({"options": asdict(options), "pool": pool}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextmanager
def _generation_scope() -> Iterator[None]:
    """Around ``Dataset.from_generator``: our progress bar only, and our errors unwrapped.

    datasets draws its own bar while generating, without a total; ours has one (and an ETA), so
    theirs is switched off for the duration and their switch restored afterwards. datasets also
    wraps whatever the generator raises in DatasetGenerationError; a bad FSS file is the user's
    to fix, so its DataError is re-raised as it was, naming the file.
    """
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, FusionerError):
            raise e.__cause__ from None
        raise
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def generate(
    classes: Sequence[FSSClass],
    options: MosaicOptions,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Render ``options.num`` mosaics into a memory-mapped Dataset whose Arrow files live in ``cache_dir``.

    ``cache_dir`` should be fresh (a temporary directory): datasets reuses what it finds there.
    """
    check_classes(classes)
    jobs = max(1, min(num_proc or 1, options.num))
    bounds = np.linspace(0, options.num, jobs + 1).astype(int)
    with _generation_scope():
        return datasets.Dataset.from_generator(
            _examples,
            features=FEATURES,
            cache_dir=str(cache_dir),
            gen_kwargs={
                "chunks": [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                "classes": tuple(classes),  # a tuple: datasets shards lists only
                "options": options,
                "progress": progress,
            },
            num_proc=num_proc if jobs > 1 else None,
            split=SPLIT,
            # Given explicitly, the fingerprint is not a hash of the pickled generator, so the
            # state.json written by save_to_disk is the same on every run.
            fingerprint=fingerprint(classes, options),
        )


def export_parquet(data: datasets.Dataset, folder: str | Path) -> list[Path]:
    """Write ``folder/test-XXXXX-of-YYYYY.parquet`` shards of at most ~500 MB (the Hub's layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, math.ceil(data.data.nbytes / MAX_PARQUET_SHARD_BYTES))
    paths = []
    for i in range(num_shards):
        path = folder / f"{SPLIT}-{i:05d}-of-{num_shards:05d}.parquet"
        data.shard(num_shards=num_shards, index=i, contiguous=True).to_parquet(str(path))
        paths.append(path)
    return paths


def check_apart(out: str | Path, source: str | Path) -> None:
    """Refuse an output that is the source folder, holds it, or lies inside it.

    ``--overwrite`` replaces ``out`` as a whole, so an ``out`` equal to (or a parent of) the source
    would delete the source photos and whatever else is there; one inside the source would be
    scanned as a class folder by the next generation, or (``--overwrite``) replace one.
    """
    out_path, src = Path(out).resolve(), Path(source).resolve()
    if out_path == src or src.is_relative_to(out_path) or out_path.is_relative_to(src):
        where = "is" if out_path == src else "holds" if src.is_relative_to(out_path) else "is inside"
        raise DataError(
            f"output {out} {where} the source --fss-root {source}; writing it would replace the source "
            "photos: choose an output folder outside it"
        )


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out``; on success it replaces ``out`` in one rename.

    A failure or a killed process leaves ``out`` as it was (plus a hidden ``.<name>.*.tmp``
    folder at worst), never a half-written dataset. Scratch files can go in the staging
    directory's parent, which is removed too.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; expected a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output {out} already exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staging = scratch / "out"
        staging.mkdir()
        yield staging
        if out.exists():
            os.replace(out, scratch / "old")
        os.replace(staging, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_mosaic4(
    classes: Sequence[FSSClass],
    options: MosaicOptions,
    out: str | Path,
    *,
    card: str,
    overwrite: bool = False,
    progress: bool = True,
    num_proc: int | None = None,
) -> Path:
    """Generate and write ``out``: ``save_to_disk`` files, ``README.md`` (``card``) and ``data/*.parquet``.

    Read it locally with ``load_from_disk(out)``; ``README.md`` and ``data/`` are what
    :func:`mosaic4.card.publish` uploads, and the card's ``configs`` point ``load_dataset`` at ``data/``.
    """
    check_classes(classes)
    with atomic_directory(out, overwrite=overwrite) as staging:
        data = generate(classes, options, staging.parent / "cache", progress=progress, num_proc=num_proc)
        data.save_to_disk(str(staging))
        (staging / "README.md").write_text(card, encoding="utf-8")
        export_parquet(data, staging / "data")
        del data  # release the memory map before its cache folder is removed
    return Path(out)
