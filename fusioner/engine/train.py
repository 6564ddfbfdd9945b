"""Training loop (accelerate): only the fusion head trains; the backbones stay frozen.

Every random choice of a training example (flip, negative names) is drawn from
``(seed, virtual index)``, and the epoch order from ``(seed, epoch)``, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have seen.

Several processes (``accelerate launch``, ``torchrun``) train one run together: each takes every
N-th batch of that order, so the global batch is ``batch_size x processes x grad_accum``; DDP
averages the processes' gradients, which makes N processes x ``batch_size`` the same update as one
process with ``grad_accum`` N (``tests/test_ddp.py``). Only the main process writes the run
directory; the feature cache is encoded by one process while the others wait on its lock.

The examples and their order are fusioner/engine/train_data.py's, checkpoints
fusioner/engine/checkpoint.py's; this module holds the loss of a batch and the loop.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import DistributedType
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from fusioner.config import Config, save_config
from fusioner.data import Split, build_split, check_dataset
from fusioner.engine import checkpoint
from fusioner.engine.cache import prepare_cache
from fusioner.engine.train_data import CachedSource, ImageSource, make_loader
from fusioner.errors import FusionerError
from fusioner.methods import build_objective
from fusioner.methods.teacher import TeacherOutput, build_teacher
from fusioner.model import FusionerModel
from fusioner.model.losses import mask_loss, rank_loss, resize_labels
from fusioner.run import RunDir

log = logging.getLogger(__name__)


def expand_targets(target: Tensor, class_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Targets ``b h w`` (0 = background, j + 1 = seen[j], -1 = ignore) and queried classes ``b k``
    -> (binary masks ``b k h w`` uint8, valid ``b h w``)."""
    return (target[:, None] == class_idx[:, :, None, None] + 1).to(torch.uint8), target >= 0


def head_loss(
    head: nn.Module,
    tokens: Tensor,
    grid: tuple[int, int],
    vocab: Tensor,
    class_idx: Tensor,
    target: Tensor,
    dice_weight: float,
    ce_weight: float = 0.0,
) -> Tensor:
    """The training loss of one batch: tokens ``b n c``, queried names ``b k`` (indices into ``vocab``).

    Per-name BCE + ``dice_weight`` x dice, plus ``ce_weight`` x the per-pixel ranking term. It is
    taken at the decoder's resolution (half the input size): bilinearly upsampled logits carry
    nothing more, and full-size masks made the loss most of a step.
    """
    logits = head(tokens.float(), grid, vocab[class_idx])
    target = resize_labels(target, logits.shape[-2:])
    targets, valid = expand_targets(target, class_idx)
    loss = mask_loss(logits, targets, valid, dice_weight)
    if ce_weight:
        answered = valid & ((target == 0) | targets.any(1).bool())  # the pixel's class was queried
        loss = loss + ce_weight * rank_loss(logits, targets, answered)
    return loss


def _cpu_only() -> bool:
    """Whether accelerate must be told to stay on the CPU: this machine has no accelerator device.

    Without ``cpu=True``, accelerate under torchrun on a CPU-only machine forms no process group:
    every process trains alone on the whole data (DistributedType.NO) and each writes the run as
    its main process. With it, the processes join one gloo group (MULTI_CPU); a single process
    started without a launcher stays a plain run.
    """
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... in one call
    return not (probe.is_available() if probe is not None else torch.cuda.is_available())


def process_state() -> PartialState:
    """This process's place in the launch; the same ``cpu`` choice as the Accelerator of ``_train``
    (the state is one per process: whichever asks first fixes it)."""
    return PartialState(cpu=_cpu_only())


def _precision(config: Config) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    # One per optimizer step (resumed runs: from the resume), each the mean over the processes.
    losses: list[float]
    model: FusionerModel


def train(config: Config, *, resume: bool = False, split: Split | None = None) -> TrainResult:
    """Train the fusion head of ``config``; writes checkpoints, ``losses.jsonl`` and ``model/``.

    The run directory is locked for the whole training (a second training into it is refused at
    once); ``resume`` continues from its newest intact checkpoint, refusing a config that differs in
    anything but runtime keys.
    """
    check_dataset(config)  # an unknown dataset or fold is refused before the run directory is touched
    run = RunDir.for_training(config.out_dir)  # refuses "" and a folder that is not a run
    # The data is found before anything is written: a wrong data_path leaves no config.yaml or run.lock.
    split = split or build_split(config)
    main = process_state().is_main_process
    # Only the main process locks (and writes): the others of a multi-process launch train into the
    # same directory. They make the same checks on the same files, so all refuse together.
    with run.locked() if main else nullcontext():
        has_checkpoints = run.latest_checkpoint() is not None
        if not resume and has_checkpoints:
            raise FusionerError(
                f"{run.path} already holds checkpoints: pass --resume to continue, or another out_dir"
            )
        if resume:
            run.check_resumable(config, f"set them back, or train into another out_dir (not {run.path})")
            if not has_checkpoints:
                log.warning("--resume: no checkpoint in %s, starting from scratch", run.checkpoints)
        if not (resume and has_checkpoints):  # from step 0: an earlier training's results are stale
            run.start_over(config_checked=resume, write=main)
        if main:
            save_config(config, run.config)
        return _train(config, run, has_checkpoints and resume, split)


def _train(config: Config, run: RunDir, resume: bool, split: Split | None) -> TrainResult:
    out_dir = run.path
    accelerator = Accelerator(
        cpu=_cpu_only(),
        mixed_precision=_precision(config),
        gradient_accumulation_steps=config.grad_accum,
        # The scheduler is stepped once per optimizer step, below. Tied to the optimizer, accelerate
        # steps it once per process per step, so N processes ran the warmup and cosine N times
        # faster than the `total` optimizer steps they are laid out over.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard",
        project_dir=str(out_dir),
    )
    if accelerator.distributed_type != DistributedType.NO:
        log.info(
            "process %d of %d (%s); global batch %d = batch_size %d x %d processes x grad_accum %d",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.distributed_type.value,
            config.batch_size * accelerator.num_processes * config.grad_accum,
            config.batch_size,
            accelerator.num_processes,
            config.grad_accum,
        )
    set_seed(config.seed)
    split = split or build_split(config)
    if not split.seen:
        raise FusionerError("no seen class names to train on: check unseen_classes / fold")
    model = FusionerModel.from_config(config)
    device = accelerator.device
    model.vision.to(device)
    model.text.to(device)

    vocab = model.text(split.seen)  # v ct, encoded once per vocabulary
    if config.shuffle_names:
        vocab = vocab[torch.randperm(len(vocab), generator=torch.Generator().manual_seed(config.seed))]
    # Every process opens the cache at once. The cache's fill lock makes the first one encode and the
    # others wait for it, then read what it wrote: each image is encoded once. Not main_process_first:
    # its barrier is a collective that times out (10 min under NCCL) while a first fill of a large
    # set takes longer; a file lock waits as long as the fill takes.
    # CLIP-ZSS's frozen teacher (None unless teacher_vision is set): cached in a folder of its own.
    teacher = build_teacher(config)
    if teacher is not None:
        teacher.to(device)
    source = (
        CachedSource(
            prepare_cache(config, model.vision, split.train, device),
            [split.train.item_id(i) for i in range(len(split.train))],
            prepare_cache(config, teacher, split.train, device) if teacher is not None else None,
        )
        if config.use_cache
        else ImageSource(split.train, config.image_size)
    )
    if source.cached:
        model.vision.to("cpu")  # its work is done: give the accelerator's memory to the head
        if teacher is not None:
            teacher.to("cpu")
    similarity = None
    if config.hard_negatives:
        unit = torch.nn.functional.normalize(vocab.float(), dim=-1).cpu()
        similarity = unit @ unit.T
    # ZegCLIP's transductive setting (methods/zegclip_st.py): the unseen names (never their labels)
    unseen = list(split.unseen) if config.zegclip_self_training else []
    loader = make_loader(source, split.seen, config, similarity, unseen)
    total = len(loader) // config.grad_accum
    total = min(total, config.max_steps) if config.max_steps > 0 else total
    if total == 0:
        raise FusionerError(
            f"no training step fits: {len(source)} images x {config.epochs} epochs with batch_size="
            f"{config.batch_size} and grad_accum={config.grad_accum}"
        )
    # Terms beyond the head's own loss (fusioner/methods/objective.py); None for the plain head.
    unseen_vocab = model.text(unseen) if unseen else None
    objective = build_objective(
        config, model.head, model.vision, model.text.embed_dim, vocab, teacher, unseen_vocab
    )
    trained = [*model.head.parameters(), *(objective.parameters() if objective is not None else ())]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    if config.compile:
        model.head.compile()  # in place: state_dict keys stay those of the plain module
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total // 2), total)
    # Only the head (and what drives it) is prepared: the frozen adapters get no DDP wrapper,
    # no optimizer state and no gradients.
    head, optimizer, loader, scheduler = accelerator.prepare(model.head, optimizer, loader, scheduler)
    if objective is not None:  # its synthesizer / projection resume with the head (engine/checkpoint.py)
        objective.to(device)
    accelerator.init_trackers("train", config={k: str(v) for k, v in config.to_dict().items()})

    step = checkpoint.resume(accelerator, run, config, objective) if resume else 0
    batches = accelerator.skip_first_batches(loader, step * config.grad_accum) if step else loader
    loss_log = run.losses
    if accelerator.is_main_process:  # one writer: the others' lines would interleave with its own
        kept = checkpoint.logged_steps(loss_log, step) if step and loss_log.exists() else []
        loss_log.write_text("".join(ln + "\n" for ln in kept))

    losses: list[float] = []
    running: list[float] = []
    bar = tqdm(
        total=total, initial=step, desc="training", unit="step", disable=not accelerator.is_local_main_process
    )
    head.train()
    with loss_log.open("a") if accelerator.is_main_process else nullcontext() as log_file:
        for batch in batches:
            if step >= total:
                break
            with accelerator.accumulate(head):
                x = batch["x"].to(device)
                cls = None
                if source.cached:
                    tokens, grid = x.flatten(1, 2), (x.shape[1], x.shape[2])
                    cls = batch["cls"].to(device).float() if batch["cls"] is not None else None
                else:
                    out = model.vision(x)
                    tokens, grid, cls = out.tokens, out.grid, out.cls
                class_idx = batch["class_idx"].to(device)
                target = batch["target"].to(device)
                taught = None
                if teacher is not None and source.cached:
                    t = batch["teacher"].to(device).float()
                    t_cls = batch.get("teacher_cls")
                    t_cls = t_cls.to(device).float() if t_cls is not None else None
                    taught = TeacherOutput(t.flatten(1, 2), (t.shape[1], t.shape[2]), t_cls)
                elif teacher is not None:
                    with torch.no_grad():
                        out = teacher(x)
                    taught = TeacherOutput(out.tokens, out.grid, out.cls)
                if objective is not None:
                    loss = objective(
                        head, tokens, grid, vocab, class_idx, target, cls=cls, teacher=taught, step=step
                    )
                else:
                    loss = head_loss(
                        head, tokens, grid, vocab, class_idx, target, config.dice_weight, config.ce_weight
                    )
                # The mean over the processes: what one process with their examples would log, and
                # non-finite on every process when it is on one, so all stop here together instead
                # of the others waiting forever in backward for the one that stopped.
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
                if not torch.isfinite(mean_loss):
                    # Stop before the update: the last checkpoint on disk stays the last good one.
                    last = run.latest_checkpoint()
                    raise FusionerError(
                        f"training diverged: the loss is {mean_loss.item()} at step {step + 1}; "
                        f"last good checkpoint: {last or 'none yet'} (try a lower lr or a larger temperature)"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip_grad > 0:
                    accelerator.clip_grad_norm_(head.parameters(), config.clip_grad)
                try:
                    optimizer.step()
                except RuntimeError as e:  # e.g. lr=1e38: Adam's step size overflows float32
                    if "overflow" not in str(e):
                        raise
                    raise FusionerError(
                        f"training diverged: the update at step {step + 1} overflows float32 (lr "
                        f"{scheduler.get_last_lr()[0]:g}); last good checkpoint: "
                        f"{run.latest_checkpoint() or 'none yet'} (try a lower lr)"
                    ) from None
                # Once per optimizer step (not on accumulation steps, nor after an fp16 step the
                # grad scaler skipped), as accelerate does for a scheduler tied to the optimizer.
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            running.append(mean_loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            value = float(np.mean(running))
            running = []
            losses.append(value)
            if log_file is not None:
                log_file.write(
                    json.dumps({"step": step, "loss": value, "lr": scheduler.get_last_lr()[0]}) + "\n"
                )
                if step % config.log_every == 0 or step == total:
                    log_file.flush()
            if step % config.log_every == 0 or step == total:
                accelerator.log({"loss": value, "lr": scheduler.get_last_lr()[0]}, step=step)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
            if step % config.checkpoint_every == 0 and step < total:
                if log_file is not None:  # the losses up to a checkpoint outlive a kill after it
                    log_file.flush()
                accelerator.wait_for_everyone()
                checkpoint.save_checkpoint(accelerator, run, step, config, objective)
    bar.close()
    accelerator.wait_for_everyone()
    checkpoint.save_checkpoint(accelerator, run, step, config, objective)
    model.head = accelerator.unwrap_model(head)
    model.vision.to(device)  # the returned model is whole again, ready for evaluation
    if accelerator.is_main_process:
        model.save_pretrained(run.model)
        run.write_train_state(step, total)
    accelerator.end_training()
    return TrainResult(out_dir, step, losses, model)
