"""Sweep file -> runs: the expansion of a sweep file into named, validated run configs.

A sweep file is a config file (flat keys, see :mod:`fusioner.config`) in which some values are
lists. The expansion rule:

* A key whose value is a list is an *axis*; the sweep runs the product of all axes, in the order
  the keys appear in the file (the first axis varies slowest). ``folds`` is the sweep spelling of
  the axis over the config key ``fold``.
* ``unseen_classes`` is list-valued itself, so for it only a list of lists is an axis
  (``unseen_classes: [[cow], [sheep, horse]]`` is two runs); a plain list is one value.
* An axis value may be a mapping of config keys that vary together, e.g. a backbone and its
  weights: ``vision: [efficientnet_lite0, {vision: timm:vit_tiny_patch16_224, vision_weights:
  random}]``. The mapping must set the axis's own key and may give a ``name`` that labels the value
  in run names and tables. Keys a mapping does not set keep the sweep's base value; two axes
  setting the same key is an error.
* ``out_dir`` is the sweep directory. Each run lives in ``out_dir/<run name>``, named
  ``{vision}-{text}-{dataset}-f{fold}`` plus ``-{key}_{value}`` for every other axis, with
  anything but ``[A-Za-z0-9_.+-]`` replaced by ``_``. All runs share ``cache_dir`` (default
  ``out_dir/cache``), so frozen features are computed once per vision backbone and dataset and
  reused by every text model and fold.

``sweep.json`` in the sweep directory records the expansion (every run's name and labels); it is
written by every invocation and is what a report reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusioner.adapters.registry import check
from fusioner.config import Config, canonical_key, load_config, read_yaml_mapping
from fusioner.data import check_dataset
from fusioner.errors import ConfigError, FusionerError
from fusioner.io import atomic_write_json, read_json
from fusioner.run import RunDir

PLAN = "sweep.json"  # the expanded runs (names and labels), written by every invocation
# Sweep-file spellings of config keys.
ALIASES = {"folds": "fold"}
# The run name's fixed parts, in order; every other axis is appended after them.
NAME_KEYS = ("vision", "text", "dataset", "fold")
LIST_KEYS = frozenset(k for k, t in typing.get_type_hints(Config).items() if typing.get_origin(t) is list)


@dataclass(frozen=True)
class Axis:
    key: str  # the config key the axis is named after
    settings: tuple[dict[str, Any], ...]  # per value: the config keys it sets
    labels: tuple[str, ...]  # per value: its label in run names and tables


@dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # vision, text, dataset, fold and every other axis -> label
    config: Config

    @property
    def dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.config.out_dir)


@dataclass(frozen=True)
class Sweep:
    dir: Path
    runs: list[Run]
    source: str  # the sweep file, for messages and sweep.json
    overrides: tuple[str, ...] = ()

    def shard(self, index: int, count: int) -> list[Run]:
        """Every ``count``-th run starting at ``index``: the shards of one sweep partition its runs."""
        if not 0 <= index < count:
            raise ConfigError(f"--shard {index}/{count}: expected i/n with 0 <= i < n")
        return self.runs[index::count]


def sanitize(label: str) -> str:
    """A label as a path component: ``timm:vit_tiny`` -> ``timm_vit_tiny``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "_"


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or "none"
    return str(value)


def _axis(key: str, raw: Any, source: str) -> Axis | None:
    """The axis ``raw`` spells for config key ``key``, or None when it is a single value."""
    if not isinstance(raw, list):
        return None
    if key in LIST_KEYS:
        nested = [isinstance(v, (list, dict)) for v in raw]
        if not any(nested):
            return None  # a plain list is the key's one value
        if not all(nested):
            raise ConfigError(
                f"{source}: key {key!r} mixes names and lists; to sweep it give a list of lists, "
                f"e.g. [[cow], [sheep, horse]]"
            )
    if not raw:
        raise ConfigError(f"{source}: key {key!r} is an empty list: an axis needs at least one value")
    settings, labels = [], []
    for value in raw:
        if isinstance(value, dict):
            value = dict(value)
            name = value.pop("name", None)
            setting = {canonical_key(str(k), source): v for k, v in value.items()}
            if key not in setting:
                raise ConfigError(
                    f"{source}: a value of axis {key!r} is a mapping without the key {key!r}: {value}"
                )
            labels.append(str(name) if name is not None else _label(setting[key]))
        else:
            setting = {key: value}
            labels.append(_label(value))
        settings.append(setting)
    if duplicates := sorted(label for label, n in Counter(map(sanitize, labels)).items() if n > 1):
        raise ConfigError(
            f"{source}: axis {key!r} has several values labelled {', '.join(duplicates)}; "
            f"give the mappings distinct 'name's"
        )
    return Axis(key, tuple(settings), tuple(labels))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value")
    if value.lstrip().startswith(("[", "{")):  # a list (an axis) or a mapping, written as YAML
        try:
            return key.strip(), yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not valid YAML: {e}") from None
    return key.strip(), value  # scalars stay strings: the config coerces them to the key's type


def _key(raw: Any, source: str) -> str:
    """The config key a sweep-file key names (``folds`` -> ``fold``, ``data.path`` -> ``data_path``)."""
    return ALIASES.get(str(raw)) or canonical_key(str(raw), source)


def expand(spec: dict[str, Any], sweep_dir: str | Path, *, source: str = "sweep") -> list[Run]:
    """Every run of ``spec`` (a sweep file's mapping, ``out_dir`` removed), in expansion order."""
    sweep_dir = Path(sweep_dir)
    base: dict[str, Any] = {}
    axes: list[Axis] = []
    for raw_key, raw in spec.items():
        key = _key(raw_key, source)
        if key == "out_dir":
            raise ConfigError(f"{source}: 'out_dir' is the sweep directory, not a value to expand")
        if key in base or any(a.key == key for a in axes):
            raise ConfigError(f"{source}: key {key!r} is given twice (as {raw_key!r} and another spelling)")
        axis = _axis(key, raw, source)
        if axis is None:
            base[key] = raw
        else:
            axes.append(axis)
    owners: dict[str, str] = {}
    for axis in axes:
        for key in {k for s in axis.settings for k in s}:
            if key in owners and owners[key] != axis.key:
                raise ConfigError(
                    f"{source}: key {key!r} is set by both the {owners[key]!r} and {axis.key!r} axes"
                )
            owners[key] = axis.key
    base.setdefault("cache_dir", str(sweep_dir / "cache"))

    runs: list[Run] = []
    for choice in itertools.product(*(range(len(a.settings)) for a in axes)):
        values = {**base, "out_dir": str(sweep_dir)}
        chosen: dict[str, str] = {}
        for axis, i in zip(axes, choice, strict=True):
            values.update(axis.settings[i])
            chosen[axis.key] = axis.labels[i]
        try:
            config = load_config(None, **values)
            check_dataset(config)  # the config leaves dataset names to the data package
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in chosen.items())
            raise ConfigError(f"{source}: the run with {where or 'the base values'}: {e}") from None
        labels = {k: chosen.get(k, _label(getattr(config, k))) for k in NAME_KEYS}
        labels["fold"] = str(config.fold)
        extra = {k: v for k, v in chosen.items() if k not in NAME_KEYS}
        parts = [sanitize(labels[k]) for k in ("vision", "text", "dataset")] + [f"f{config.fold}"]
        name = "-".join(parts + [f"{sanitize(k)}_{sanitize(v)}" for k, v in extra.items()])
        config = dataclasses.replace(config, out_dir=str(sweep_dir / name))
        runs.append(Run(name, {**labels, **extra}, config))
    names = Counter(r.name for r in runs)
    if clashes := sorted(n for n, c in names.items() if c > 1):
        raise ConfigError(
            f"{source}: several runs are named {clashes[0]}; give the axis values distinct 'name's"
        )
    return runs


def load_sweep(path: str | Path, overrides: Sequence[str] = (), *, out: str | Path | None = None) -> Sweep:
    """Read a sweep file, apply ``key=value`` overrides (``key=[a, b]`` sets an axis), expand, validate.

    Every run's config and every backbone name are checked here, before anything is trained.
    """
    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file")
    for item in overrides:
        key, value = _parse_override(item)
        canonical = _key(key, "command line")
        # Replace the file's entry in place, so an overridden axis keeps its position in the product.
        existing = [k for k in spec if _key(k, str(path)) == canonical]
        spec[existing[0] if existing else key] = value
    out_keys = [k for k in spec if _key(k, str(path)) == "out_dir"]
    sweep_dir = Path(out or (spec[out_keys[0]] if out_keys else Path("runs") / "sweeps" / path.stem))
    for key in out_keys:
        del spec[key]
    runs = expand(spec, sweep_dir, source=str(path))
    for run in runs:
        for kind in ("vision", "text"):
            check(kind, getattr(run.config, kind), f"{path}: run {run.name}")
    return Sweep(sweep_dir, runs, str(path), tuple(overrides))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; None -> ``(0, 1)``, the whole sweep."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(match[1]), int(match[2])


def write_plan(sweep: Sweep) -> Path:
    plan = {
        "source": sweep.source,
        "overrides": list(sweep.overrides),
        "runs": [{"name": r.name, "labels": r.labels} for r in sweep.runs],
    }
    return atomic_write_json(sweep.dir / PLAN, plan)


def read_plan(sweep_dir: str | Path) -> dict[str, Any]:
    """``sweep.json`` of ``sweep_dir``: ``{"source", "overrides", "runs": [{"name", "labels"}, ...]}``."""
    path = Path(sweep_dir) / PLAN
    if not path.is_file():
        raise FusionerError(f"{sweep_dir} is not a sweep directory: it has no {PLAN}")
    return read_json(path, "sweep plan")
