"""Pairwise backbone sweeps: a product of config values, trained and evaluated run by run, resumably.

A sweep file is a config file (flat keys, see :mod:`fusioner.config`) in which some values are
lists. The expansion rule:

* A key whose value is a list is an *axis*; the sweep runs the product of all axes, in the order
  the keys appear in the file (the first axis varies slowest). ``folds`` is the sweep spelling of
  the axis over the config key ``fold``.
* ``unseen_classes`` is list-valued itself, so for it only a list of lists is an axis
  (``unseen_classes: [[cow], [sheep, horse]]`` is two runs); a plain list is one value.
* An axis value may be a mapping of config keys that vary together, e.g. a backbone and its
  weights: ``vision: [efficientnet_lite0, {vision: timm:vit_tiny_patch16_224, vision_weights:
  random}]``. The mapping must set the axis's own key and may give a ``name`` that labels the value
  in run names and tables. Keys a mapping does not set keep the sweep's base value; two axes
  setting the same key is an error.
* ``out_dir`` is the sweep directory. Each run lives in ``out_dir/<run name>``, named
  ``{vision}-{text}-{dataset}-f{fold}`` plus ``-{key}_{value}`` for every other axis, with
  anything but ``[A-Za-z0-9_.+-]`` replaced by ``_``. All runs share ``cache_dir`` (default
  ``out_dir/cache``), so frozen features are computed once per vision backbone and dataset and
  reused by every text model and fold.

Running a sweep is resumable and failure-tolerant: a run whose ``metrics.json`` exists is skipped,
a trained run without metrics is only evaluated, a run with checkpoints resumes from the last one,
and a run that raises leaves ``error.txt`` in its directory and a line in ``runs.jsonl`` while the
sweep goes on (failed runs are retried by the next invocation). ``--shard i/n`` takes every n-th run
of the expansion, so n machines given the same command share a sweep without talking.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import io
import itertools
import json
import logging
import math
import re
import time
import traceback
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fusioner.config import Config, canonical_key, load_config, read_yaml_mapping
from fusioner.errors import ConfigError, FusionerError
from fusioner.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from fusioner.run import DONE, ERROR, FAILED, PARTIAL, PENDING, TRAINED, RunDir, pct

log = logging.getLogger(__name__)

PLAN = "sweep.json"  # the expanded runs (names and labels), written by every invocation
EVENTS = "runs.jsonl"  # one line per attempted run, appended
STATUS = "status.json"  # every run's state, rewritten after each attempt
# Sweep-file spellings of config keys.
ALIASES = {"folds": "fold"}
# The run name's fixed parts, in order; every other axis is appended after them.
NAME_KEYS = ("vision", "text", "dataset", "fold")
# Keys that change how a run executes but not what it computes: a run may resume under new values.
RUNTIME_KEYS = frozenset(
    ("out_dir", "cache_dir", "use_cache", "num_workers", "eval_batch_size", "log_every", "checkpoint_every")
    + ("precision", "compile")
)
LIST_KEYS = frozenset(k for k, t in typing.get_type_hints(Config).items() if typing.get_origin(t) is list)

SKIPPED = "skipped"  # the outcome of a run found done


# -- expansion -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    key: str  # the config key the axis is named after
    settings: tuple[dict[str, Any], ...]  # per value: the config keys it sets
    labels: tuple[str, ...]  # per value: its label in run names and tables


@dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # vision, text, dataset, fold and every other axis -> label
    config: Config

    @property
    def dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.config.out_dir)


@dataclass(frozen=True)
class Sweep:
    dir: Path
    runs: list[Run]
    source: str  # the sweep file, for messages and sweep.json
    overrides: tuple[str, ...] = ()

    def shard(self, index: int, count: int) -> list[Run]:
        """Every ``count``-th run starting at ``index``: the shards of one sweep partition its runs."""
        if not 0 <= index < count:
            raise ConfigError(f"--shard {index}/{count}: expected i/n with 0 <= i < n")
        return self.runs[index::count]


def sanitize(label: str) -> str:
    """A label as a path component: ``timm:vit_tiny`` -> ``timm_vit_tiny``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "_"


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or "none"
    return str(value)


def _axis(key: str, raw: Any, source: str) -> Axis | None:
    """The axis ``raw`` spells for config key ``key``, or None when it is a single value."""
    if not isinstance(raw, list):
        return None
    if key in LIST_KEYS:
        nested = [isinstance(v, (list, dict)) for v in raw]
        if not any(nested):
            return None  # a plain list is the key's one value
        if not all(nested):
            raise ConfigError(
                f"{source}: key {key!r} mixes names and lists; to sweep it give a list of lists, "
                f"e.g. [[cow], [sheep, horse]]"
            )
    if not raw:
        raise ConfigError(f"{source}: key {key!r} is an empty list: an axis needs at least one value")
    settings, labels = [], []
    for value in raw:
        if isinstance(value, dict):
            value = dict(value)
            name = value.pop("name", None)
            setting = {canonical_key(str(k), source): v for k, v in value.items()}
            if key not in setting:
                raise ConfigError(
                    f"{source}: a value of axis {key!r} is a mapping without the key {key!r}: {value}"
                )
            labels.append(str(name) if name is not None else _label(setting[key]))
        else:
            setting = {key: value}
            labels.append(_label(value))
        settings.append(setting)
    if duplicates := sorted(label for label, n in Counter(map(sanitize, labels)).items() if n > 1):
        raise ConfigError(
            f"{source}: axis {key!r} has several values labelled {', '.join(duplicates)}; "
            f"give the mappings distinct 'name's"
        )
    return Axis(key, tuple(settings), tuple(labels))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value")
    if value.lstrip().startswith(("[", "{")):  # a list (an axis) or a mapping, written as YAML
        try:
            return key.strip(), yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not valid YAML: {e}") from None
    return key.strip(), value  # scalars stay strings: the config coerces them to the key's type


def _key(raw: Any, source: str) -> str:
    """The config key a sweep-file key names (``folds`` -> ``fold``, ``data.path`` -> ``data_path``)."""
    return ALIASES.get(str(raw)) or canonical_key(str(raw), source)


def expand(spec: dict[str, Any], sweep_dir: str | Path, *, source: str = "sweep") -> list[Run]:
    """Every run of ``spec`` (a sweep file's mapping, ``out_dir`` removed), in expansion order."""
    sweep_dir = Path(sweep_dir)
    base: dict[str, Any] = {}
    axes: list[Axis] = []
    for raw_key, raw in spec.items():
        key = _key(raw_key, source)
        if key == "out_dir":
            raise ConfigError(f"{source}: 'out_dir' is the sweep directory, not a value to expand")
        if key in base or any(a.key == key for a in axes):
            raise ConfigError(f"{source}: key {key!r} is given twice (as {raw_key!r} and another spelling)")
        axis = _axis(key, raw, source)
        if axis is None:
            base[key] = raw
        else:
            axes.append(axis)
    owners: dict[str, str] = {}
    for axis in axes:
        for key in {k for s in axis.settings for k in s}:
            if key in owners and owners[key] != axis.key:
                raise ConfigError(
                    f"{source}: key {key!r} is set by both the {owners[key]!r} and {axis.key!r} axes"
                )
            owners[key] = axis.key
    base.setdefault("cache_dir", str(sweep_dir / "cache"))

    runs: list[Run] = []
    for choice in itertools.product(*(range(len(a.settings)) for a in axes)):
        values = {**base, "out_dir": str(sweep_dir)}
        chosen: dict[str, str] = {}
        for axis, i in zip(axes, choice, strict=True):
            values.update(axis.settings[i])
            chosen[axis.key] = axis.labels[i]
        try:
            config = load_config(None, **values)
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in chosen.items())
            raise ConfigError(f"{source}: the run with {where or 'the base values'}: {e}") from None
        labels = {k: chosen.get(k, _label(getattr(config, k))) for k in NAME_KEYS}
        labels["fold"] = str(config.fold)
        extra = {k: v for k, v in chosen.items() if k not in NAME_KEYS}
        parts = [sanitize(labels[k]) for k in ("vision", "text", "dataset")] + [f"f{config.fold}"]
        name = "-".join(parts + [f"{sanitize(k)}_{sanitize(v)}" for k, v in extra.items()])
        config = dataclasses.replace(config, out_dir=str(sweep_dir / name))
        runs.append(Run(name, {**labels, **extra}, config))
    names = Counter(r.name for r in runs)
    if clashes := sorted(n for n, c in names.items() if c > 1):
        raise ConfigError(
            f"{source}: several runs are named {clashes[0]}; give the axis values distinct 'name's"
        )
    return runs


def load_sweep(path: str | Path, overrides: Sequence[str] = (), *, out: str | Path | None = None) -> Sweep:
    """Read a sweep file, apply ``key=value`` overrides (``key=[a, b]`` sets an axis), expand, validate.

    Every run's config and every backbone name are checked here, before anything is trained.
    """
    from fusioner.hub import check_backbones

    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file")
    for item in overrides:
        key, value = _parse_override(item)
        canonical = _key(key, "command line")
        # Replace the file's entry in place, so an overridden axis keeps its position in the product.
        existing = [k for k in spec if _key(k, str(path)) == canonical]
        spec[existing[0] if existing else key] = value
    out_keys = [k for k in spec if _key(k, str(path)) == "out_dir"]
    sweep_dir = Path(out or (spec[out_keys[0]] if out_keys else Path("runs") / "sweeps" / path.stem))
    for key in out_keys:
        del spec[key]
    runs = expand(spec, sweep_dir, source=str(path))
    for run in runs:
        check_backbones(run.config.vision, run.config.text, f"{path}: run {run.name}")
    return Sweep(sweep_dir, runs, str(path), tuple(overrides))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; None -> ``(0, 1)``, the whole sweep."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(match[1]), int(match[2])


# -- run states --------------------------------------------------------------------------------------
def check_same_config(run: Run) -> None:
    """Refuse to resume (or skip) a run directory whose progress was made with a different config.

    A run that failed before its first checkpoint (a wrong data_path, say) holds nothing to keep,
    so it starts over under the new config.
    """
    files = run.run_dir
    progress = files.has_metrics() or files.is_trained() or files.latest_checkpoint() is not None
    if not files.config.is_file() or not progress:
        return
    before, now = files.read_config().to_dict(), run.config.to_dict()
    changed = [
        f"{k}: {before[k]!r} -> {v!r}" for k, v in now.items() if k not in RUNTIME_KEYS and before[k] != v
    ]
    if changed:
        raise ConfigError(
            f"{run.dir} was started with another config ({'; '.join(changed[:4])}); "
            f"delete it or sweep into another out_dir"
        )


# -- running -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOutcome:
    name: str
    status: str  # done | skipped | failed
    action: str  # what was run: "", "trained", "resumed", "evaluated"
    seconds: float = 0.0
    error: str = ""

    def line(self) -> str:
        what = f" ({self.action}, {self.seconds:.0f} s)" if self.action else ""
        return f"{self.status:>7}  {self.name}{what}{': ' + self.error if self.error else ''}"


@dataclass(frozen=True)
class SweepResult:
    dir: Path
    outcomes: list[RunOutcome]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    def summary(self) -> str:
        counts = Counter(o.status for o in self.outcomes)
        parts = ", ".join(f"{counts[s]} {s}" for s in (DONE, SKIPPED, FAILED) if counts[s])
        return f"{len(self.outcomes)} runs in {self.dir}: {parts or 'nothing to do'}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _append_event(sweep_dir: Path, event: dict[str, Any]) -> None:
    # One write of one short line in append mode: shards sharing the directory never interleave lines.
    with open(sweep_dir / EVENTS, "a") as f:
        f.write(json.dumps(event) + "\n")


def write_status(sweep: Sweep) -> Path:
    """``status.json``: every run's state, read from disk (so any shard's rewrite is a true picture)."""
    states = {run.name: run.run_dir.state for run in sweep.runs}
    return atomic_write_json(
        sweep.dir / STATUS, {"updated": _now(), "counts": dict(Counter(states.values())), "runs": states}
    )


def run_one(run: Run, state: Any) -> RunOutcome:
    """Train (or resume) and evaluate one run; an exception becomes a ``failed`` outcome.

    ``state`` is accelerate's ``PartialState``: every process trains, the main one evaluates.
    """
    from accelerate.utils import set_seed

    from fusioner.engine.evaluate import evaluate_model
    from fusioner.engine.train import train

    start, action = time.monotonic(), ""
    try:
        check_same_config(run)
        if run.run_dir.has_metrics():
            return RunOutcome(run.name, SKIPPED, "")
        if state.is_main_process:
            run.run_dir.error.unlink(missing_ok=True)
        if not run.run_dir.is_trained():
            action = "resumed" if run.run_dir.latest_checkpoint() is not None else "trained"
            train(run.config, resume=action == "resumed")
        action = action or "evaluated"
        state.wait_for_everyone()
        if state.is_main_process:  # evaluation is single-process: the others wait for it below
            # A backbone with weights "random" is rebuilt on load from the global RNG; seeding it as
            # train() did gives evaluation the backbone the head was trained on (and its cached features).
            set_seed(run.config.seed)
            evaluate_model(str(run.dir), None, [])
    except Exception as e:  # one broken run must not stop the sweep; KeyboardInterrupt still does
        if state.is_main_process:
            atomic_write_text(run.run_dir.error, traceback.format_exc())
        message = str(e) if isinstance(e, FusionerError) else f"{type(e).__name__}: {e}"
        first_line = (message.splitlines() or [type(e).__name__])[0]
        outcome = RunOutcome(run.name, FAILED, action, time.monotonic() - start, first_line)
    else:
        outcome = RunOutcome(run.name, DONE, action, time.monotonic() - start)
    finally:
        gc.collect()  # the run's backbones and optimizer state go before the next run's arrive
        _empty_device_cache()
    state.wait_for_everyone()
    return outcome


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_plan(sweep: Sweep) -> Path:
    plan = {
        "source": sweep.source,
        "overrides": list(sweep.overrides),
        "runs": [{"name": r.name, "labels": r.labels} for r in sweep.runs],
    }
    return atomic_write_json(sweep.dir / PLAN, plan)


def run_sweep(
    sweep: Sweep,
    *,
    shard: tuple[int, int] = (0, 1),
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> SweepResult:
    """Run this shard's runs one after another, each in-process (so ``accelerate launch`` spreads
    every run over its processes); returns what happened to each."""
    from accelerate import PartialState

    runs = sweep.shard(*shard)
    state = PartialState()
    if state.is_main_process:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        write_plan(sweep)
    outcomes = []
    for run in runs:
        if not run.run_dir.has_metrics():
            log.info("sweep run %s: %s", run.name, run.run_dir.state)
        outcome = run_one(run, state)
        outcomes.append(outcome)
        if state.is_main_process and outcome.status != SKIPPED:
            event = {"run": run.name, "status": outcome.status, "action": outcome.action}
            event |= {"seconds": round(outcome.seconds, 1), "error": outcome.error}
            _append_event(sweep.dir, event | {"shard": f"{shard[0]}/{shard[1]}", "at": _now()})
            write_status(sweep)
        if on_outcome is not None:
            on_outcome(outcome)
    if state.is_main_process:
        write_status(sweep)
    return SweepResult(sweep.dir, outcomes)


# -- report ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One run's line of ``results.csv``."""

    name: str
    labels: dict[str, str]
    state: str
    metrics: dict[str, float]  # miou, fbiou, gzss_*; empty unless done
    error: str = ""


METRIC_COLUMNS = ("miou", "fbiou", "gzss_miou_seen", "gzss_miou_unseen", "gzss_hiou")


def collect(sweep_dir: str | Path) -> list[Row]:
    """Every planned run of the sweep in ``sweep_dir`` with its state and headline metrics."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / PLAN).is_file():
        raise FusionerError(f"{sweep_dir} is not a sweep directory: it has no {PLAN}")
    plan = read_json(sweep_dir / PLAN, "sweep plan")
    rows = []
    for run in plan["runs"]:
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
    failed = [r for r in rows if r.state == FAILED]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.name}`: {r.error} (see {r.name}/{ERROR})" for r in failed]
    return "\n".join(lines) + "\n"


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
