"""Where ``fusioner eval`` writes its figures, and what it refuses to write over.

A run's own ``metrics.json`` holds the figures of its own config and the ``seen_bias`` calibration
that push, the demo and predict read, so only an evaluation under that config writes it. Any other
evaluation of a run (another dataset, ``refine=spectral``, another split or mode) goes beside it, to
``RUN/evals/<slug>.json``: the slug names what differs (the dataset, short ``key-value`` pairs) and
ends in a hash of every differing key, so two settings never share a file and the same settings
always land on the same one.

An explicit ``--out`` (a ``.json`` file, or a folder that gets ``metrics.json``) follows the rule of
predict and export: a file there that eval did not write (its ``written_by`` mark, or the keys of a
metrics file of an earlier version) is refused, and so is a run's own ``metrics.json`` for figures of
other settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from fusioner.config import RUNTIME_KEYS, Config
from fusioner.errors import FusionerError
from fusioner.io import atomic_write_json
from fusioner.run import EVAL_WRITER, METRICS, RunDir

_SLUG_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
_SLUG_MAX = 60  # characters before the hash: a readable file name, not the whole config


def differing(before: Config, now: Config) -> dict[str, Any]:
    """The non-runtime keys whose value differs, with their value in ``now``."""
    old, new = before.to_dict(), now.to_dict()
    return {k: v for k, v in new.items() if k not in RUNTIME_KEYS and old[k] != v}


def settings_slug(changes: dict[str, Any]) -> str:
    """``mosaic4-1a2b3c4d`` or ``refine-spectral-5e6f7a8b``: what differs, readable, then its hash."""
    digest = hashlib.sha256(json.dumps(changes, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [str(changes["dataset"])] if "dataset" in changes else []
    for key, value in sorted(changes.items()):
        # Paths and lists would make long, unreadable names; the hash tells them apart.
        if key != "dataset" and isinstance(value, (str, int, float, bool)) and len(str(value)) <= 24:
            if "/" not in str(value):
                parts.append(f"{key}-{value}")
    readable = _SLUG_CHARS.sub("_", "-".join(parts))[:_SLUG_MAX].strip("._-")
    return f"{readable}-{digest}" if readable else digest


def metrics_target(source: str | Path, config: Config, out: str | Path | None) -> Path:
    """The file an evaluation of model ``source`` under ``config`` writes; refuses one it may not write."""
    if out:
        target = Path(out)
        if target.suffix != ".json":
            target = target / METRICS
        owner = RunDir(target.parent)
        changes = differing(owner.read_config(), config) if owner.is_run() and owner.config.is_file() else {}
        if target.name == METRICS and changes:
            raise FusionerError(
                f"--out {target} is the metrics.json of run {owner.path}, its figures under its own "
                f"config; these settings differ in {', '.join(sorted(changes))}: choose another --out, "
                "or leave it out to write under the run's evals/"
            )
    elif not Path(source).is_dir():  # a Hub id: the current folder, as before
        target = Path(METRICS)
    else:
        run = RunDir(source)
        changes = differing(run.read_config(), config) if run.config.is_file() else {}
        target = run.evals / f"{settings_slug(changes)}.json" if changes else run.metrics
    check_writable(target)
    return target


def check_writable(target: Path) -> None:
    """Refuse ``target`` unless it is absent or a metrics file an evaluation wrote."""
    if not target.exists():
        return
    if target.is_dir():
        raise FusionerError(f"--out {target} is a folder; expected a .json file or a folder without it")
    try:
        data = json.loads(target.read_bytes())
    except (OSError, ValueError):
        data = None
    written = isinstance(data, dict) and (
        data.get("written_by") == EVAL_WRITER
        # metrics files of versions before the mark: what only evaluate_model wrote together
        or ("written_by" not in data and {"one_way", "model", "config"} <= data.keys())
        # a run's own figures, as quickstart wrote them before the mark
        or (isinstance(data.get("one_way"), dict) and target.name == METRICS and _in_run(target))
    )
    if not written:
        raise FusionerError(f"{target} exists and fusioner eval did not write it; choose another --out")


def write_metrics(target: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` atomically with eval's mark (what :func:`check_writable` recognises)."""
    return atomic_write_json(target, {"written_by": EVAL_WRITER, **metrics})


def _in_run(target: Path) -> bool:
    return RunDir(target.parent).is_run()


def check_suite_folder(out: Path) -> None:
    """Refuse a suite ``--out`` holding files an earlier ``eval --suite`` did not write.

    A suite writes suite.json, suite.md and per_class/ there: absent, empty, or an earlier suite's
    folder (its suite.json names a suite) may be written; anything else is someone else's folder.
    """
    if out.exists() and not out.is_dir():
        raise FusionerError(f"--out {out} is a file; expected a folder for the suite's files")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    try:
        record = json.loads((out / "suite.json").read_bytes())
    except (OSError, ValueError):
        record = None
    foreign = [p for p in entries if p.name not in {"suite.json", "suite.md", "per_class"}]
    if not isinstance(record, dict) or "suite" not in record or foreign:
        what = foreign[0] if foreign else out / "suite.json"
        raise FusionerError(
            f"--out {out} is not empty and fusioner eval --suite did not write it (it holds {what}); "
            "choose a new or empty folder"
        )
