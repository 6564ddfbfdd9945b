"""Convert the official download to the layout of the `ade150` reader.

The work is `fusioner.data.ov.prepare.prepare_ade150` (its docstring says what is read and written).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_ade150, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="the ADEChallengeData2016 folder (holding annotations/validation)")
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_ade150(args.root, progress=tqdm)
        return f"wrote {written} label maps under {args.root}"

    return run_script("prepare_ade150", work)


if __name__ == "__main__":
    sys.exit(main())
