"""Sweep reports: ``results.csv``, ``results.md`` (vision x text tables) and ``heatmap.png``.

Every figure is read from the run directories' own files (see :mod:`fusioner.run`), so a report
can be written at any time, by any machine that sees the sweep directory, while shards still run.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fusioner.io import atomic_write, atomic_write_text
from fusioner.metrics_file import pct
from fusioner.run import DONE, ERROR, FAILED, PARTIAL, PENDING, TRAINED, RunDir
from fusioner.sweep.expand import NAME_KEYS, read_plan


@dataclass(frozen=True)
class Row:
    """One run's line of ``results.csv``."""

    name: str
    labels: dict[str, str]
    state: str
    metrics: dict[str, float]  # miou, fbiou, gzss_*; empty unless done
    error: str = ""


METRIC_COLUMNS = (
    "miou", "fbiou", "gzss_miou_seen", "gzss_miou_unseen", "gzss_hiou",
    "gzss_cal_miou_seen", "gzss_cal_miou_unseen", "gzss_cal_hiou",
)  # fmt: skip
# The ablation axis whose ``True`` rows are the other rows' baseline (seen names' embeddings shuffled).
BASELINE_AXIS = "shuffle_names"


def collect(sweep_dir: str | Path) -> list[Row]:
    """Every planned run of the sweep in ``sweep_dir`` with its state and headline metrics."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for run in read_plan(sweep_dir)["runs"]:
        run_dir = RunDir(sweep_dir / run["name"])
        state, metrics, error = run_dir.state, {}, ""
        if state == DONE:
            metrics = run_dir.read_metrics().headline()
        elif state == FAILED:
            error = run_dir.last_error()  # the exception's own line
        rows.append(Row(run["name"], run["labels"], state, metrics, error))
    return rows


def _group_key(row: Row) -> tuple[str, ...]:
    """Runs that share a table: same dataset and same value of every non-name axis."""
    extra = [f"{k} {v}" for k, v in row.labels.items() if k not in NAME_KEYS]
    return (row.labels["dataset"], *extra)


def _cells(rows: list[Row]) -> dict[tuple[str, ...], dict[tuple[str, str], list[Row]]]:
    tables: dict[tuple[str, ...], dict[tuple[str, str], list[Row]]] = {}
    for row in rows:
        table = tables.setdefault(_group_key(row), {})
        table.setdefault((row.labels["vision"], row.labels["text"]), []).append(row)
    return tables


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _cell_text(runs: list[Row]) -> str:
    done = [r for r in runs if r.state == DONE]
    if not done:
        return "–"
    folds = " · ".join(f"f{r.labels['fold']} {pct(r.metrics['miou'])}" for r in done)
    missing = f", {len(done)}/{len(runs)} folds" if len(done) < len(runs) else ""
    detail = f" ({folds}{missing})" if len(runs) > 1 else ""  # one run: its figure is the mean
    miou, fbiou = _mean(r.metrics["miou"] for r in done), _mean(r.metrics["fbiou"] for r in done)
    return f"**{pct(miou)}**{detail}; FB-IoU {pct(fbiou)}"


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def results_markdown(rows: list[Row], title: str) -> str:
    counts = Counter(r.state for r in rows)
    states = ", ".join(f"{counts[s]} {s}" for s in (DONE, FAILED, TRAINED, PARTIAL, PENDING) if counts[s])
    lines = [
        f"# Sweep results: {title}",
        "",
        "1-way mIoU (%) on the held-out classes, mean over folds, with each fold's figure in brackets "
        "and the mean FB-IoU (%) after.",
        "",
        f"{len(rows)} runs: {states}",
    ]
    for key, table in _cells(rows).items():
        visions = _ordered(v for v, _ in table)
        texts = _ordered(t for _, t in table)
        lines += ["", f"## {', '.join(key)}", "", "| vision \\ text | " + " | ".join(texts) + " |"]
        lines.append("|---" * (len(texts) + 1) + "|")
        for v in visions:
            lines.append(f"| {v} | " + " | ".join(_cell_text(table.get((v, t), [])) for t in texts) + " |")
    lines += comparison_markdown(rows)
    failed = [r for r in rows if r.state == FAILED]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.name}`: {r.error} (see {r.name}/{ERROR})" for r in failed]
    return "\n".join(lines) + "\n"


def _is_true(label: str) -> bool:
    return label.strip().lower() in ("true", "1", "yes")


def comparison_markdown(rows: list[Row]) -> list[str]:
    """One line per design (every run label but fold; folds averaged): 1-way mIoU and FB-IoU beside
    calibrated GZSS seen / unseen / hIoU, and, when the sweep has a ``shuffle_names`` axis, each
    design's shuffled-names baseline next to it (1-way alone does not separate designs: a random
    tiny ViT already scores most of EfficientNet-Lite0's 1-way on CCP)."""
    extra = _ordered(k for r in rows for k in r.labels if k not in ("fold",))
    baseline = any(BASELINE_AXIS in r.labels for r in rows)
    keys = [k for k in extra if k != BASELINE_AXIS]
    groups: dict[tuple[str, ...], dict[bool, list[Row]]] = {}
    for r in rows:
        shuffled = baseline and _is_true(r.labels.get(BASELINE_AXIS, "false"))
        groups.setdefault(tuple(r.labels.get(k, "") for k in keys), {}).setdefault(shuffled, []).append(r)
    if not baseline and all(k in NAME_KEYS for k in keys):
        return []  # a plain backbone sweep: the vision x text tables say it all

    def mean(runs: list[Row], metric: str) -> str:
        return pct(_mean(r.metrics.get(metric, math.nan) for r in runs if r.state == DONE))

    head = ["1-way mIoU", "FB-IoU", "cal. GZSS seen", "cal. GZSS unseen", "cal. hIoU"]
    if baseline:
        head += ["shuffled: 1-way mIoU", "shuffled: cal. hIoU"]
    lines = [
        "",
        "## Designs side by side",
        "",
        "Calibrated GZSS: every name in one pass, `seen_bias` chosen on val (%); folds averaged.",
        "",
        "| " + " | ".join([*keys, *head]) + " |",
        "|---" * (len(keys) + len(head)) + "|",
    ]
    metrics = ("miou", "fbiou", "gzss_cal_miou_seen", "gzss_cal_miou_unseen", "gzss_cal_hiou")
    for key, by_shuffle in groups.items():
        runs = by_shuffle.get(False, [])
        if not runs:
            continue
        cells = [mean(runs, m) for m in metrics]
        if baseline:
            shuffled = by_shuffle.get(True, [])
            cells += [mean(shuffled, "miou"), mean(shuffled, "gzss_cal_hiou")] if shuffled else ["–", "–"]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return lines


def results_csv(rows: list[Row]) -> str:
    extra = _ordered(k for r in rows for k in r.labels if k not in NAME_KEYS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *NAME_KEYS, *extra, "state", *METRIC_COLUMNS, "error"])
    for r in rows:
        metrics = [r.metrics.get(m, "") for m in METRIC_COLUMNS]
        labels = [r.labels.get(k, "") for k in (*NAME_KEYS, *extra)]
        writer.writerow([r.name, *labels, r.state, *metrics, r.error])
    return buffer.getvalue()


def heatmap(rows: list[Row], path: Path) -> Path:
    """A vision x text grid of mean 1-way mIoU per table, drawn with the Agg canvas (no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tables = _cells(rows)
    widest = max((len({t for _, t in table}) for table in tables.values()), default=1)
    fig = Figure(figsize=(4 + 2.2 * widest, 1 + 3.2 * len(tables)))
    FigureCanvasAgg(fig)
    for i, (key, table) in enumerate(tables.items()):
        visions, texts = _ordered(v for v, _ in table), _ordered(t for _, t in table)
        grid = np.full((len(visions), len(texts)), np.nan)
        for (v, t), runs in table.items():
            done = [r.metrics["miou"] for r in runs if r.state == DONE]
            grid[visions.index(v), texts.index(t)] = 100 * _mean(done)
        ax = fig.add_subplot(len(tables), 1, i + 1)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, aspect="auto")
        top = np.nanmax(grid) if not np.isnan(grid).all() else 0.0
        for (y, x), value in np.ndenumerate(grid):
            dark = np.isnan(value) or value < 0.6 * top  # viridis is dark at the bottom, light at the top
            text = "–" if np.isnan(value) else f"{value:.1f}"
            ax.text(x, y, text, ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks(range(len(texts)), texts)
        ax.set_yticks(range(len(visions)), visions)
        ax.set_xlabel("text backbone")
        ax.set_ylabel("vision backbone")
        ax.set_title(f"1-way mIoU (%): {', '.join(key)}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_report(sweep_dir: str | Path) -> list[Path]:
    """``results.csv``, ``results.md`` and ``heatmap.png`` in ``sweep_dir``, each written atomically."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    return [
        atomic_write_text(sweep_dir / "results.csv", results_csv(rows)),
        atomic_write_text(sweep_dir / "results.md", results_markdown(rows, sweep_dir.name)),
        heatmap(rows, sweep_dir / "heatmap.png"),
    ]
