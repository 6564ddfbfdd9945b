"""Training checkpoints: written atomically, checked before loading, never a way to run code.

A checkpoint is accelerate's ``save_state`` folder (head weights as safetensors; optimizer,
scheduler and random states through accelerate's ``load``, which reads them ``weights_only``)
plus two files of ours:

- ``objective.safetensors``: the parameters of the training objective (methods/objective.py).
  They are *not* registered with accelerate's ``register_for_checkpointing``, whose
  ``custom_checkpoint_N.pkl`` is read back with ``weights_only=False``: a planted file there would
  run whatever it names on ``--resume``. Safetensors holds tensors and nothing else.
- ``trainer_state.json``: the step, every file's size (a truncated or lost file is found before
  anything is read), the number of processes that wrote it, and the run's config without its
  runtime keys, so that another run's copied checkpoints are refused even where ``config.yaml``
  is missing or was edited.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fusioner.config import RUNTIME_KEYS, Config
from fusioner.errors import ConfigError, FusionerError
from fusioner.io import read_json
from fusioner.run import CHECKPOINT_STATE, RunDir

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
OBJECTIVE_FILE = "objective.safetensors"
# What loading a damaged (or planted) accelerate state raises: torch.load of a cut zip
# (RuntimeError, EOFError), a global that weights_only refuses (UnpicklingError), safetensors
# (SafetensorError), a missing file (OSError), a wrong shape (RuntimeError).
_LOAD_ERRORS = (
    FusionerError,
    OSError,
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    pickle.UnpicklingError,
    SafetensorError,
)


def trained_settings(config: Config) -> dict[str, Any]:
    """The config's keys that shape the trained weights (all but the runtime ones), JSON-normalised."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_KEYS}
    return json.loads(json.dumps(settings, default=str))


def save_checkpoint(
    accelerator: Accelerator, run: RunDir, step: int, config: Config, objective: nn.Module | None
) -> Path:
    """``save_state`` into a temporary folder renamed into place: never a half-written checkpoint."""
    final = run.checkpoint(step)
    if final.exists():
        return final
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random states are in tmp before it is sealed
    if accelerator.is_main_process:
        if objective is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
            save_file(state, str(tmp / OBJECTIVE_FILE))
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {
            "step": step,
            "processes": accelerator.num_processes,
            "files": files,
            "config": trained_settings(config),
        }
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
        os.replace(tmp, final)
        for old in run.list_checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint(ckpt: Path) -> int:
    """The step of checkpoint ``ckpt``, or a FusionerError saying what is damaged in it.

    Damaged: trainer_state.json missing, unreadable or not naming the folder's step, or a file it
    lists missing or of another size (truncated). Contents that fail to load are found by the caller.
    """
    state = read_json(ckpt / CHECKPOINT_STATE, "checkpoint state")
    expected = int(ckpt.name.removeprefix("step-"))
    if not isinstance(state, dict) or state.get("step") != expected:
        raise FusionerError(f"{ckpt / CHECKPOINT_STATE} does not record step {expected}")
    # Checkpoints written before the file list existed are only checked by loading them.
    files = state.get("files", {})
    if not isinstance(files, dict):
        raise FusionerError(f"{ckpt / CHECKPOINT_STATE}: 'files' is not a mapping of file names to sizes")
    for name, size in files.items():
        path = ckpt / name
        if not path.resolve().is_relative_to(ckpt.resolve()):
            raise FusionerError(f"{ckpt / CHECKPOINT_STATE} lists {name!r}, which is outside {ckpt}")
        if not path.is_file():
            raise FusionerError(f"{path} is missing")
        if path.stat().st_size != size:
            raise FusionerError(f"{path} is {path.stat().st_size} bytes, {size} were written (truncated?)")
    return expected


def check_origin(ckpt: Path, config: Config, processes: int) -> None:
    """Refuse to resume ``ckpt`` under another config or with another number of processes.

    The config: a checkpoint copied from another run would otherwise continue as that run while
    this run's config.yaml claims another seed or lr. The processes: the global batch is
    ``batch_size x processes x grad_accum`` and a resume's data position is counted in each
    process's batches. Checkpoints written before either was recorded are not checked for it.
    """
    state = read_json(ckpt / CHECKPOINT_STATE, "checkpoint state")
    written = state.get("processes", processes)
    if written != processes:
        raise ConfigError(
            f"{ckpt} was written by {written} training processes and this launch has {processes}: "
            f"resume with {written} (e.g. `accelerate launch --num_processes {written}`), since the global "
            "batch is batch_size x processes x grad_accum; or train into another out_dir"
        )
    recorded = state.get("config")
    if isinstance(recorded, dict):
        now = trained_settings(config)
        changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in now.items() if recorded.get(k) != v]
        if changed:
            raise ConfigError(
                f"{ckpt} was trained under another config ({'; '.join(changed)}): it is not this run's "
                "checkpoint; train into another out_dir, or delete its checkpoints to start over"
            )


def _load(accelerator: Accelerator, ckpt: Path, objective: nn.Module | None) -> None:
    accelerator.load_state(str(ckpt))
    if objective is None:
        return
    path = ckpt / OBJECTIVE_FILE
    if not path.is_file():
        raise FusionerError(f"{path} is missing (the training objective's parameters)")
    objective.load_state_dict(load_file(str(path), device="cpu"))


def resume(accelerator: Accelerator, run: RunDir, config: Config, objective: nn.Module | None) -> int:
    """Load the newest intact checkpoint into the prepared objects and return its step.

    A damaged one is named in a warning and the one before it is tried: training keeps two, so one
    damaged file costs at most ``checkpoint_every`` steps. Once one loads, the damaged newer ones are
    renamed ``step-N.damaged`` (kept for a look; out of the way of the checkpoint this run will write
    at step N). None intact is an error that changes nothing on disk.
    """
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(run.list_checkpoints()):
        try:
            step = check_checkpoint(ckpt)
        except FusionerError as e:
            log.warning("checkpoint %s is damaged: %s; trying the one before", ckpt, e)
            damaged.append((ckpt, str(e)))
            continue
        # Outside the try: another origin is no damage, and the checkpoint before has it too.
        check_origin(ckpt, config, accelerator.num_processes)
        try:
            _load(accelerator, ckpt, objective)
        except _LOAD_ERRORS as e:
            reason = str(e) if isinstance(e, FusionerError) else f"{type(e).__name__}: {e}"
            log.warning("checkpoint %s is damaged: %s; trying the one before", ckpt, reason)
            damaged.append((ckpt, reason))
            continue
        accelerator.wait_for_everyone()  # every process has read the checkpoints before any is moved
        for bad, _ in damaged:
            aside = bad.with_name(bad.name + ".damaged")
            if accelerator.is_main_process:
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
            log.warning("resuming from %s; the damaged %s is kept as %s", ckpt.name, bad.name, aside)
        accelerator.wait_for_everyone()
        log.info("resumed from %s (step %d)", ckpt, step)
        return step
    found = "; ".join(f"{ckpt.name} ({reason})" for ckpt, reason in damaged)
    raise FusionerError(
        f"no intact checkpoint to resume in {run.checkpoints}: {found}; nothing was changed: train into "
        f"another out_dir, or delete {run.checkpoints} to start this one over"
    )


def logged_steps(loss_log: Path, step: int) -> list[str]:
    """The lines of ``losses.jsonl`` up to ``step``, which a resume from ``step`` keeps.

    A process killed mid-write leaves a cut last line: it is dropped with a warning (its step is
    trained and logged again), not a traceback that blocks the resume.
    """
    kept = []
    for n, line in enumerate(loss_log.read_text(errors="replace").splitlines(), start=1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a loss record (%r): dropped", loss_log, n, line[:60])
    return kept
