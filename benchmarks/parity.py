"""Parity with the reference code: the released Fusioner head, HSNet's 1-way and ZegCLIP's GZSS.

Runs the library's own public code on a reference fixture folder (the format of
``../shared/data/reference-parity``: ``head.safetensors`` + ``config.json``, ``metrics.npz`` +
``metrics.json``, numbers produced by the reference code) and compares:

- ``head``: ``fusioner.model.released.head_from_released`` on the fixture's weights, run on its
  inputs (one name at the target size, one name at the odd size, three names as three one-name
  passes); each entry is the max abs difference to the reference logits (tolerance 1e-4);
- ``one_way``: HSNet's 1-way mIoU / FB-IoU over the fixture's episodes, each episode once, with
  :class:`fusioner.engine.metrics.OneWayMeter`; ``one_way_missing_class``: the same without the
  episodes of the fixture's ``dropped_class`` (that class stays in HSNet's mean at IoU 0);
- ``gzss_zegclip_voc`` / ``gzss_background_as_class``: seen / unseen mIoU and hIoU of the
  fixture's label maps with :class:`fusioner.engine.metrics.GZSSMeter` under each protocol.

The metric entries are the computed figures; each must be within 1e-6 of the fixture's expected
one. Exit status: 0 when everything is within tolerance, 1 when something is not (each miss is
printed), 2 when the fixture cannot be read (one line naming the file or key). ``--out`` is written
atomically; an existing file is replaced only when it is an earlier output of this script.

    python benchmarks/parity.py --fixture ../shared/data/reference-parity --out parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusioner.engine.metrics import GZSSMeter, OneWayMeter
from fusioner.errors import DataError, FusionerError
from fusioner.io import atomic_write_json, read_json

# The tolerances, not the fixture's: a fixture must not be able to loosen the check.
LOGIT_TOL = 1e-4
METRIC_TOL = 1e-6
GZSS_SECTIONS = {  # output key -> (protocol, the fixture's metrics.json section)
    "gzss_zegclip_voc": ("zegclip_voc", "zegclip_voc_protocol"),
    "gzss_background_as_class": ("background_as_class", "background_as_class"),
}
OUTPUT_KEYS = ("head", "one_way", "one_way_missing_class", *GZSS_SECTIONS)


def _get(data: Any, path: str, source: Path) -> Any:
    """``data["a"]["b"]`` for ``path`` "a.b", or a one-line DataError naming the file and key."""
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"fixture file {source}: key {path!r} is missing")
        data = data[key]
    return data


class Arrays:
    """``metrics.npz``: numbered arrays (``pred_000`` ...) read by prefix, with file-named errors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as npz:  # numbers only, never pickled objects
                self.arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise DataError(f"fixture file {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read fixture file {path}: {e}") from None

    def numbered(self, prefix: str) -> list[np.ndarray]:
        """The arrays ``{prefix}{n}`` in the order of n; the numbers must run 0, 1, 2, ..."""
        found = {}
        for key in self.arrays:
            m = re.fullmatch(rf"{re.escape(prefix)}(\d+)", key)
            if m:
                found[int(m.group(1))] = self.arrays[key]
        if sorted(found) != list(range(len(found))):
            raise DataError(f"fixture file {self.path}: {prefix}N keys do not run 0..{len(found) - 1}")
        return [torch.from_numpy(found[i].astype(np.int64)) for i in range(len(found))]


def _pairs(arrays: Arrays, pred: str, target: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    preds, targets = arrays.numbered(pred), arrays.numbered(target)
    if not len(preds) == len(targets) == n:
        raise DataError(
            f"fixture file {arrays.path}: {len(preds)} {pred}N and {len(targets)} {target}N arrays, "
            f"metrics.json says {n}"
        )
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        if p.shape != t.shape:
            raise DataError(
                f"fixture file {arrays.path}: {pred}{i} is {tuple(p.shape)}, {target}{i} {tuple(t.shape)}"
            )
    return list(zip(preds, targets, strict=True))


def one_way_figures(spec: dict, arrays: Arrays, source: Path, drop: str | None = None) -> dict[str, float]:
    """HSNet's 1-way mIoU / FB-IoU: every episode once, over the fold's classes (``drop``'s left out)."""
    classes = _get(spec, "one_way.episode_classes", source)
    fold = _get(spec, "one_way.fold_classes", source)
    episodes = _pairs(arrays, "pred_", "target_", len(classes))
    meter = OneWayMeter(fold)
    for i, (name, (pred, target)) in enumerate(zip(classes, episodes, strict=True)):
        if name == drop:
            continue
        bad = set(torch.unique(target).tolist()) - {0, 1, 255}
        if bad or not set(torch.unique(pred).tolist()) <= {0, 1}:
            raise DataError(
                f"fixture file {arrays.path}: episode {i} is not a 0/1 mask (target 255 = ignore)"
            )
        meter.update(name, pred == 1, target == 1, target != 255)
    out = meter.compute()
    return {"miou": out["miou"], "fbiou": out["fbiou"]}


def gzss_figures(spec: dict, arrays: Arrays, source: Path) -> dict[str, dict[str, float]]:
    """Seen / unseen mIoU and hIoU of the label maps under each protocol of :data:`GZSS_SECTIONS`."""
    names = _get(spec, "gzss.classes", source)
    unseen = _get(spec, "gzss.unseen_classes", source)
    maps = _pairs(arrays, "gzss_pred_", "gzss_target_", len(arrays.numbered("gzss_target_")))
    meter = GZSSMeter(names, set(unseen), ignore_index=255)  # label i = names[i - 1], 0 = background
    for i, (pred, target) in enumerate(maps):
        try:
            meter.update(pred, target)
        except ValueError as e:  # a label outside 0..len(classes) (255 only in targets)
            raise DataError(f"fixture file {arrays.path}: gzss map {i}: {e}") from None
    out = {}
    for key, (protocol, _) in GZSS_SECTIONS.items():
        figures = meter.compute(protocol)
        out[key] = {k: figures[k] for k in ("miou_seen", "miou_unseen", "hiou")}
    return out


def head_differences(fixture: Path) -> dict[str, float]:
    """Max abs difference of the library's released head to the reference logits, per output."""
    from safetensors import SafetensorError

    from fusioner.model.released import head_differences as differences

    try:
        return differences(fixture)
    except FileNotFoundError as e:
        raise DataError(f"fixture file {e.filename} does not exist") from None
    except (SafetensorError, KeyError, ValueError) as e:
        raise DataError(f"cannot read the head fixture in {fixture}: {e}") from None


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def misses(results: dict, spec: dict, source: Path) -> list[str]:
    """Every figure outside tolerance, one line each (NaN matches only an expected null)."""
    expected = {
        "one_way": _get(spec, "one_way.expected", source),
        "one_way_missing_class": _get(spec, "one_way.missing_class_case.hsnet", source),
        **{key: _get(spec, f"gzss.{section}", source) for key, (_, section) in GZSS_SECTIONS.items()},
    }
    out = []
    for name, diff in results["head"].items():
        if diff is None or not diff <= LOGIT_TOL:
            out.append(f"head.{name}: max abs difference {diff} > {LOGIT_TOL}")
    for key, want in expected.items():
        for figure, got in results[key].items():
            ref = want.get(figure) if isinstance(want, dict) else None
            if ref is None or got is None:
                if ref is not None or got is not None:
                    out.append(f"{key}.{figure}: {got} (expected {ref})")
            elif not abs(got - ref) <= METRIC_TOL:
                diff = abs(got - ref)
                out.append(f"{key}.{figure}: {got:.8f}, expected {ref:.8f} (off by {diff:.1e})")
    return out


def _writable(path: Path) -> None:
    """Refuse to replace a file this script did not write (its output has exactly OUTPUT_KEYS)."""
    if not path.exists():
        return
    try:
        ours = set(json.loads(path.read_text())) == set(OUTPUT_KEYS)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        ours = False
    if not ours:
        raise FusionerError(
            f"--out {path} exists and is not an earlier output of parity.py; choose another path"
        )


def run(fixture: Path, out: Path) -> int:
    _writable(out)
    source = fixture / "metrics.json"
    spec = read_json(source, "fixture file")
    arrays = Arrays(fixture / "metrics.npz")
    dropped = _get(spec, "one_way.missing_class_case.dropped_class", source)
    results: dict[str, Any] = {}
    try:
        results["head"] = head_differences(fixture)
    except ImportError as e:  # the released head is not in this checkout: the check fails, loudly
        print(f"head: cannot build the released head ({e})", file=sys.stderr)
        results["head"] = {"logits": None, "logits_odd": None, "logits3": None}
    results["one_way"] = one_way_figures(spec, arrays, source)
    results["one_way_missing_class"] = one_way_figures(spec, arrays, source, drop=dropped)
    results.update(gzss_figures(spec, arrays, source))
    results = _nan_to_none(results)
    atomic_write_json(out, results)
    failed = misses(results, spec, source)
    print(json.dumps(results, indent=1))
    for line in failed:
        print(f"OUTSIDE TOLERANCE {line}")
    print(f"wrote {out}: {'all within tolerance' if not failed else f'{len(failed)} outside tolerance'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", type=Path, required=True, help="a reference-parity fixture folder")
    p.add_argument("--out", type=Path, required=True, help="where to write the figures (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the reference ran on one thread; this also keeps shared machines free
    try:
        return run(args.fixture, args.out)
    except FusionerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
