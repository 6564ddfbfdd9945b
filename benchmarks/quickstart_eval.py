"""CPU time of the quickstart's evaluation: a quickstart run's two models on its validation scenes.

    OMP_NUM_THREADS=1 python benchmarks/quickstart_eval.py --out runs/quickstart [--images N]

Times ``evaluate()`` exactly as ``fusioner quickstart`` calls it (fixed mode, cached tokens, every
seen and unseen name), once per model (``fusioner`` and the shuffled-names ``baseline``), with the
process's CPU time as the clock: one thread, so other work on the machine does not inflate it.
Prints the seconds and the figures; it touches nothing in ``--out``. It uses only public entry
points, so the same file times an older checkout (``PYTHONPATH=<that checkout> python ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml

from fusioner.config import Config, load_config
from fusioner.data.pictograms import PictogramScenes
from fusioner.engine.cache import prepare_cache
from fusioner.engine.evaluate import EvalSettings, evaluate
from fusioner.model import FusionerModel


class _First:
    """The first ``n`` samples of a dataset, with its attributes."""

    def __init__(self, dataset, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, key: str):
        return getattr(self.dataset, key)


def _config(path: Path, cache_dir: Path) -> Config:
    """The run's config, keeping only the keys this checkout knows (an older one knows fewer)."""
    known = {f.name for f in dataclasses.fields(Config)}
    saved = yaml.safe_load(path.read_text())
    kept = {k: v for k, v in saved.items() if k in known}
    return load_config(None, [], **{**kept, "cache_dir": str(cache_dir)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a finished quickstart's --out folder")
    parser.add_argument("--images", type=int, default=0, help="only the first N validation scenes (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set = PictogramScenes(args.out / "data", "train")
    val_set = PictogramScenes(args.out / "data", "val")
    data = _First(val_set, args.images) if args.images else val_set
    rows = {}
    for name, run in (("fusioner", "fusioner"), ("baseline", "shuffled")):
        config = _config(args.out / "runs" / run / "config.yaml", args.out / "cache")
        model = FusionerModel.from_pretrained(str(args.out / "runs" / run / "model")).eval()
        cache = prepare_cache(config, model.vision, val_set, torch.device("cpu"))
        settings = EvalSettings(config.image_size, "fixed", config.threshold)
        start = time.process_time()
        metrics = evaluate(
            model,
            data,
            seen=train_set.seen,
            unseen=train_set.unseen,
            settings=settings,
            cache=cache,
            progress=False,
        )
        seconds = time.process_time() - start
        rows[name] = {
            "cpu_s": round(seconds, 2),
            "cpu_s_per_image": round(seconds / len(data), 4),
            "one_way_unseen_miou": metrics["one_way"]["miou"],
            "gzss_seen_miou": metrics["gzss"]["miou_seen"],
            "gzss_unseen_miou": metrics["gzss"]["miou_unseen"],
            "gzss_hiou": metrics["gzss"]["hiou"],
        }
        print(name, json.dumps(rows[name]), flush=True)
    total = sum(r["cpu_s"] for r in rows.values())
    print(f"images {len(data)}; both evaluations: {total:.1f} CPU s")


if __name__ == "__main__":
    main()
