"""The cases of benchmarks/faults.py, one module per group; each module registers its own cases."""

from __future__ import annotations

import importlib

# The table's row order: modules in this order, cases in each in the order they are defined.
MODULES = ("cases_data", "cases_train", "cases_model", "cases_issue21", "cases_weak21")


def load_cases() -> list:
    """Import every case module (registering its cases) and return the cases, in table order."""
    for name in MODULES:
        importlib.import_module(f"faultcases.{name}")
    from faultcases.common import CASES

    return CASES
