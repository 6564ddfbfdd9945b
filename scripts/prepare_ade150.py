"""Convert the official download to the layout of the `ade150` reader.

The work is `fusioner.data.ov.prepare.prepare_ade150` (its docstring says what is read and written).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_ade150
from fusioner.errors import FusionerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="the ADEChallengeData2016 folder (holding annotations/validation)")
    args = parser.parse_args(argv)
    try:
        written = prepare_ade150(args.root, progress=tqdm)
    except FusionerError as e:
        print(f"prepare_ade150: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} label maps under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
