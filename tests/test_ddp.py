"""Two training processes on the CPU (torchrun, gloo) on the real VOC samples (issue 13, scale).

One launch of ``fusioner train`` under ``torchrun --nproc_per_node 2`` shows that only the main
process writes the run, that the feature cache is encoded once, and that the head it trains is the
one a single process trains with the same global batch.

Which single-process run is "the same": accelerate gives each process every second batch of the
sampler's order (batch_size each), and DDP averages the two processes' gradients, each the gradient
of its own batch's mean loss. That is exactly one process with ``grad_accum=2`` (accelerate divides
each of the two losses by 2 and sums the gradients), whatever the loss. It equals one process with
``batch_size`` doubled only where the loss of 2b examples is the mean of the two halves' losses: the
BCE is normalised by the batch's valid pixels and the dice by its present masks, so halves with more
ignore pixels or present names weigh more in the one batch of 2b than in the average of two. The
second launch makes every example weigh the same (masks without ignore pixels, every name queried,
no dice) and checks that case directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from fusioner.config import load_config
from fusioner.engine.train import train
from fusioner.errors import ConfigError

# Runs as torchrun's worker: fusioner's own CLI, plus a record of what this rank wrote under the
# watched folder (Python's audit hooks see every open for writing, mkdir, rename and removal) and
# how many images its feature-cache fill encoded.
WORKER = """
import atexit, json, os, sys

import fusioner.engine.cache as cache_module
from fusioner.cli import main

WATCHED = os.path.realpath(os.environ["DDP_TEST_WATCH"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
writes, encoded = set(), []


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        paths = [args[0]]
    elif event == "os.rename":
        paths = [args[0], args[1]]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(WATCHED + os.sep):
                writes.add(os.path.relpath(path, WATCHED))


def counted_fill(*args, **kwargs):
    encoded.append(fill(*args, **kwargs))
    return encoded[-1]


def report():
    out = os.path.join(os.environ["DDP_TEST_RECORD"], "rank-" + os.environ.get("RANK", "0") + ".json")
    with open(out, "w") as f:
        json.dump({"writes": sorted(writes), "encoded": encoded}, f)


fill, cache_module.fill_cache = cache_module.fill_cache, counted_fill
sys.addaudithook(audit)
atexit.register(report)
sys.exit(main(sys.argv[1:]))
"""

# What the second process may write in the run directory: accelerate's save_state creates the
# checkpoint folder being written (makedirs, from every process) and saves each process's RNG states.
OTHER_RANK_WRITES = re.compile(r"checkpoints(/step-\d{8}\.tmp(/random_states_1\.pkl)?)?")
STEPS, LR = 4, 2e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(data: Path, tmp: Path, name: str, **kw) -> dict:
    return (
        dict(
            dataset="folder",
            data_path=str(data),
            unseen_classes=["cow", "sheep"],
            vision="efficientnet_lite0",
            text="minilm_l6",
            preset="tiny",
            image_size=64,
            batch_size=2,
            epochs=20,
            lr=LR,
            warmup_steps=2,
            num_negatives=2,
            max_steps=STEPS,
            checkpoint_every=2,
            out_dir=str(tmp / name),
            cache_dir=str(tmp / "cache"),
        )
        | kw
    )


def _launch(settings: dict, tmp: Path, processes: int = 2) -> tuple[Path, dict[int, dict]]:
    """``fusioner train`` in ``processes`` CPU processes; the run directory and each rank's record.

    The single-process runs compared with them run apart too, on the CPU: in this process they
    would take the GPU where there is one, whose kernels round differently.
    """
    out, record = Path(settings["out_dir"]), tmp / f"record-{Path(settings['out_dir']).name}"
    record.mkdir()
    (tmp / "worker.py").write_text(WORKER)
    config = tmp / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = os.environ | {"OMP_NUM_THREADS": "1", "DDP_TEST_WATCH": str(out), "DDP_TEST_RECORD": str(record)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, as on a machine without GPUs
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [str(tmp / "worker.py"), "train", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    records = {r: json.loads((record / f"rank-{r}.json").read_text()) for r in range(processes)}
    return out, records


def _head(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor(
        [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
    )


def _assert_same_head(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same head to fp32 tolerance (the two runs sum the same gradients in another order).

    Except attention's key bias: it adds ``q . b_k`` to all of a query's logits alike, which the
    softmax ignores, so its true gradient is 0 and what it gets is rounding noise, of another sign
    in each run. AdamW divides that noise by its own running size, so the key bias moves by up to
    ``LR`` per step either way (1.5e-5 apart after 4 steps here, every other weight within 1e-7):
    it is held to that bound.
    """
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.qkv.bias"):  # q | k | v, each a third
            d = x.numel() // 3
            torch.testing.assert_close(x[d : 2 * d], y[d : 2 * d], rtol=0, atol=2 * LR * STEPS, msg=key)
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def launched(voc_folder, tmp_path_factory) -> tuple[Path, dict[int, dict], Path]:
    """One 2-process training on the VOC samples (4 steps, checkpoints at 2 and 4)."""
    if not torch.distributed.is_available():
        pytest.skip("this torch is built without torch.distributed")
    tmp = tmp_path_factory.mktemp("ddp")
    out, records = _launch(_settings(voc_folder, tmp, "ddp"), tmp)
    return out, records, tmp


def test_only_the_main_process_writes_the_run(launched):
    out, records, _ = launched
    assert records[0]["writes"], "the audit recorded nothing: the worker script did not run"
    strays = [w for w in records[1]["writes"] if not OTHER_RANK_WRITES.fullmatch(w)]
    assert strays == [], f"process 1 wrote {strays}"
    for name in ("config.yaml", "losses.jsonl", "train_state.json", "model/config.json", "run.lock"):
        assert name in records[0]["writes"]

    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one line per optimizer step, none twice
    assert json.loads((out / "train_state.json").read_text()) == {
        "steps": STEPS,
        "total_steps": STEPS,
        "finished": True,
    }
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]  # no .tmp left behind
    for ckpt in checkpoints:
        state = json.loads((out / "checkpoints" / ckpt / "trainer_state.json").read_text())
        assert state["processes"] == 2
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= set(state["files"])
    # Tensorboard event files carry the writer's pid: one process wrote them all.
    pids = {p.name.split(".")[-2] for p in (out / "train").rglob("events.out.tfevents.*")}
    assert len(pids) == 1, pids


def test_the_feature_cache_is_encoded_once(launched, voc_folder):
    _, records, tmp = launched
    train_ids = (voc_folder / "splits" / "train.txt").read_text().split()
    # Both processes fill the one cache; its lock lets one encode while the other waits and reads.
    assert sorted(records[0]["encoded"] + records[1]["encoded"]) == [0, len(train_ids)]
    [folder] = (tmp / "cache").iterdir()
    assert len(list(folder.glob("shard-*.safetensors"))) == 1
    index = json.loads((folder / "index.json").read_text())
    assert sorted(index["items"]) == sorted(train_ids)


def test_two_processes_train_the_head_one_process_trains_with_grad_accum_two(launched, voc_folder):
    out, _, tmp = launched
    single, _ = _launch(_settings(voc_folder, tmp, "accum", grad_accum=2), tmp, processes=1)
    _assert_same_head(_head(out), _head(single))
    # The logged loss is the mean over the processes: what the single process logs for the same examples.
    torch.testing.assert_close(_losses(out), _losses(single), rtol=1e-5, atol=1e-6)


def test_two_processes_equal_one_with_the_batch_doubled_when_every_example_weighs_the_same(
    voc_folder, tmp_path
):
    if not torch.distributed.is_available():
        pytest.skip("this torch is built without torch.distributed")
    # The VOC samples with their ignore borders (255) made background: every pixel is valid.
    data = Path(shutil.copytree(voc_folder, tmp_path / "voc"))
    for mask in (data / "masks").glob("*.png"):
        labels = np.asarray(Image.open(mask))
        Image.fromarray(np.where(labels == 255, 0, labels).astype(np.uint8)).save(mask)
    # Every seen name queried in every image (num_negatives above the number of seen names) and no dice term:
    # the loss of a batch is then the plain mean over its examples' pixels and names.
    same_weight = dict(num_negatives=32, dice_weight=0.0)
    out, _ = _launch(_settings(data, tmp_path, "ddp", **same_weight), tmp_path)
    doubled, _ = _launch(_settings(data, tmp_path, "doubled", batch_size=4, **same_weight), tmp_path, 1)
    _assert_same_head(_head(out), _head(doubled))


def test_a_resume_with_another_number_of_processes_is_refused(launched, tmp_path):
    out, _, _ = launched
    run = Path(shutil.copytree(out, tmp_path / "run"))
    settings = yaml.safe_load((run / "config.yaml").read_text()) | {"out_dir": str(run)}
    checkpoints = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    with pytest.raises(
        ConfigError, match=r"step-00000004 was written by 2 training processes and this launch has 1"
    ):
        train(load_config(None, **settings), resume=True)
    after = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    assert after == checkpoints  # refused before anything was loaded, moved or written
