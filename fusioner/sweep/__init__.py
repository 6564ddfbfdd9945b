"""Pairwise backbone sweeps: a product of config values, trained and evaluated run by run, resumably.

Three steps, one module each: :mod:`~fusioner.sweep.expand` turns a sweep file into named runs
(the expansion rule is there), :mod:`~fusioner.sweep.runner` trains and evaluates them under
accelerate, in shards and resumably, and :mod:`~fusioner.sweep.report` tabulates what the run
directories hold. A run's state is read from its directory by :class:`fusioner.run.RunDir`.

:mod:`~fusioner.sweep.launch` submits the shards as one submitit job array (SLURM or local
processes); it is imported on demand, so the rest never needs submitit.
"""

from fusioner.sweep.expand import Axis, Run, Sweep, expand, load_sweep, parse_shard, read_plan, sanitize
from fusioner.sweep.report import Row, collect, heatmap, results_csv, results_markdown, write_report
from fusioner.sweep.runner import RunOutcome, SweepResult, check_same_config, run_one, run_sweep, write_status

__all__ = [
    "Axis",
    "Row",
    "Run",
    "RunOutcome",
    "Sweep",
    "SweepResult",
    "check_same_config",
    "collect",
    "expand",
    "heatmap",
    "load_sweep",
    "parse_shard",
    "read_plan",
    "results_csv",
    "results_markdown",
    "run_one",
    "run_sweep",
    "sanitize",
    "write_report",
    "write_status",
]
