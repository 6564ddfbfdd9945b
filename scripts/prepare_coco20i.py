"""Render COCO-20i's class masks from the COCO 2014 instance annotations, ahead of training / evaluation.

The reader renders a missing mask on first use; this renders them all once
(`fusioner.data.ov.prepare.prepare_coco20i`, rules in `fusioner.data.coco20i`).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_coco20i, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "root", help="the COCO folder (train2014/, val2014/, annotations/instances_*2014.json)"
    )
    parser.add_argument("--split", choices=("train", "val"), default="val")
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_coco20i(args.root, args.split, progress=tqdm)
        return f"rendered {written} masks of COCO {args.split}2014 under {args.root}/fusioner_masks"

    return run_script("prepare_coco20i", work)


if __name__ == "__main__":
    sys.exit(main())
