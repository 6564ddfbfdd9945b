"""Convert the official download to the layout of the `pc59 / pc459` reader.

The work is `fusioner.data.ov.prepare.prepare_pascal_context` (its docstring says what is read and written).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_pascal_context, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "root",
        help="the VOCdevkit/VOC2010 folder (trainval_merged.json and/or trainval/ + pascalcontext_val.txt)",
    )
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_pascal_context(args.root, progress=tqdm)
        return f"wrote {written} label maps under {args.root}"

    return run_script("prepare_pascal_context", work)


if __name__ == "__main__":
    sys.exit(main())
