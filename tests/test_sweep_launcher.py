"""Sweeps through submitit: flags that do not go together, the SLURM array it would submit (sbatch
faked), and a real sweep in two shards through submitit's local executor, then one report."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from submitit.core.utils import DelayedSubmission

from fusioner.cli import main
from fusioner.sweep import write_report
from fusioner.sweep.launch import run_shard


def _sweep_file(tmp_path: Path, voc_folder: Path) -> Path:
    """Two runs (an lr axis) small enough to train and evaluate in seconds on a CPU."""
    spec = {
        "vision": "efficientnet_lite0", "text": "glove_50d", "lr": [1.0e-3, 2.0e-3], "dataset": "folder",
        "data_path": str(voc_folder), "unseen_classes": ["cow"], "preset": "tiny", "image_size": 64,
        "batch_size": 2, "max_steps": 2,
        # Both shards run at once here; with no cache they share no files but the sweep's own.
        "use_cache": False,
        "out_dir": str(tmp_path / "sweep"),
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def sweep_file(tmp_path, voc_folder) -> Path:
    return _sweep_file(tmp_path, voc_folder)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--launcher", "slurm", "--shard", "0/2"],
         "--shard 0/2 and --launcher slurm do not go together: the launcher submits every shard itself "
         "(--shards N sets how many); --shard i/n is for running one shard without it"),
        (["--partition", "gpu"],
         "--partition needs --launcher slurm (or local); without a launcher the sweep runs in this process "
         "(--shard i/n picks one shard for another scheduler)"),
        (["--shards", "2"], "--shards needs --launcher slurm (or local); without a launcher"),
        (["--launcher", "local", "--partition", "gpu"],
         "--partition is a SLURM option; it needs --launcher slurm, not local"),
        (["--launcher", "local", "--array-parallelism", "2"],
         "--array-parallelism is a SLURM option; it needs --launcher slurm, not local"),
        (["--launcher", "local", "--shards", "0"], "--shards 0: expected at least 1"),
        (["--launcher", "slurm", "--time", "0"], "--time 0: expected at least 1"),
        (["--launcher", "slurm", "--gpus-per-run", "-1"], "--gpus-per-run -1: expected at least 0"),
        (["--launcher", "local", "--shards", "3"],
         "--shards 3 is more than the 2 runs of the sweep in SWEEP; expected at most 2"),
    ],
)  # fmt: skip
def test_flags_that_do_not_go_together_are_refused(sweep_file, tmp_path, capsys, flags, message):
    assert main(["sweep", "--config", str(sweep_file), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fusioner sweep: error: {message.replace('SWEEP', str(tmp_path / 'sweep'))}")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "sweep" / "submitit").exists()


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine is a SLURM node")
def test_slurm_without_srun_says_where_to_submit_from(sweep_file, capsys):
    assert main(["sweep", "--config", str(sweep_file), "--launcher", "slurm", "--partition", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fusioner sweep: error: --launcher slurm: srun is not on PATH, so this is no SLURM node; submit from "
        "a SLURM login node, or run shards by hand with --shard i/n under another scheduler\n"
    )


class FakeSbatch:
    """Stands in for ``sbatch``: keeps the script it was given and answers with a job id."""

    def __init__(self) -> None:
        self.scripts: list[str] = []

    def __call__(self, command: list[str], **_: object):
        assert command[0] == "sbatch"
        self.scripts.append(Path(command[1]).read_text())
        return lambda: "Submitted batch job 4242\n"


def test_slurm_submits_one_array_task_per_shard(sweep_file, tmp_path, monkeypatch, capsys):
    import submitit.core.utils

    sbatch = FakeSbatch()
    monkeypatch.setattr(submitit.core.utils, "CommandFunction", sbatch)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "srun" else None)
    argv = ["sweep", "--config", str(sweep_file), "--launcher", "slurm", "--partition", "gpu"]
    argv += ["--gpus-per-run", "1", "--time", "90", "--array-parallelism", "1", "--shards", "2"]
    assert main(argv) == 0

    sweep_dir, logs = tmp_path / "sweep", tmp_path / "sweep" / "submitit"
    assert capsys.readouterr().out.splitlines() == [
        f"sweep {sweep_dir}: 2 runs in 2 shards, submitted as 2 SLURM array tasks",
        "job ids: 4242_0 4242_1",
        f"logs: {logs}/<job id>_0_log.out and .err, e.g. {logs}/4242_0_0_log.out",
        f"when they are done: fusioner sweep-report {sweep_dir}  (submit again to retry failed runs)",
    ]
    [script] = sbatch.scripts  # one sbatch call: an array, not two jobs
    expected = ["#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --array=0-1%1"]
    expected += [
        "#SBATCH --time=90",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={logs}/%A_%a_0_log.out",
    ]
    assert set(expected) <= set(script.splitlines())
    # Task i unpickles run_shard(sweep, i, 2, cwd): shard i/2 of the whole sweep.
    calls = [DelayedSubmission.load(logs / f"4242_{i}_submitted.pkl") for i in range(2)]
    assert [(c.function, c.args[1:3]) for c in calls] == [(run_shard, (0, 2)), (run_shard, (1, 2))]
    planned = [run["name"] for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]]
    assert [r.name for r in calls[0].args[0].runs] == planned and len(planned) == 2
    assert calls[1].args[3] == os.getcwd()  # relative paths of the sweep file resolve where it was submitted


def test_local_launcher_runs_every_shard_then_one_report(sweep_file, tmp_path, capsys):
    argv = ["sweep", "--config", str(sweep_file), "--launcher", "local", "--shards", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    sweep_dir, logs = tmp_path / "sweep", tmp_path / "sweep" / "submitit"
    names = [run["name"] for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]]
    assert out[0] == f"sweep {sweep_dir}: 2 runs in 2 shards, submitted as 2 local processes"
    assert out[2].startswith(f"logs: {logs}/<job id>_0_log.out and .err, e.g. {logs}/")
    assert [line.split(" (")[0] for line in out[3:]] == [
        f"   done  {names[0]}", f"shard 0/2: 1 runs in {sweep_dir}: 1 done",
        f"   done  {names[1]}", f"shard 1/2: 1 runs in {sweep_dir}: 1 done",
    ]  # fmt: skip
    events = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    assert sorted((e["run"], e["shard"], e["status"], e["action"]) for e in events) == [
        (names[0], "0/2", "done", "trained"), (names[1], "1/2", "done", "trained"),
    ]  # fmt: skip
    # Each task's own log holds its run's line (printed there as it finished).
    task_logs = sorted(logs.glob("*_log.out"))
    assert len(task_logs) == 2 and all(any(n in p.read_text() for n in names) for p in task_logs)

    write_report(sweep_dir)
    with open(sweep_dir / "results.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(names) and {row["state"] for row in rows.values()} == {"done"}
    for name, row in rows.items():
        metrics = json.loads((sweep_dir / name / "metrics.json").read_text())
        assert float(row["miou"]) == pytest.approx(metrics["one_way"]["miou"])
