"""Careless and hostile cases around a training run (issue 13): each ends in a one-line message naming
the file, key or value and what was expected (exit 2 from the CLI), with nothing lost on disk."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.engine import train as train_module
from fusioner.engine.train import train
from fusioner.errors import ConfigError, FusionerError
from fusioner.model import FusionerModel
from fusioner.run import RunDir


def _config(voc_folder, tmp_path, name, **kw):
    base = dict(
        dataset="folder",
        data_path=str(voc_folder),
        unseen_classes=["cow", "sheep"],
        preset="tiny",
        image_size=64,
        batch_size=4,
        epochs=20,
        lr=2e-3,
        warmup_steps=2,
        num_negatives=2,
        out_dir=str(tmp_path / name),
        cache_dir=str(tmp_path / "cache"),
    )
    return load_config(None, **{**base, **kw})


def _cli(argv, capsys) -> tuple[int, str]:
    """The exit code and the last line of stderr (progress bars come before it)."""
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(voc_folder, tmp_path_factory) -> Path:
    """A run trained to the end (4 steps, checkpoints at 2 and 4)."""
    tmp = tmp_path_factory.mktemp("finished")
    train(_config(voc_folder, tmp, "run", max_steps=4, checkpoint_every=2))
    return tmp / "run"


@pytest.fixture(scope="module")
def killed_run(voc_folder, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run killed at step 5 of 6 (checkpoints at 2 and 4) + the head an uninterrupted run ends with."""
    tmp = tmp_path_factory.mktemp("killed")
    whole = train(_config(voc_folder, tmp, "whole", max_steps=6, checkpoint_every=2)).model.head.state_dict()
    real_loss, calls = train_module.mask_loss, {"n": 0}

    def dies_on_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    train_module.mask_loss = dies_on_step_five
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_config(voc_folder, tmp, "killed", max_steps=6, checkpoint_every=2))
    finally:
        train_module.mask_loss = real_loss
    return tmp / "killed", whole


def _copy(run: Path, to: Path) -> Path:
    copy = Path(shutil.copytree(run, to))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(copy)}, sort_keys=False))
    return copy


# -- 1. a resume under another config ----------------------------------------------------------------
def test_resume_under_another_config_is_refused_naming_keys_and_values(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    code, err = _cli(
        ["train", "--config", str(run / "config.yaml"), "--resume", "unseen_classes=cow,horse", "lr=0.2"],
        capsys,
    )
    assert code == 2
    assert err == (
        f"fusioner train: error: {run} was started with another config (unseen_classes: ['cow', 'sheep'] "
        f"-> ['cow', 'horse']; lr: 0.002 -> 0.2), recorded in {run / 'config.yaml'}; a resumed run may "
        "change only cache_dir, checkpoint_every, compile, data_root, eval_batch_size, log_every, "
        "num_workers, out_dir, precision, use_cache: set them back, or train into another out_dir "
        f"(not {run})"
    )
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before  # config.yaml not rewritten, nothing else touched


def test_resume_may_change_runtime_keys_and_records_them(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    config = load_config(run / "config.yaml", ["log_every=3", "num_workers=0", "eval_batch_size=2"])
    assert train(config, resume=True).steps == 4
    assert load_config(run / "config.yaml").log_every == 3


def test_a_run_with_nothing_to_keep_may_start_over_under_any_config(voc_folder, tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.config).write_text(yaml.safe_dump({"lr": 1.0}))  # a run that failed before its first checkpoint
    config = _config(voc_folder, tmp_path, "run")
    run.check_resumable(config, "unused")  # nothing to keep: no refusal
    run.checkpoint(2).mkdir(parents=True)  # progress: now the same change is refused
    with pytest.raises(ConfigError, match=r"another config \(.*lr: 1\.0 -> 0\.002.*\).*: unused$"):
        run.check_resumable(config, "unused")


# -- 2. two trainings into one out_dir ----------------------------------------------------------------
def test_a_second_training_into_a_locked_run_directory_is_refused_naming_the_holder(voc_folder, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fusioner.run import RunDir\n"
         "with RunDir(sys.argv[1]).locked():\n    print('holding', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = json.loads((out / "run.lock.json").read_text())["started"]
        config = _config(voc_folder, tmp_path, "run", max_steps=2)
        t0 = time.monotonic()
        with pytest.raises(FusionerError) as refused:
            train(config)
        assert time.monotonic() - t0 < 2  # refused at once, not after a wait
        assert str(refused.value) == (
            f"run directory {out} is in use by process {holder.pid} on host {socket.gethostname()} "
            f"(since {started}) (lock {out / 'run.lock'}); wait for it to finish, or use another out_dir"
        )
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()  # kill -9: the OS releases its lock, the holder file stays behind
        holder.wait()
    assert (out / "run.lock.json").is_file()
    assert train(config).steps == 2  # a dead holder's leftovers never block the next training
    assert not (out / "run.lock.json").exists()  # released (and its holder file removed) at the end


def test_the_lock_is_refused_within_one_process_too(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.locked():
        with pytest.raises(FusionerError, match=rf"in use by process {os.getpid()} on host "):
            with run.locked():
                pass
    with run.locked():  # released on leaving the block
        pass


# -- 3. a damaged latest checkpoint --------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # same size, contents gone
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: _truncate(c / "model.safetensors"),
         r"model\.safetensors is \d+ bytes, \d+ were written \(truncated\?\)"),
        (lambda c: (c / "optimizer.bin").unlink(), r"optimizer\.bin is missing"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 4, "fi'),
         r"cannot read checkpoint state .*trainer_state\.json"),
        (lambda c: _garble(c / "model.safetensors"), r"SafetensorError"),  # right size, unloadable
    ],
)  # fmt: skip
def test_a_damaged_latest_checkpoint_is_named_set_aside_and_the_previous_one_resumed(
    killed_run, tmp_path, caplog, damage, reason
):
    run, whole = _copy(killed_run[0], tmp_path / "run"), killed_run[1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    damage(run / "checkpoints" / "step-00000004")
    with caplog.at_level(logging.WARNING, logger="fusioner.engine.train"):
        resumed = train(load_config(run / "config.yaml"), resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    ckpts = re.escape(str(run / "checkpoints"))
    assert len(warnings) == 2, warnings
    assert re.fullmatch(
        rf"checkpoint {ckpts}/step-00000004 is damaged: .*{reason}.*; trying the one before", warnings[0]
    ), warnings[0]
    assert warnings[1] == (
        "resuming from step-00000002; the damaged step-00000004 is kept as "
        f"{run / 'checkpoints' / 'step-00000004.damaged'}"
    )
    assert resumed.steps == 6 and len(resumed.losses) == 4  # steps 3-6, from step-00000002
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000004",  # written again by the resumed run
        "step-00000004.damaged",  # kept for a look, never loaded again
        "step-00000006",
    ]
    for key, value in resumed.model.head.state_dict().items():
        torch.testing.assert_close(value, whole[key], rtol=0, atol=0, msg=key)  # as if never killed
    logged = [json.loads(ln)["step"] for ln in (run / "losses.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))


def test_a_loss_line_cut_by_a_kill_is_dropped_with_a_warning_not_a_traceback(killed_run, tmp_path, caplog):
    run = _copy(killed_run[0], tmp_path / "run")
    with open(run / "losses.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # kill -9 in the middle of a write
    with caplog.at_level(logging.WARNING, logger="fusioner.engine.train"):
        assert train(load_config(run / "config.yaml"), resume=True).steps == 6
    cut = """('{"step": 5, "lo')"""
    assert f"{run / 'losses.jsonl'} line 5 is not a loss record {cut}: dropped" in caplog.text
    logged = [json.loads(ln)["step"] for ln in (run / "losses.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7))


def test_no_intact_checkpoint_is_an_error_that_names_each_and_deletes_none(killed_run, tmp_path, capsys):
    run = _copy(killed_run[0], tmp_path / "run")
    _truncate(run / "checkpoints" / "step-00000004" / "model.safetensors")
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").unlink()
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "checkpoints" in p.parts}
    code, err = _cli(["train", "--config", str(run / "config.yaml"), "--resume"], capsys)
    assert code == 2
    ckpts = re.escape(str(run / "checkpoints"))
    assert re.fullmatch(
        rf"fusioner train: error: no intact checkpoint to resume in {ckpts}: step-00000004 \({ckpts}/"
        rf"step-00000004/model\.safetensors is \d+ bytes, \d+ were written \(truncated\?\)\); step-00000002 "
        rf"\(checkpoint state {ckpts}/step-00000002/trainer_state\.json does not exist\); nothing was "
        rf"changed: train into another out_dir, or delete {ckpts} to start this one over",
        err,
    ), err
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "checkpoints" in p.parts}
    assert after == before  # nothing renamed or deleted: a retry meets the same error
    assert not (run / "model").exists()


# -- 4. a damaged saved model ----------------------------------------------------------------------------
def test_a_truncated_model_safetensors_is_named(finished_run, tmp_path):
    model = Path(shutil.copytree(finished_run / "model", tmp_path / "model"))
    _truncate(model / "model.safetensors")
    with pytest.raises(FusionerError) as e:
        FusionerModel.from_pretrained(model)
    assert re.fullmatch(
        rf"model weights {re.escape(str(model))}/model\.safetensors cannot be read \(.+\): truncated or "
        r"not a safetensors file; save or download the model again",
        str(e.value),
    ), e.value


def test_a_cut_off_config_json_is_named(finished_run, tmp_path):
    model = Path(shutil.copytree(finished_run / "model", tmp_path / "model"))
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(FusionerError) as e:
        FusionerModel.from_pretrained(model)
    assert re.fullmatch(
        rf"cannot read model config {re.escape(str(model))}/config\.json: .+ \(cut off or edited\? save or "
        r"download the model again\)",
        str(e.value),
    ), e.value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"vision_dim": 999}, "head.vision_dim is 999, but the vision backbone 'efficientnet_lite0' gives "
         "features 112 wide; the head and the backbone must agree (was config.json edited?)"),
        ({"text_dim": 768}, "head.text_dim is 768, but the text backbone 'minilm_l6' gives features 384 "
         "wide; the head and the backbone must agree (was config.json edited?)"),
    ],
)  # fmt: skip
def test_a_config_json_whose_head_does_not_fit_the_backbone_says_which_widths(
    finished_run, tmp_path, edit, message
):
    model = Path(shutil.copytree(finished_run / "model", tmp_path / "model"))
    record = json.loads((model / "config.json").read_text())
    record["head"].update(edit)
    (model / "config.json").write_text(json.dumps(record))
    with pytest.raises(FusionerError) as e:
        FusionerModel.from_pretrained(model)
    assert str(e.value) == f"model config {model / 'config.json'}: {message}"


def test_weights_of_another_head_width_name_the_tensor_and_both_shapes(finished_run, tmp_path):
    model = Path(shutil.copytree(finished_run / "model", tmp_path / "model"))
    record = json.loads((model / "config.json").read_text())
    record["head"]["dim"] = 128  # the weights are of a 64-wide head
    (model / "config.json").write_text(json.dumps(record))
    with pytest.raises(FusionerError) as e:
        FusionerModel.from_pretrained(model)
    assert re.fullmatch(
        rf"model weights {re.escape(str(model))}/model\.safetensors do not fit the head in "
        rf"{re.escape(str(model))}/config\.json: \S+ is \(\d+(, \d+)*\) there, \(\d+(, \d+)*\) in the head "
        r"config\.json describes \(\d+ tensor\(s\) differ\)",
        str(e.value),
    ), e.value


# -- 5. config files and values no run can use -------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("data_path: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 14)"),
        (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
    ],
)  # fmt: skip
def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    code, err = _cli(["train", "--config", str(path)], capsys)
    assert (code, err) == (2, f"fusioner train: error: config file {path} {message}; save it as UTF-8")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=-2", "config key 'batch_size': expected at least 1, got -2"),
        ("image_size=0", "config key 'image_size': expected at least 1, got 0"),
        ("epochs=-1", "config key 'epochs': expected at least 1, got -1"),
        ("dataset=pascal5i", "config key 'fold': 4 is out of range for dataset 'pascal5i', which has "
         "folds 0-3"),
        ("dataset=coco20i", "config key 'fold': 4 is out of range for dataset 'coco20i', which has "
         "folds 0-3"),
    ],
)  # fmt: skip
def test_values_no_run_can_use_are_refused_before_any_backbone_loads(
    voc_folder, tmp_path, capsys, monkeypatch, override, message
):
    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone was loaded")

    monkeypatch.setattr("fusioner.model.model.create_vision", no_backbone)
    monkeypatch.setattr("fusioner.model.model.create_text", no_backbone)
    out = tmp_path / "run"
    fold = [] if override.startswith(("batch", "image", "epochs")) else ["fold=4"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_path": str(voc_folder), "out_dir": str(out)}))
    code, err = _cli(["train", "--config", str(config), override, *fold], capsys)
    assert (code, err) == (2, f"fusioner train: error: {message}")
    assert not out.exists()  # no config.yaml, no lock file, nothing


def test_every_fold_of_a_folded_dataset_is_accepted():
    for dataset in ("pascal5i", "coco20i"):
        assert [load_config(None, dataset=dataset, fold=f).fold for f in range(4)] == [0, 1, 2, 3]
    assert load_config(None, dataset="folder", fold=5).fold == 5  # no folds there: the key is unused
    with pytest.raises(ConfigError, match="'fold': expected 0 or more, got -1"):
        load_config(None, dataset="pascal5i", fold=-1)
