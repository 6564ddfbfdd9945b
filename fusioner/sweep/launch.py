"""Sweeps on a cluster: the shards of a sweep as a submitit job array (SLURM, or local processes).

``fusioner sweep --launcher slurm --shards N`` submits one SLURM array of N tasks; task i runs
shard i/N of the sweep with :func:`~fusioner.sweep.runner.run_sweep`, exactly what ``--shard i/N``
runs by hand, so resuming, skipping finished runs and retrying failed ones work as they do there.
``--launcher local`` runs the same tasks as processes on this machine (submitit's LocalExecutor),
which is how the tests prove the path without a cluster. submitit's logs and pickles go to
``<sweep dir>/submitit``: ``<job id>_<task>_log.out`` / ``.err`` per array task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusioner.errors import ConfigError, FusionerError
from fusioner.sweep.expand import Sweep, write_plan
from fusioner.sweep.runner import SweepResult, run_sweep

LAUNCHERS = ("slurm", "local")
LOGS = "submitit"  # inside the sweep directory
DEFAULT_TIME_MIN = 24 * 60  # per array task; submitit's own default (5 min slurm, 2 min local) kills a sweep
SLURM_ONLY = {"partition": "--partition", "array_parallelism": "--array-parallelism"}


@dataclass(frozen=True)
class LaunchOptions:
    """How to submit a sweep's shards; the CLI flags, checked."""

    launcher: str  # slurm | local
    shards: int | None = None  # array tasks; None: one per run
    partition: str | None = None
    gpus_per_run: int | None = None  # None: 1 on slurm, 0 (CPU) locally
    time_min: int = DEFAULT_TIME_MIN
    array_parallelism: int | None = None  # at most this many tasks at once (slurm)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if self.launcher != "slurm":
            for field, flag in SLURM_ONLY.items():
                if getattr(self, field) is not None:
                    raise ConfigError(f"{flag} is a SLURM option; it needs --launcher slurm, not local")
        for flag, value, least in (
            ("--shards", self.shards, 1),
            ("--gpus-per-run", self.gpus_per_run, 0),
            ("--time", self.time_min, 1),
            ("--array-parallelism", self.array_parallelism, 1),
        ):
            if value is not None and value < least:
                raise ConfigError(f"{flag} {value}: expected at least {least}")

    @property
    def gpus(self) -> int:
        return self.gpus_per_run if self.gpus_per_run is not None else int(self.launcher == "slurm")


def launch_options(
    launcher: str | None,
    *,
    shard: str | None = None,
    shards: int | None = None,
    partition: str | None = None,
    gpus_per_run: int | None = None,
    time_min: int | None = None,
    array_parallelism: int | None = None,
) -> LaunchOptions | None:
    """The launch the flags ask for, or None to run in this process; refuses flags that do not go together."""
    if launcher is None:
        given = {"--shards": shards, "--gpus-per-run": gpus_per_run, "--time": time_min}
        given |= {"--partition": partition, "--array-parallelism": array_parallelism}
        for flag, value in given.items():
            if value is not None:
                raise ConfigError(
                    f"{flag} needs --launcher slurm (or local); without a launcher the sweep runs in this "
                    f"process (--shard i/n picks one shard for another scheduler)"
                )
        return None
    if shard is not None:
        raise ConfigError(
            f"--shard {shard} and --launcher {launcher} do not go together: the launcher submits every "
            f"shard itself (--shards N sets how many); --shard i/n is for running one shard without it"
        )
    time = DEFAULT_TIME_MIN if time_min is None else time_min
    return LaunchOptions(launcher, shards, partition, gpus_per_run, time, array_parallelism)


def run_shard(sweep: Sweep, index: int, count: int, cwd: str) -> SweepResult:
    """One array task: shard ``index/count`` of ``sweep``. Top-level, so submitit can pickle it."""
    # Relative paths of the sweep file (data_path, out_dir) mean what they meant where it was submitted.
    os.chdir(cwd)
    return run_sweep(sweep, shard=(index, count), on_outcome=lambda o: print(o.line(), flush=True))


@dataclass(frozen=True)
class Launch:
    """A submitted sweep: one submitit job per shard, in shard order."""

    sweep: Sweep
    jobs: list[Any]  # submitit.Job
    logs: Path

    @property
    def job_ids(self) -> list[str]:
        return [str(job.job_id) for job in self.jobs]

    def lines(self, launcher: str) -> list[str]:
        count = len(self.jobs)
        runs = len(self.sweep.runs)
        where = "SLURM array tasks" if launcher == "slurm" else "local processes"
        return [
            f"sweep {self.sweep.dir}: {runs} runs in {count} shards, submitted as {count} {where}",
            f"job ids: {' '.join(self.job_ids)}",
            f"logs: {self.logs}/<job id>_0_log.out and .err, e.g. {self.jobs[0].paths.stdout}",
        ]


def _executor(options: LaunchOptions, logs: Path, name: str) -> Any:
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=logs, cluster=options.launcher)
    except RuntimeError as e:
        if "srun" not in str(e):  # SlurmExecutor's 'Could not detect "srun"' is the user's; others are not
            raise
        raise FusionerError(
            "--launcher slurm: srun is not on PATH, so this is no SLURM node; submit from a SLURM login "
            "node, or run shards by hand with --shard i/n under another scheduler"
        ) from None
    # One task per array job, on one node; each run of the shard uses its GPUs in turn.
    params: dict[str, Any] = {"name": name, "timeout_min": options.time_min, "nodes": 1, "tasks_per_node": 1}
    params["gpus_per_node"] = options.gpus
    if options.launcher == "slurm":
        params |= {"slurm_partition": options.partition, "slurm_array_parallelism": options.array_parallelism}
    executor.update_parameters(**params)  # None values are left to submitit's and SLURM's defaults
    return executor


def submit(sweep: Sweep, options: LaunchOptions) -> Launch:
    """Submit the sweep's shards as one job array; returns without waiting for them."""
    import submitit

    count = options.shards or len(sweep.runs)
    if count > len(sweep.runs):
        raise ConfigError(
            f"--shards {count} is more than the {len(sweep.runs)} runs of the sweep in {sweep.dir}; "
            f"expected at most {len(sweep.runs)}"
        )
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_plan(sweep)  # sweep-report works from the moment of submission, before any task starts
    logs = sweep.dir.absolute() / LOGS
    executor = _executor(options, logs, f"fusioner-sweep-{sweep.dir.name}")
    indices = range(count)
    try:
        jobs = executor.map_array(run_shard, [sweep] * count, indices, [count] * count, [os.getcwd()] * count)
    except submitit.core.utils.FailedJobError as e:  # sbatch refused: its stderr says why
        raise FusionerError(f"submitting the sweep in {sweep.dir} failed: {str(e).strip()}") from None
    return Launch(sweep, jobs, logs)


def wait(launch: Launch) -> list[SweepResult]:
    """Each shard's result, in shard order, once all have ended; a task that died is named with its log."""
    import submitit

    results, dead = [], []
    for index, job in enumerate(launch.jobs):
        try:
            results.append(job.result())
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
            first = (str(e).strip().splitlines() or ["no message"])[0]
            dead.append(
                f"shard {index}/{len(launch.jobs)} (job {job.job_id}) died: {first}; see {job.paths.stderr}"
            )
    if dead:
        raise FusionerError(f"{len(dead)} of {len(launch.jobs)} shards died; {dead[0]}")
    return results
