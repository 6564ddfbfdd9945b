"""Issues 13 and 21: hostile and careless cases, tried as a new user would, through the command line.

    OMP_NUM_THREADS=1 python benchmarks/faults.py [--out runs/faults/battery.md] [--jobs 2] [--keep]

Every case runs ``fusioner ...`` / ``mosaic4 ...`` (or, for the Python API, ``python -c``) as a
subprocess in a fresh folder of its own. One tiny run (the 14 VOC samples of ../shared, the default
EfficientNet-Lite0 + MiniLM pair, a ``tiny`` head, 64 px, 4 steps, checkpoints at 2 and 4) is trained
once and copied into the cases that need a run. Each row gives the exit code, the message (the
``error:`` / ``WARNING`` line of stderr, the exception line of a traceback, or for a success without
one the line that shows the outcome), a concrete "nothing lost" check, and the verdict: GOOD when the
exit code is the right one (2 for a refusal; 0 where success is right: a re-encoded cache, a fallback
to the previous checkpoint with a warning, ``--allow-repeats``; 1 for the uncaught error of a Python
snippet; 130 for Ctrl-C), the message names the file / key / value, and nothing was lost. The cases
live in ``benchmarks/faultcases/`` (one module per group, table order in its ``MODULES``); the
issue-21 rows are numbered ``21.<item>``, its WEAK rows ``21.W``. Paths in the table are
shown relative to the battery's temporary folder, ``$T``. The table is printed and written
atomically to ``--out``; the exit status is 1 when any row is BAD.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from faultcases import load_cases
from faultcases.common import ROOT, Base, Row, build_base

CASES = load_cases()


# -- the table -----------------------------------------------------------------------------------------
def _cell(text: str, tmp: Path) -> str:
    return text.replace(str(tmp), "$T").replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row], tmp: Path) -> str:
    lines = [
        "| # | case (issue item) | what the user did | exit code | first line of stderr (the message) "
        "| nothing lost? | verdict GOOD/BAD |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, row in enumerate(rows, 1):
        code = "-" if row.rc is None else str(row.rc)
        if row.rc != row.expected_rc:
            code += f" (want {row.expected_rc})"
        lost = ("yes: " if row.lost_ok else "NO: ") + row.lost
        lines.append(
            f"| {n} | {_cell(row.case, tmp)} ({row.item}) | {_cell(row.did, tmp)} | {code} "
            f"| {_cell(row.message, tmp) or '(none)'} | {_cell(lost, tmp)} "
            f"| {'GOOD' if row.good else 'BAD'} |"
        )
    return "\n".join(lines) + "\n"


def run_case(base: Base, n: int, item: str, name: str, fn: Callable[[Base, Path], Row]) -> Row:
    folder = base.tmp / f"{n:02d}-{fn.__name__}"
    folder.mkdir()
    try:
        row = fn(base, folder)
    except Exception as e:  # the battery's own setup failed: a BAD row that says so, not a crash
        row = Row(
            item,
            name,
            "(setup failed)",
            None,
            0,
            f"battery error: {type(e).__name__}: {e}",
            False,
            False,
            "-",
        )
    row.case, row.item = name, item
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "faults" / "battery.md")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each is a subprocess)")
    parser.add_argument("--only", help="comma-separated substrings of case names to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and say where")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fusioner-faults-"))
    try:
        base = build_base(tmp)
        chosen = [c for c in CASES if not args.only or any(s in c[1] for s in args.only.split(","))]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(run_case, base, n, *c) for n, c in enumerate(chosen, 1)]
            rows = [f.result() for f in futures]
        elapsed = time.monotonic() - t0
        text = table(rows, tmp)
        bad = [f"{n}" for n, r in enumerate(rows, 1) if not r.good]
        summary = (
            f"\n{len(rows)} cases, {len(rows) - len(bad)} GOOD, {len(bad)} BAD"
            f"{' (rows ' + ', '.join(bad) + ')' if bad else ''}; {elapsed:.0f} s with --jobs {args.jobs}\n"
        )
        print(text + summary)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        title = "# Fault battery (issues 13 and 21)\n\n`python benchmarks/faults.py`\n\n"
        partial.write_text(f"{title}{text}{summary}")
        os.replace(partial, args.out)
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
