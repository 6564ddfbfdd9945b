"""Convert the official download to the layout of the `cocostuff171` reader.

The work is `fusioner.data.ov.prepare.prepare_cocostuff` (its docstring says what is read and written).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_cocostuff, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="the coco folder (holding stuffthingmaps/val2017)")
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_cocostuff(args.root, progress=tqdm)
        return f"wrote {written} label maps under {args.root}"

    return run_script("prepare_cocostuff", work)


if __name__ == "__main__":
    sys.exit(main())
