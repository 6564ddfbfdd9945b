"""Running a sweep under accelerate: run by run, in shards, resumably.

Running a sweep is resumable and failure-tolerant: a run whose ``metrics.json`` exists is skipped,
a trained run without metrics is only evaluated, a run with checkpoints resumes from the last one,
and a run that raises leaves ``error.txt`` in its directory and a line in ``runs.jsonl`` while the
sweep goes on (failed runs are retried by the next invocation). ``--shard i/n`` takes every n-th run
of the expansion, so n machines given the same command share a sweep without talking.

Besides the run directories, the sweep directory holds ``runs.jsonl`` (one line per attempted
run, appended) and ``status.json`` (every run's state, rewritten after each attempt).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fusioner.errors import FusionerError
from fusioner.io import atomic_write_json, atomic_write_text
from fusioner.run import DONE, FAILED
from fusioner.sweep.expand import Run, Sweep, write_plan

log = logging.getLogger(__name__)

EVENTS = "runs.jsonl"  # one line per attempted run, appended
STATUS = "status.json"  # every run's state, rewritten after each attempt
SKIPPED = "skipped"  # the outcome of a run found done


def check_same_config(run: Run) -> None:
    """Refuse to resume (or skip) a run directory whose progress was made with a different config:
    the rule of ``train --resume`` (:meth:`fusioner.run.RunDir.check_resumable`)."""
    run.run_dir.check_resumable(run.config, "delete it or sweep into another out_dir")


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


def write_status(sweep: Sweep, states: dict[str, str] | None = None) -> Path:
    """``status.json``: every run's state, read from disk (so any shard's rewrite is a true picture),
    or ``states`` where the caller holds them already (:class:`_Status`)."""
    states = states if states is not None else {run.name: run.run_dir.state for run in sweep.runs}
    return atomic_write_json(
        sweep.dir / STATUS, {"updated": _now(), "counts": dict(Counter(states.values())), "runs": states}
    )


class _Status:
    """status.json after each attempted run, at a bounded cost.

    Reading every run's state takes a few stat calls per run: about 2 s for 10,000 runs, which after
    every run of a large sweep was most of its time. Between full reads (which show the other
    shards' progress too) only the run just attempted is read again; a full read happens when the
    time since the last one is over ``RESCAN_RATIO`` times what it took, so it costs at most about
    1/RESCAN_RATIO of the sweep's time.
    """

    RESCAN_RATIO = 30

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.states: dict[str, str] = {}
        self.read_at, self.read_cost = -math.inf, 0.0

    def write(self, attempted: Run | None = None) -> Path:
        now = time.monotonic()
        if attempted is None or now - self.read_at > self.RESCAN_RATIO * self.read_cost:
            self.states = {run.name: run.run_dir.state for run in self.sweep.runs}
            self.read_at, self.read_cost = time.monotonic(), time.monotonic() - now
        else:
            self.states[attempted.name] = attempted.run_dir.state
        return write_status(self.sweep, self.states)


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


def run_sweep(
    sweep: Sweep,
    *,
    shard: tuple[int, int] = (0, 1),
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> SweepResult:
    """Run this shard's runs one after another, each in-process (so ``accelerate launch`` spreads
    every run over its processes); returns what happened to each."""
    from fusioner.engine.train import process_state

    runs = sweep.shard(*shard)
    state = process_state()
    if state.is_main_process:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        write_plan(sweep)
    outcomes = []
    status = _Status(sweep)
    for run in runs:
        if not run.run_dir.has_metrics():
            log.info("sweep run %s: %s", run.name, run.run_dir.state)
        outcome = run_one(run, state)
        outcomes.append(outcome)
        if state.is_main_process and outcome.status != SKIPPED:
            event = {"run": run.name, "status": outcome.status, "action": outcome.action}
            event |= {"seconds": round(outcome.seconds, 1), "error": outcome.error}
            _append_event(sweep.dir, event | {"shard": f"{shard[0]}/{shard[1]}", "at": _now()})
            status.write(run)
        if on_outcome is not None:
            on_outcome(outcome)
    if state.is_main_process:
        status.write()  # a full read: the shard's last word is a true picture
    return SweepResult(sweep.dir, outcomes)
