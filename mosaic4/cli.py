"""``mosaic4``: generate, publish and look at the Mosaic-4 benchmark.

    mosaic4 generate --fss-root FSS-1000 --out mosaic4 --num 1000 --seed 0 [--classes-file test.txt]
                     [--tile-size 224] [--allow-repeats] [--push-to-hub USER/mosaic4]
    mosaic4 show mosaic4 --index 0 --out mosaic.png

Errors of the user's making print one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fusioner.errors import DataError, FusionerError
from fusioner.io import atomic_write

# One outline colour per tile (label j + 1): distinct on photos and for common colour blindness.
TILE_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (204, 121, 167))


def outline(region: np.ndarray) -> np.ndarray:
    """The border of a boolean ``h w`` region, widened to three pixels so it shows on a photo."""
    p = np.pad(region, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    q = np.pad(region & ~interior, 1)
    return q[1:-1, 1:-1] | q[:-2, 1:-1] | q[2:, 1:-1] | q[1:-1, :-2] | q[1:-1, 2:]


def draw_preview(
    image: Image.Image, label: np.ndarray, names: Sequence[str], query: int | None = None
) -> Image.Image:
    """The mosaic with each tile's object outlined in its colour and its class name written on it."""
    pixels = np.asarray(image.convert("RGB")).copy()  # h w 3
    for j, colour in enumerate(TILE_COLOURS[: len(names)]):
        pixels[outline(label == j + 1)] = colour
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    tile = canvas.width // 2
    font = ImageFont.load_default(size=max(10, tile // 14))
    for j, name in enumerate(names):
        text = f"{j + 1}: {name}" + (" (query)" if j == query else "")
        x, y = (j % 2) * tile + 4, (j // 2) * tile + 4
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((x, y), text, fill=TILE_COLOURS[j % len(TILE_COLOURS)], font=font)
    return canvas


def _generate(args: argparse.Namespace) -> None:
    from mosaic4.card import build_card, publish
    from mosaic4.fss import read_class_list, scan_fss
    from mosaic4.generate import (
        MosaicOptions,
        check_apart,
        check_classes,
        check_repeats,
        drawn_distinct,
        write_mosaic4,
    )

    check_apart(args.out, args.fss_root)  # before anything is read or written

    options = MosaicOptions(
        num=args.num,
        seed=args.seed,
        tile_size=args.tile_size,
        query_tile=args.query_tile,
        image_format=args.image_format,
    )
    names = read_class_list(args.classes_file) if args.classes_file else None
    classes = scan_fss(args.fss_root, names, min_images=args.min_images)
    check_classes(classes)
    # A small source cannot fill a large set: say so, rather than write mostly repeats.
    distinct = (
        drawn_distinct(classes, options)
        if args.allow_repeats
        else check_repeats(classes, options, args.fss_root)
    )
    card = build_card(options, classes, args.classes_file)
    out = write_mosaic4(
        classes, options, args.out, card=str(card), overwrite=args.overwrite, num_proc=args.num_proc
    )
    repeats = options.num - distinct
    note = f"; {distinct} distinct, the other {repeats} repeat one of them" if repeats else ""
    print(f"wrote {options.num} mosaics of {len(classes)} classes to {out}{note}")
    if args.push_to_hub:
        publish(out, args.push_to_hub, private=args.private)
        print(f"pushed {out} to https://huggingface.co/datasets/{args.push_to_hub}")


def _show(args: argparse.Namespace) -> None:
    from fusioner.data.mosaic import load_mosaic4

    data = load_mosaic4(args.dir)
    if not -len(data) <= args.index < len(data):
        raise DataError(f"--index {args.index} is out of range: {args.dir} has {len(data)} samples")
    row = data[args.index]
    preview = draw_preview(row["image"], np.asarray(row["label"]), row["names"], row["query"])
    atomic_write(args.out, lambda tmp: preview.save(tmp, format="PNG"))
    print(f"wrote {args.out}: sample {row['id']} ({', '.join(row['names'])})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic4", description="The Mosaic-4 benchmark, Fusioner BMVC 2022")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="make Mosaic-4 from an FSS-1000 copy")
    gen.add_argument("--fss-root", type=Path, required=True, help="ROOT/<class>/<k>.jpg with <k>.png masks")
    gen.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    gen.add_argument("--num", type=int, default=1000, help="number of mosaics (default 1000)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same files -> byte-identical output")
    gen.add_argument("--tile-size", type=int, default=224, help="tile side in pixels; mosaics are twice that")
    gen.add_argument("--classes-file", type=Path, help="class folder names, one a line (default: all)")
    gen.add_argument("--query-tile", type=int, choices=range(4), help="the query's tile (default: uniform)")
    gen.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="mosaic encoding")
    gen.add_argument("--min-images", type=int, default=1, help="refuse class folders with fewer pairs")
    gen.add_argument("--num-proc", type=int, help="worker processes for rendering")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    gen.add_argument(
        "--allow-repeats",
        action="store_true",
        help="write --num mosaics even if some repeat others (a small source allows few distinct ones)",
    )
    gen.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub dataset repo (user/name)")
    gen.add_argument("--private", action="store_true", help="create the Hub repo as private")
    gen.set_defaults(run=_generate)

    show = commands.add_parser("show", help="draw one mosaic with its masks outlined and names written")
    show.add_argument("dir", type=Path, help="a directory written by `mosaic4 generate`")
    show.add_argument("--index", type=int, default=0, help="sample index (default 0)")
    show.add_argument("--out", type=Path, required=True, help="PNG file to write")
    show.set_defaults(run=_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except FusionerError as e:
        print(f"mosaic4: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
