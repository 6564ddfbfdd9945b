"""Model quality: the head's design choices on CCP (real photos) and the quickstart, one row each.

Every row is a real ``fusioner train`` + ``fusioner eval`` (or ``fusioner quickstart``) with the
overrides it names on top of ``configs/folder/ccp.yaml`` (or the quickstart's own setting), run in a
child process so rows share nothing but the feature cache. Finished rows are skipped, so a killed
run resumes where it stopped. Appends each row to ``benchmarks/quality_results.jsonl`` (the
committed record) and rewrites ``benchmarks/QUALITY.md`` from it.

    python benchmarks/quality.py --suite ccp --rows landed ce ... --jobs 2      # ~6-20 min a row
    python benchmarks/quality.py --suite ccp --rows default default-shuffled --seeds 0 1 2
    python benchmarks/quality.py --suite quickstart --rows landed default
    python benchmarks/quality.py --write-only                                  # QUALITY.md from results

With ``--jobs 2`` each child gets one thread (two torch processes on two cores otherwise slow each
other 5-10x); the times recorded are each child's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fusioner.io import read_json
from fusioner.run import RunDir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CCP_CONFIG = ROOT / "configs" / "folder" / "ccp.yaml"
MARKER = "<!-- benchmarks/quality.py writes everything below this line -->"

# The landed main's head (before this ablation), the base every row changes one thing of.
LANDED = {
    "fusion_attention": "decoupled",
    "score_dim": 0,
    "ce_weight": 0.0,
    "num_negatives": 6,
    "hard_negatives": False,
    "learn_temperature": False,
}
# name -> (what changes, overrides on top of LANDED)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "landed": ("landed head: decoupled attention, 16-d scoring, BCE + dice, 6 random negatives", {}),
    "shuffled": ("landed head, seen names' embeddings shuffled", {"shuffle_names": True}),
    "joint": ("paper's joint attention (one name per sequence)", {"fusion_attention": "joint"}),
    "score32": ("scoring width 32 (decoder floor)", {"score_dim": 32}),
    "score64": ("scoring width 64", {"score_dim": 64}),
    "ce": ("+ per-pixel softmax CE over background + queried names", {"ce_weight": 1.0}),
    "all-names": ("every seen name in every training pass", {"num_negatives": 1000}),
    "hard": ("6 hard negatives (closest names first)", {"hard_negatives": True}),
    "hard12": ("12 hard negatives", {"hard_negatives": True, "num_negatives": 12}),
    "learned-t": ("learned temperature", {"learn_temperature": True}),
    "ce-hard12": ("CE + 12 hard negatives", {"ce_weight": 1.0, "hard_negatives": True, "num_negatives": 12}),
    "clip-templates": ("80 CLIP prompt templates instead of 'a photo of a {}'", {"templates": "clip"}),
    "img448": ("image 448 (28x28 token grid) instead of 320", {"image_size": 448}),
    "e16": ("16 epochs instead of 8", {"epochs": 16}),
    "landed-e1": ("landed head, 1 epoch (the budget the joint row can afford)", {"epochs": 1}),
    "joint-e1": ("joint attention, 1 epoch", {"fusion_attention": "joint", "epochs": 1}),
    "ce-all": ("CE + every seen name", {"ce_weight": 1.0, "num_negatives": 1000}),
    "ce-all-score32": (
        "CE + every seen name + scoring width 32",
        {"ce_weight": 1.0, "num_negatives": 1000, "score_dim": 32},
    ),
    "ce-score32-hard12": (
        "CE + 12 hard negatives + scoring width 32",
        {"ce_weight": 1.0, "hard_negatives": True, "num_negatives": 12, "score_dim": 32},
    ),
}
# The field's designs (fusioner/methods, issue 12) on the same frozen features and budget.
METHOD_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "zegclip": ("ZegCLIP one-stage: relationship descriptor + name-query decoder", {"method": "zegclip"}),
    "zegformer": ("ZegFormer decoupled: 16 class-agnostic mask queries", {"method": "zegformer"}),
    "zegformer-spectral": (
        "ZegFormer decoupled, spectral segments as the groups",
        {"method": "zegformer", "zegformer_grouping": "spectral"},
    ),
    "spectral": ("+ SAZS spectral refinement at inference (weight 0.2, 16 segments)", {"refine": "spectral"}),
    "spectral-train": (
        "+ spectral refinement and the eigen-segment training term",
        {"refine": "spectral", "spectral_weight": 1.0},
    ),
    "pseudo": ("+ CLIP-ZSS K-means pseudo-classes in background regions", {"pseudo_labels": "kmeans"}),
}
for _name, (_what, _changes) in list(METHOD_ROWS.items()):
    METHOD_ROWS[f"{_name}-shuffled"] = (f"{_what}, seen names shuffled", {**_changes, "shuffle_names": True})
ROWS.update(METHOD_ROWS)
# The chosen default (set from the table; configs/folder/ccp.yaml ships it) and its shuffled baseline.
DEFAULT: dict[str, Any] = {}
ROWS["default"] = ("chosen default (configs/folder/ccp.yaml, or the quickstart, as shipped)", DEFAULT)
ROWS["default-shuffled"] = (
    "chosen default, seen names' embeddings shuffled",
    {**DEFAULT, "shuffle_names": True},
)


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in values.items()]


def _figures(metrics: dict[str, Any]) -> dict[str, float]:
    gz, cal = metrics["gzss"], metrics.get("gzss_calibrated", {})
    return {
        "one_way_unseen": metrics["one_way"]["miou"],
        "one_way_seen": metrics["one_way_seen"]["miou"],
        "fbiou": metrics["one_way"]["fbiou"],
        "gzss_seen": gz["miou_seen"],
        "gzss_unseen": gz["miou_unseen"],
        "hiou": gz["hiou"],
        "cal_seen": cal.get("miou_seen", math.nan),
        "cal_unseen": cal.get("miou_unseen", math.nan),
        "cal_hiou": cal.get("hiou", math.nan),
        "seen_bias": cal.get("seen_bias", math.nan),
    }


def _run(cmd: list[str], threads: int | None, log: Path) -> float:
    """Run a child; returns its CPU seconds (user + system)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # RUSAGE_CHILDREN sums over every finished child: with parallel rows this is approximate.
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_row(suite: str, row: str, seed: int, out: Path, threads: int | None) -> dict[str, Any]:
    what, changes = ROWS[row]
    values = {**LANDED, **changes} if row not in ("default", "default-shuffled") else dict(changes)
    run_dir = out / suite / f"{row}-s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "quality.log"
    fusioner = [sys.executable, "-m", "fusioner.cli"]
    start = time.perf_counter()
    if suite == "ccp":
        overrides = _overrides({**values, "seed": seed})
        model_dir = run_dir / "run"
        common = [f"out_dir={model_dir}", f"cache_dir={out / suite / 'cache'}"]
        cpu = 0.0
        if not RunDir(model_dir).train_state.is_file():
            cpu += _run(
                [*fusioner, "train", "--config", str(CCP_CONFIG), "--resume", *common, *overrides],
                threads,
                log,
            )
        cpu += _run([*fusioner, "eval", "--model", str(model_dir)], threads, log)
        figures = _figures(RunDir(model_dir).read_metrics().data)
    else:
        values = {k: v for k, v in values.items() if k != "shuffle_names"}
        cpu = _run(
            [*fusioner, "quickstart", "--out", str(run_dir / "qs"), "--seed", str(seed), *_overrides(values)],
            threads,
            log,
        )
        report = read_json(run_dir / "qs" / "report.json", "quickstart report")
        f, b = report["fusioner"], report["baseline"]
        figures = {
            "one_way_unseen": f["one_way_unseen_miou"],
            "shuffled_one_way_unseen": b["one_way_unseen_miou"],
            "fbiou": f["one_way_unseen_fbiou"],
            "gzss_seen": f["gzss_seen_miou"],
            "gzss_unseen": f["gzss_unseen_miou"],
            "hiou": f["gzss_hiou"],
            "command_s": report["timings_s"]["total"],
        }
    return {
        "suite": suite,
        "row": row,
        "seed": seed,
        "what": what,
        "overrides": values,
        "figures": figures,
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(cpu, 1),
        "threads": threads or "all",
        "date": time.strftime("%Y-%m-%d"),
    }


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _cell(value: float | None, fmt: str) -> str:
    """A figure, or n/a where the row did not record it (rows transcribed from earlier records)."""
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def write_markdown(results: list[dict[str, Any]], path: Path, intro: str) -> None:
    from fusioner.io import atomic_write_text

    sections = [intro.rstrip() + "\n"]  # intro ends with MARKER
    ccp_cols = [
        "one_way_unseen",
        "one_way_seen",
        "fbiou",
        "gzss_seen",
        "gzss_unseen",
        "hiou",
        "cal_seen",
        "cal_unseen",
        "cal_hiou",
        "seen_bias",
    ]
    qs_cols = [
        "one_way_unseen",
        "shuffled_one_way_unseen",
        "fbiou",
        "gzss_seen",
        "gzss_unseen",
        "hiou",
        "command_s",
    ]
    for suite, cols in (("ccp", ccp_cols), ("quickstart", qs_cols)):
        rows = [r for r in results if r["suite"] == suite]
        if not rows:
            continue
        sections.append(f"\n## {suite}: every row as run\n")
        sections.append("| row | seed | what | " + " | ".join(cols) + " | wall s | threads |")
        sections.append("|" + "---|" * (len(cols) + 5))
        for r in rows:
            cells = [_cell(r["figures"].get(c), ".0f" if c == "command_s" else ".3f") for c in cols]
            sections.append(
                f"| {r['row']} | {r['seed']} | {r['what']} | "
                + " | ".join(cells)
                + (f" | {r['wall_s']:.0f}" if r["wall_s"] is not None else " | n/a")
                + f" | {r['threads']} |"
            )
        by_row: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_row.setdefault(r["row"], []).append(r)
        multi = {k: v for k, v in by_row.items() if len(v) > 1}
        if multi:
            sections.append(f"\n### {suite}: rows over several seeds (mean ± spread = max - min)\n")
            sections.append("| row | seeds | " + " | ".join(cols) + " |")
            sections.append("|" + "---|" * (len(cols) + 2))
            for name, rs in multi.items():
                cells = []
                for c in cols:
                    vals = [r["figures"].get(c, math.nan) for r in rs]
                    vals = [math.nan if v is None else v for v in vals]
                    mean, spread = sum(vals) / len(vals), max(vals) - min(vals)
                    cells.append("n/a" if math.isnan(mean) else f"{mean:.3f} ± {spread:.3f}")
                sections.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=("ccp", "quickstart"), default="ccp")
    parser.add_argument("--rows", nargs="*", default=[], choices=sorted(ROWS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--markdown", default=str(HERE / "QUALITY.md"))
    # The record is committed: rows measured by earlier sessions (runs/ is not) stay in QUALITY.md.
    parser.add_argument("--results", default=str(HERE / "quality_results.jsonl"))
    parser.add_argument("--write-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    done = {(r["suite"], r["row"], r["seed"]) for r in _read(results_path)}
    todo = [(args.suite, row, s) for row in args.rows for s in args.seeds if (args.suite, row, s) not in done]
    threads = 1 if args.jobs > 1 else None

    def one(job: tuple[str, str, int]) -> None:
        result = run_row(*job, out, threads)
        with results_path.open("a") as f:  # one short line per row: appends do not interleave
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)

    if todo and args.suite == "ccp":  # fill the shared feature cache once, before parallel rows race for it
        cache = f"cache_dir={out / 'ccp' / 'cache'}"
        _run(
            [
                sys.executable,
                "-m",
                "fusioner.cli",
                "cache",
                "--config",
                str(CCP_CONFIG),
                cache,
                "eval_split=test",
                f"out_dir={out / 'ccp' / 'cache-fill'}",
            ],
            None,
            out / "cache.log",
        )
    if not args.write_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, todo))
    markdown = Path(args.markdown)
    # The hand-written part (verdicts, what each row means) stays; the tables below MARKER are rewritten.
    text = markdown.read_text() if markdown.is_file() else ""
    intro = text.split(MARKER)[0] if MARKER in text else "# Quality\n\n"
    write_markdown(_read(results_path), markdown, intro + MARKER)


if __name__ == "__main__":
    main()
