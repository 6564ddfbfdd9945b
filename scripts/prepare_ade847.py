"""Convert the official download to the layout of the `ade847` reader.

The work is `fusioner.data.ov.prepare.prepare_ade847` (its docstring says what is read and written).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_ade847, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="the ADE20K_2021_17_01 folder (holding index_ade20k.pkl)")
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_ade847(args.root, progress=tqdm)
        return f"wrote {written} label maps under {args.root}"

    return run_script("prepare_ade847", work)


if __name__ == "__main__":
    sys.exit(main())
