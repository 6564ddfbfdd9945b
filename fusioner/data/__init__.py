"""Datasets and splits: ``build_split(config)`` turns ``config.dataset`` into a :class:`Split`.

Each benchmark module registers its ``build_<name>(config) -> Split`` with ``@register_dataset``
(:mod:`fusioner.data.registry`); importing them here fills :data:`BUILDERS`, the mapping of the
names ``config.dataset`` accepts to their builders.
"""

from __future__ import annotations

from fusioner.config import Config
from fusioner.data.base import IGNORE, Sample, SegDataset
from fusioner.data.registry import BUILDERS, FOLDS, get_builder, register_dataset
from fusioner.data.splits import COCO_CLASSES, VOC_CLASSES, ListDataset, Split
from fusioner.errors import ConfigError

# The dataset modules, imported for their registrations, in the order BUILDERS (and so the
# "known:" list of an unknown dataset) gives them.
# isort: off
from fusioner.data import pascal5i, coco20i, folder, pictograms, mosaic  # noqa: F401
from fusioner.data import ov  # noqa: F401  (ade847, pc459, ade150, pc59, voc20, voc21, ...)
# isort: on


def check_dataset(config: Config) -> None:
    """Refuse a ``dataset`` no module registered, or a ``fold`` it does not have, before anything loads.

    Checked here, where splits are built, not in config.py: the registry is full only once the
    dataset modules are imported, and they import the config. :func:`build_split` checks first, and
    commands that write before building a split (``train``, a sweep's plan) call it themselves.
    """
    if config.dataset not in BUILDERS:
        raise ConfigError(f"config key 'dataset': {config.dataset!r} is not one of {', '.join(BUILDERS)}")
    folds = FOLDS[config.dataset]
    # Datasets without folds ignore the key (sweeps use it as a plain axis there).
    if folds and config.fold >= folds:
        raise ConfigError(
            f"config key 'fold': {config.fold} is out of range for dataset {config.dataset!r}, "
            f"which has folds 0-{folds - 1}"
        )


def build_split(config: Config) -> Split:
    """The train / val (/ test) datasets and seen / unseen class names ``config`` asks for."""
    check_dataset(config)
    split = get_builder(config.dataset)(config)
    if split.name == "this dataset":
        split.name = config.dataset
    return split


__all__ = [
    "BUILDERS",
    "COCO_CLASSES",
    "IGNORE",
    "VOC_CLASSES",
    "ListDataset",
    "Sample",
    "SegDataset",
    "Split",
    "build_split",
    "check_dataset",
    "get_builder",
    "register_dataset",
]
