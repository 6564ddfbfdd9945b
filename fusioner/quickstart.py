"""`fusioner quickstart`: the main job, offline, on a laptop CPU, in minutes.

It trains the fusion head between two real pretrained frozen models that pip installs
(EfficientNet-Lite0, ImageNet, and all-MiniLM-L6-v2, sentence BERT) on scenes of real OpenMoji
pictograms named by their CLDR names, then segments pictograms whose names it never saw. The same
model trained with the seen names' embeddings shuffled among themselves is the baseline: whatever
the real model scores above it comes from the language side, not from "find the salient object".

Time goes to three places: rendering scenes (cached), frozen features (computed once into the
feature cache, shared by the model and the baseline) and training the head on cached features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from fusioner.config import load_config, override_keys  # noqa: E402
from fusioner.data import Split  # noqa: E402
from fusioner.data.pictograms import PictogramScenes  # noqa: E402
from fusioner.engine.cache import prepare_cache  # noqa: E402
from fusioner.engine.evaluate import EvalSettings, evaluate  # noqa: E402
from fusioner.engine.train import train  # noqa: E402
from fusioner.errors import FusionerError  # noqa: E402
from fusioner.eval_output import write_metrics  # noqa: E402
from fusioner.io import atomic_save_png, atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from fusioner.model import FusionerModel  # noqa: E402
from fusioner.pictograms import generate_scenes  # noqa: E402
from fusioner.run import RunDir  # noqa: E402
from fusioner.visualize import overlay, to_uint8  # noqa: E402

# The default setting: measured to fit 6 minutes on an idle 2-core CPU (benchmarks/RESULTS.md, issue
# 24): 7 epochs, down from 8 (6 let one seed's baseline reach 0.103). What is left of a step is
# memory-bound element-wise work at the decoder's resolution, which neither a second thread nor a
# second process speeds up much there.
SCENES = {"full": (1500, 300), "fast": (48, 16)}
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"preset": "small", "dim": 128, "depth": 2, "heads": 4, "epochs": 7, "batch_size": 16},
    "fast": {"preset": "tiny", "epochs": 1, "batch_size": 8},
}
COMMON = {
    "vision": "efficientnet_lite0",
    "text": "minilm_l6",
    "templates": "name",
    "dataset": "pictograms",
    "image_size": 224,
    "num_negatives": 6,
    "dice_weight": 1.0,
    "lr": 5e-4,
    "warmup_steps": 50,
    "checkpoint_every": 100_000,
    "eval_batch_size": 32,
}
OWNER = ".fusioner-quickstart"  # written first: the folder is a quickstart's to rewrite
FIGURES = ("one_way_unseen_miou", "one_way_unseen_fbiou", "gzss_seen_miou", "gzss_unseen_miou", "gzss_hiou")


@dataclass
class Report:
    out: Path
    data: dict[str, Any]
    fusioner: dict[str, float]
    baseline: dict[str, float]
    timings_s: dict[str, float]
    config: dict[str, Any]
    seed: int
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "data": self.data,
            "fusioner": self.fusioner,
            "baseline": self.baseline,
            "baseline_unseen_miou": self.baseline["one_way_unseen_miou"],
            "timings_s": self.timings_s,
            "config": self.config,
            "files": self.files,
        }

    def summary(self) -> str:
        f, b = self.fusioner, self.baseline
        return "\n".join(
            [
                f"fusioner quickstart ({self.data['seen_names']} seen / {self.data['unseen_names']} "
                f"unseen names, {self.timings_s['total']:.0f} s)",
                f"  1-way mIoU on unseen names: {f['one_way_unseen_miou']:.3f}   "
                f"(shuffled-names baseline {b['one_way_unseen_miou']:.3f})",
                f"  FB-IoU: {f['one_way_unseen_fbiou']:.3f}   generalized: seen {f['gzss_seen_miou']:.3f} / "
                f"unseen {f['gzss_unseen_miou']:.3f} / hIoU {f['gzss_hiou']:.3f}",
                f"  report: {self.out / 'report.md'}",
            ]
        )


def _figures(metrics: dict) -> dict[str, float]:
    """The report's figures that ``metrics`` holds: GZSS only where seen names were scored too."""
    one = metrics["one_way"]
    figures = {"one_way_unseen_miou": one["miou"], "one_way_unseen_fbiou": one["fbiou"]}
    if "gzss" in metrics:
        gz = metrics["gzss"]
        figures |= {
            "gzss_seen_miou": gz["miou_seen"],
            "gzss_unseen_miou": gz["miou_unseen"],
            "gzss_hiou": gz["hiou"],
        }
    return figures


def _claim(out: Path) -> None:
    """Refuse a non-empty ``out`` that no quickstart wrote; mark it ours before writing anything.

    A quickstart rewrites data/, runs/, report.* and the plots in ``out``: a re-run may replace its
    own files, never a user's (their dataset under data/, their notes in report.md).
    """
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise FusionerError(f"--out {out} is a file; expected a folder")
    if entries and not (out / OWNER).is_file():
        raise FusionerError(
            f"--out {out} is not empty and fusioner quickstart did not write it (it holds {entries[0]}); "
            "choose a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / OWNER, "written by fusioner quickstart; a re-run may replace its files here\n")


def quickstart(out: Path, *, seed: int = 0, fast: bool = False, overrides: list[str] | None = None) -> Report:
    mode = "fast" if fast else "full"
    start = time.perf_counter()
    timings: dict[str, float] = {}
    _claim(out)

    num_train, num_val = SCENES[mode]
    data_dir = generate_scenes(out / "data", num_train=num_train, num_val=num_val, seed=seed)
    train_set, val_set = PictogramScenes(data_dir, "train"), PictogramScenes(data_dir, "val")
    split = Split(train=train_set, val=val_set, seen=train_set.seen, unseen=train_set.unseen)
    timings["data"] = time.perf_counter() - start

    overrides = overrides or []
    base = {
        **COMMON,
        **SETTINGS[mode],
        "data_path": str(data_dir),
        "seed": seed,
        "cache_dir": str(out / "cache"),
    }
    base = {k: v for k, v in base.items() if k not in override_keys(overrides)}  # the user's word wins
    config = load_config(None, overrides, **base, out_dir=str(out / "runs" / "fusioner"))
    baseline_config = load_config(
        None, overrides, **base, out_dir=str(out / "runs" / "shuffled"), shuffle_names=True
    )

    results = {}
    losses = {}
    for name, cfg in (("fusioner", config), ("baseline", baseline_config)):
        t0 = time.perf_counter()
        run = RunDir(cfg.out_dir)
        # Continue an interrupted (or finished) quickstart; a first run starts fresh, without the
        # "--resume: no checkpoint" warning the user never asked for.
        result = train(cfg, resume=run.latest_checkpoint() is not None or run.is_trained(), split=split)
        timings[f"train_{name}"] = time.perf_counter() - t0
        losses[name] = result.losses or RunDir(cfg.out_dir).read_losses()
        t0 = time.perf_counter()
        model = result.model.eval()
        cache = prepare_cache(cfg, model.vision, val_set, torch.device("cpu"))
        settings = EvalSettings(cfg.image_size, "fixed", cfg.threshold)
        # The baseline answers one question, whether the text matters: its 1-way figures. Scoring
        # it over all the names as well (GZSS) would cost as much as the model's whole evaluation.
        seen = split.seen if name == "fusioner" else []
        metrics = evaluate(model, val_set, seen=seen, unseen=split.unseen, settings=settings, cache=cache)
        write_metrics(RunDir(cfg.out_dir).metrics, metrics)  # with eval's mark: `fusioner eval` may redo it
        timings[f"eval_{name}"] = time.perf_counter() - t0
        results[name] = (_figures(metrics), model)
    timings["total"] = time.perf_counter() - start

    report = Report(
        out=out,
        data={
            "seen_names": len(split.seen),
            "unseen_names": len(split.unseen),
            "train_scenes": len(train_set),
            "val_scenes": len(val_set),
            "path": str(data_dir),
        },
        fusioner=results["fusioner"][0],
        baseline=results["baseline"][0],
        timings_s={k: round(v, 1) for k, v in timings.items()},
        config=config.to_dict(),
        seed=seed,
    )
    report.files = {
        "loss_curve": _plot_losses(losses, out / "loss_curve.png").name,
        "predictions": _prediction_grid(results["fusioner"][1], val_set, split, out / "predictions.png").name,
        "report_md": "report.md",
    }
    atomic_write_json(out / "report.json", report.to_json())
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def _plot_losses(losses: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, values in losses.items():
        label = "fusioner" if name == "fusioner" else "baseline (shuffled names)"
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (BCE + dice)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


@torch.no_grad()
def _prediction_grid(model: FusionerModel, dataset, split: Split, path: Path, rows: int = 6) -> Path:
    """Each row: the scene, its unseen-name ground truth, and the prediction for those names."""
    unseen = set(split.unseen)
    tiles = []
    for i in range(min(rows, len(dataset))):
        sample = dataset[i]
        names = [n for n in sample["names"] if n in unseen]
        gt = np.zeros(sample["mask"].shape, dtype=np.int64)
        for j, name in enumerate(names, start=1):
            gt[sample["mask"].numpy() == sample["names"].index(name) + 1] = j
        pred = model.predict(sample["image"], names).numpy()
        image = to_uint8(sample["image"])
        panels = [Image.fromarray(image), overlay(image, gt, names), overlay(image, pred, names)]
        tiles.append(panels)
    width = sum(p.width for p in tiles[0]) + 8
    heights = [max(p.height for p in row) for row in tiles]
    grid = Image.new("RGB", (width, sum(heights) + 20), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    titles = ("scene", "truth: its unseen names", "prediction: the unseen names present, asked")
    for j, title in enumerate(titles):
        draw.text((4 + j * tiles[0][0].width, 4), title, fill=(0, 0, 0))
    y = 20
    for row, h in zip(tiles, heights, strict=True):
        x = 0
        for panel in row:
            grid.paste(panel, (x, y))
            x += panel.width + 4
        y += h
    atomic_save_png(path, grid)
    return path


def _cell(figures: dict[str, float], key: str) -> str:
    return f"{figures[key]:.3f}" if key in figures else "not scored"


def _markdown(report: Report) -> str:
    f, b = report.fusioner, report.baseline
    rows = "\n".join(f"| {k} | {f[k]:.3f} | {_cell(b, k)} |" for k in FIGURES)
    t = report.timings_s
    return f"""# fusioner quickstart

Frozen `{report.config["vision"]}` (ImageNet) + frozen `{report.config["text"]}` (sentence BERT); only the
fusion head trained, on {report.data["train_scenes"]} pictogram scenes naming {report.data["seen_names"]}
seen classes (epochs: {report.config["epochs"]}, batch size: {report.config["batch_size"]}; the baseline
the same). Evaluated on {report.data["val_scenes"]} scenes that contain {report.data["unseen_names"]}
names never seen in training. Seed {report.seed}.

| figure | fusioner | baseline (shuffled names) |
|---|---|---|
{rows}

- **one_way_unseen_miou**: each unseen name present in a scene is queried alone; IoU per name summed over
  the test set, mean over names (HSNet convention). **FB-IoU**: mean of foreground and background IoU.
- **gzss_***: all seen + unseen names in one pass; mIoU on seen names, on unseen names, harmonic mean.
  Expect it near zero here: naming every pixel right among about 1,175 names is beyond a small head
  trained for minutes on a few scenes per name, while "where is *this* name" (1-way) already transfers.
- The baseline is the same model, data and budget with the seen names' embeddings shuffled among
  themselves: the gap is what the language side contributes. It is scored on the 1-way question
  only, the one it is there to answer.

Time (s): data {t["data"]}, training {t["train_fusioner"]} + {t["train_baseline"]} (baseline),
evaluation {t["eval_fusioner"]} + {t["eval_baseline"]}, total {t["total"]}.

![loss curve]({report.files["loss_curve"]})

Each row of the picture below: a validation scene, its unseen names' ground truth, and the prediction
when the model is asked exactly the unseen names that the scene holds (never seen in training).

![unseen-name predictions]({report.files["predictions"]})
"""
