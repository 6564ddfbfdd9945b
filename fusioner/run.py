"""A training run directory: the one owner of its file names, its state and its ``metrics.json``.

Layout of a run directory (``out_dir`` of a training config)::

    config.yaml          the training config, written first by ``train``
    checkpoints/step-*   accelerate states (train keeps the last two), each with its trainer_state.json
    losses.jsonl         one {"step", "loss", "lr"} per optimizer step
    model/               the finished model (``FusionerModel.save_pretrained``)
    train_state.json     {"steps", "total_steps", "finished"}, written after model/
    metrics.json         written by evaluation under the run's own config (the figures and the
                         seen_bias calibration that push, the demo and predict read)
    evals/*.json         evaluations under another dataset or other settings (never metrics.json)
    .fusioner-run        written first by ``train``: marks the folder as a run this library made
    error.txt            a sweep's record of the run's last failure
    run.lock             held (``filelock``) by the process training into the directory
    run.lock.json        {"pid", "host", "started"} of that process, for the message that refuses another

Its state is read from which of these exist, so any process (another shard of a sweep, a push, a
report) sees the same state without being told: ``done`` (evaluated), ``failed`` (error.txt),
``trained`` (finished model, not evaluated), ``partial`` (checkpoints only), ``pending``.
What a ``metrics.json`` holds is read by :class:`fusioner.metrics_file.Metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from fusioner.config import (
    INPUT_PATH_KEYS,
    RUNTIME_KEYS,
    Config,
    config_changes,
    load_config,
    read_yaml_mapping,
)
from fusioner.errors import ConfigError, DataError, FusionerError
from fusioner.io import atomic_write_json, atomic_write_text, read_json
from fusioner.metrics_file import Metrics
from fusioner.model.files import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
TRAIN_STATE = "train_state.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "trainer_state.json"  # inside each checkpoint: the step it was taken at
MODEL = "model"
LOSSES = "losses.jsonl"
METRICS = "metrics.json"
ERROR = "error.txt"
EVALS = "evals"
MARKER = ".fusioner-run"
EVAL_WRITER = "fusioner eval"  # the mark of a metrics file eval wrote (see write_metrics)
LOCK = "run.lock"
LOCK_HOLDER = "run.lock.json"
# A finished checkpoint folder; "step-*.tmp" is one being written, "step-*.damaged" one set aside.
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
# What a training writes into a new folder before anything else: such a folder is still claimable.
_CLAIM_NAMES = frozenset({LOCK, LOCK_HOLDER, MARKER})

# Run states, as found on disk.
DONE, FAILED, TRAINED, PARTIAL, PENDING = "done", "failed", "trained", "partial", "pending"
STATES = (DONE, FAILED, TRAINED, PARTIAL, PENDING)


@dataclass(frozen=True)
class TrainState:
    """``train_state.json``: how far training got."""

    steps: int
    total_steps: int
    finished: bool


@dataclass(frozen=True)
class RunDir:
    """The files of one training run (layout in the module docstring). Creating one touches nothing."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # accept a str, as every caller has one

    def __str__(self) -> str:
        return str(self.path)

    # -- file names ------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def train_state(self) -> Path:
        return self.path / TRAIN_STATE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def losses(self) -> Path:
        return self.path / LOSSES

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def error(self) -> Path:
        return self.path / ERROR

    @property
    def evals(self) -> Path:
        return self.path / EVALS

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def lock_holder(self) -> Path:
        return self.path / LOCK_HOLDER

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint taken at ``step``; zero-padded so names sort by step."""
        return self.checkpoints / f"step-{step:08d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (not ``.tmp`` folders being written, nor ``.damaged`` ones)."""
        return sorted(p for p in self.checkpoints.glob("step-*") if _CHECKPOINT_NAME.fullmatch(p.name))

    def latest_checkpoint(self) -> Path | None:
        done = self.list_checkpoints()
        return done[-1] if done else None

    # -- claiming a folder for training ----------------------------------------------------------
    @classmethod
    def for_training(cls, out_dir: str | Path) -> RunDir:
        """The run directory ``out_dir`` names, refused (ConfigError) where training would write into
        a folder it did not make: an empty value (an unset shell variable would make it the current
        folder), a file, or a non-empty folder that is not a run directory (see :meth:`is_run`)."""
        if not str(out_dir).strip():
            raise ConfigError(
                "config key 'out_dir' is empty (an unset shell variable?); expected the folder of the run"
            )
        run = cls(out_dir)
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"config key 'out_dir': {run.path} is a file; expected a folder for the run")
        if run.path.is_dir() and not run.is_run():
            foreign = sorted(p.name for p in run.path.iterdir() if p.name not in _CLAIM_NAMES)
            raise ConfigError(
                f"config key 'out_dir': {run.path} is not empty and is not a run directory (it holds "
                f"{run.path / foreign[0]}); training would write over it: choose a new or empty folder"
            )
        return run

    def is_run(self) -> bool:
        """True for a folder this library's training made (or an empty one it may claim).

        Made: it holds the marker train writes first, or, for runs made before the marker existed, a
        config.yaml with a training state, a checkpoint, a run.lock or a sweep's error.txt. A user's
        folder with a config.yaml and a losses.jsonl of their own is none of these, and train must not
        rewrite either file.
        """
        if not self.path.is_dir():
            return False
        if self.marker.is_file():
            return True
        made = (self.train_state, self.lock_file, self.error)  # what only train or a sweep writes
        if self.config.is_file() and (any(p.is_file() for p in made) or self.latest_checkpoint() is not None):
            return True
        # Empty, or only what another process of this very launch wrote an instant ago (its lock).
        return all(p.name in _CLAIM_NAMES for p in self.path.iterdir())

    def start_over(self, config_checked: bool, *, write: bool) -> None:
        """Training is about to start at step 0 in this directory: drop what an earlier training left.

        Without ``config_checked`` (no ``--resume``), a finished model or metrics here are refused:
        they came from another training, maybe under another config, and would be read as this one's
        (a sweep skips a run with metrics.json, push publishes them, the demo applies their
        calibration). With it, the config was found equal (:meth:`check_resumable`), and the old
        figures, which describe a model about to be replaced, are removed (``write``: by the main
        process only).
        """
        stale = [p for p in (self.metrics, self.evals, self.train_state, self.model) if p.exists()]
        if not stale:
            return
        if not config_checked:
            raise FusionerError(
                f"{self.path} holds an earlier training's results ({', '.join(map(str, stale))}); "
                "train into another out_dir, or pass --resume to retrain under the same config"
            )
        if write:
            for path in (self.metrics, self.train_state):
                path.unlink(missing_ok=True)
            if self.evals.is_dir():
                shutil.rmtree(self.evals)

    # -- one writer at a time --------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock for the block, or refuse at once, naming the process that holds it.

        Two trainings into one directory once crashed one and interleaved the other's losses.jsonl.
        The lock is an OS file lock (``filelock``): a killed holder releases it with its last breath,
        so a stale ``run.lock`` never blocks a resume.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FusionerError(
                f"run directory {self.path} is in use by {self._holder()} (lock {self.lock_file}); "
                "wait for it to finish, or use another out_dir"
            ) from None
        try:
            started = datetime.now(UTC).isoformat(timespec="seconds")
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
            atomic_write_json(self.lock_holder, holder)
            if not self.marker.is_file():  # only training locks a run: it marks the folder as one
                atomic_write_text(self.marker, "a fusioner training run; `fusioner train` may write here\n")
            yield
        finally:
            self.lock_holder.unlink(missing_ok=True)
            lock.release()

    def _holder(self) -> str:
        try:
            h = json.loads(self.lock_holder.read_text())
            return f"process {h['pid']} on host {h['host']} (since {h['started']})"
        except (OSError, ValueError, KeyError, TypeError):  # taken an instant ago, holder not written yet
            return "another process"

    def check_resumable(self, config: Config, remedy: str) -> None:
        """Refuse to continue this run under ``config`` if its progress was made under another one.

        Only :data:`fusioner.config.RUNTIME_KEYS` may change: anything else would leave config.yaml
        claiming, say, a held-out name that was trained on for hundreds of steps. A run with nothing
        to keep (no checkpoint, model or metrics: it failed before its first checkpoint) may start
        over under any config. ``remedy`` ends the message (what the caller's user can do instead).
        """
        progress = self.has_metrics() or self.is_trained() or self.latest_checkpoint() is not None
        if not self.config.is_file() or not progress:
            return
        if changed := config_changes(self.read_config(), config):
            raise ConfigError(
                f"{self.path} was started with another config ({'; '.join(changed)}), recorded in "
                f"{self.config}; a resumed run may change only {', '.join(sorted(RUNTIME_KEYS))}: {remedy}"
            )

    # -- reading and writing ---------------------------------------------------------------------
    def read_config(self) -> Config:
        """The run's training config."""
        if not self.config.is_file():
            raise FusionerError(
                f"{self.path} is not a run directory: {CONFIG} (its training config) is missing"
            )
        config = load_config(self.config)
        # Runs written before config.yaml recorded absolute paths hold paths relative to the folder
        # training started in, where a config file's own paths now start at its folder. Such a run
        # still reads its data (from the current folder), and says so.
        raw = read_yaml_mapping(self.config, "config file")
        fixes = {}
        for key in INPUT_PATH_KEYS:
            value = raw.get(key)
            if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
                continue
            if not Path(getattr(config, key)).exists() and Path(value).expanduser().exists():
                fixes[key] = str(Path(value).expanduser().resolve())
                log.warning("%s: %s %r read from the current folder (%s), as when it was trained",
                            self.config, key, value, fixes[key])  # fmt: skip
        return dataclasses.replace(config, **fixes) if fixes else config

    def read_train_state(self) -> TrainState | None:
        """``train_state.json``, or None where training never finished a first save."""
        if not self.train_state.is_file():
            return None
        data = read_json(self.train_state, "training state")
        if not isinstance(data, dict):
            raise DataError(f"training state {self.train_state} is not a JSON object")
        return TrainState(data.get("steps", 0), data.get("total_steps", 0), bool(data.get("finished", False)))

    def write_train_state(self, steps: int, total_steps: int) -> Path:
        return atomic_write_json(
            self.train_state, {"steps": steps, "total_steps": total_steps, "finished": steps >= total_steps}
        )

    def read_metrics(self) -> Metrics:
        return Metrics.read(self.metrics)

    def read_losses(self) -> list[float]:
        """The logged loss of every optimizer step; empty before the first."""
        if not self.losses.is_file():
            return []
        return [json.loads(line)["loss"] for line in self.losses.read_text().splitlines() if line.strip()]

    def last_error(self) -> str:
        """The last non-blank line of ``error.txt`` (a traceback's own exception line), else ``""``."""
        if not self.error.is_file():
            return ""
        lines = self.error.read_text().splitlines()
        return next((ln for ln in reversed(lines) if ln.strip()), "")

    # -- state -----------------------------------------------------------------------------------
    def missing_model_files(self) -> list[Path]:
        """What ``model/`` lacks to be a finished model folder; empty when it is one."""
        return [self.model / f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (self.model / f).is_file()]

    def has_metrics(self) -> bool:
        try:
            self.read_metrics()
        except DataError:
            return False
        return True

    def is_trained(self) -> bool:
        """Training finished and saved its model (a model without train_state.json is not trusted)."""
        try:
            state = self.read_train_state()
        except DataError:
            return False
        return state is not None and state.finished and not self.missing_model_files()

    @property
    def state(self) -> str:
        """done | failed | trained (not evaluated) | partial (has checkpoints) | pending."""
        if self.has_metrics():
            return DONE
        if self.error.is_file():
            return FAILED
        if self.is_trained():
            return TRAINED
        return PARTIAL if self.latest_checkpoint() is not None else PENDING

    def require_finished_model(self) -> TrainState | None:
        """Raise unless the run holds a finished model; its training state, where it has one."""
        if not self.path.is_dir():
            raise FusionerError(f"run directory {self.path} does not exist")
        if missing := self.missing_model_files():
            raise FusionerError(
                f"{self.path} holds no finished model: {', '.join(map(str, missing))} missing "
                f"(train it to the end first; `fusioner train --resume` continues a killed run)"
            )
        try:
            state = self.read_train_state()
        except DataError as e:
            raise FusionerError(str(e)) from None
        if state is not None and not state.finished:
            raise FusionerError(
                f"{self.path} holds an unfinished model ({state.steps} of {state.total_steps} steps in "
                f"{self.train_state}); finish training with `fusioner train --resume` first"
            )
        return state
