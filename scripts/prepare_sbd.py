"""Write VOC2012/SegmentationClassAug (the 10,582-image train_aug masks PASCAL-5i trains on) from SBD.

SBD (benchmark_RELEASE/dataset/cls/*.mat) and VOC's own SegmentationClass PNGs; VOC's mask wins
where both exist (`fusioner.data.ov.prepare.prepare_sbd`).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fusioner.data.ov.prepare import prepare_sbd, run_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sbd_root", help="SBD's benchmark_RELEASE/dataset folder (holding cls/)")
    parser.add_argument("voc_root", help="the VOCdevkit/VOC2012 folder")
    args = parser.parse_args(argv)

    def work() -> str:
        written = prepare_sbd(args.sbd_root, args.voc_root, progress=tqdm)
        return f"wrote {written} masks into {args.voc_root}/SegmentationClassAug"

    return run_script("prepare_sbd", work)


if __name__ == "__main__":
    sys.exit(main())
