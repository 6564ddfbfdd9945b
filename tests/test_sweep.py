"""Sweeps: expansion rules, shards, the offline sweep end to end on the real VOC samples (with a crash,
a lost metrics file and re-runs), and the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fusioner.cli import main
from fusioner.config import save_config
from fusioner.engine import evaluate as evaluate_module
from fusioner.engine import train as train_module
from fusioner.errors import ConfigError, FusionerError, UnknownNameError
from fusioner.sweep import check_same_config, load_sweep, parse_shard, run_one, write_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sweeps"


def _write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


BASE = {"dataset": "folder", "data_path": "data/x", "preset": "tiny", "image_size": 64}


# -- expansion -------------------------------------------------------------------------------------
def test_lists_are_axes_and_mappings_vary_keys_together(tmp_path):
    spec = {
        "vision": ["efficientnet_lite0", {"vision": "timm:vit_tiny_patch16_224", "vision_weights": "random"}],
        "text": ["minilm_l6", "glove_50d"],
        "folds": [0, 2],
        "unseen_classes": [["cow"], ["sheep", "horse"]],
        "lr": 0.5,
        **BASE,
        "out_dir": str(tmp_path / "sw"),
    }
    sweep = load_sweep(_write(tmp_path, spec))
    assert sweep.dir == tmp_path / "sw"
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    first, last = sweep.runs[0], sweep.runs[-1]
    assert first.name == "efficientnet_lite0-minilm_l6-folder-f0-unseen_classes_cow"
    assert last.name == "timm_vit_tiny_patch16_224-glove_50d-folder-f2-unseen_classes_sheep+horse"
    assert last.labels == {
        "vision": "timm:vit_tiny_patch16_224", "text": "glove_50d", "dataset": "folder", "fold": "2",
        "unseen_classes": "sheep+horse",
    }  # fmt: skip
    assert (first.config.unseen_classes, last.config.unseen_classes) == (["cow"], ["sheep", "horse"])
    # The mapping's second key applies to its own runs only; scalars apply to every run.
    weights = {(r.config.vision, r.config.vision_weights) for r in sweep.runs}
    assert weights == {("efficientnet_lite0", None), ("timm:vit_tiny_patch16_224", "random")}
    assert {r.config.lr for r in sweep.runs} == {0.5}
    assert {r.config.cache_dir for r in sweep.runs} == {str(tmp_path / "sw" / "cache")}
    assert [r.config.out_dir for r in sweep.runs] == [str(tmp_path / "sw" / r.name) for r in sweep.runs]
    assert len({r.name for r in sweep.runs}) == len(sweep.runs)


def test_a_plain_list_of_names_is_one_value_and_overrides_reshape_axes(tmp_path):
    path = _write(tmp_path, {"vision": "efficientnet_lite0", "text": ["minilm_l6", "glove_50d"],
                             "unseen_classes": ["cow", "sheep"], **BASE})  # fmt: skip
    sweep = load_sweep(path, out=tmp_path / "o")
    assert [r.config.unseen_classes for r in sweep.runs] == [["cow", "sheep"]] * 2
    assert [r.labels["text"] for r in sweep.runs] == ["minilm_l6", "glove_50d"]

    overrides = ["text=glove_50d", "folds=[1, 3]", "unseen_classes=horse,cow", "lr=3e-4"]
    sweep = load_sweep(path, overrides, out=tmp_path)
    assert [(r.config.text, r.config.fold) for r in sweep.runs] == [("glove_50d", 1), ("glove_50d", 3)]
    assert {(tuple(r.config.unseen_classes), r.config.lr) for r in sweep.runs} == {(("horse", "cow"), 3e-4)}
    assert [r.name for r in sweep.runs] == [f"efficientnet_lite0-glove_50d-folder-f{f}" for f in (1, 3)]


def test_the_shipped_sweeps_expand(tmp_path):
    paper = load_sweep(CONFIGS / "paper.yaml")
    assert len(paper.runs) == 24
    pairs = {(r.config.vision, r.config.text, r.config.templates) for r in paper.runs}
    assert pairs == {(v, t, tpl) for v in ("dino_vitb16", "mocov3_vitb16", "clip_vitb16")
                     for t, tpl in (("bert_base", "photo"), ("clip_vitb16_text", "fusioner"))}  # fmt: skip
    assert sorted({r.config.fold for r in paper.runs}) == [0, 1, 2, 3]
    assert {r.config.dataset for r in paper.runs} == {"pascal5i"}
    offline = load_sweep(CONFIGS / "offline.yaml")
    assert [r.name for r in offline.runs] == [
        "efficientnet_lite0-minilm_l6-folder-f0", "efficientnet_lite0-glove_50d-folder-f0",
        "vit_tiny_random-minilm_l6-folder-f0", "vit_tiny_random-glove_50d-folder-f0",
    ]  # fmt: skip


@pytest.mark.parametrize("count", [1, 2, 3, 5, 24, 30])
def test_shards_partition_the_sweep(count):
    sweep = load_sweep(CONFIGS / "paper.yaml")
    shards = [sweep.shard(i, count) for i in range(count)]
    names = [r.name for shard in shards for r in shard]
    assert sorted(names) == sorted(r.name for r in sweep.runs)  # every run once, in exactly one shard
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ({"vision": ["efficientnet_lite0"], "lrr": 1.0}, ConfigError, "unknown config key 'lrr'.*'lr'"),
        ({"vision": [{"vision_weights": "random"}]}, ConfigError, "mapping without the key 'vision'"),
        ({"text": []}, ConfigError, "'text' is an empty list"),
        ({"vision": ["dino_vitb99"]}, UnknownNameError, "unknown vision backbone 'dino_vitb99'.*known:"),
        ({"vision": ["timm:not_a_model"]}, UnknownNameError, "unknown vision backbone 'timm:not_a_model'"),
        ({"text": ["minilm_l6", "bert_large"]}, UnknownNameError, "unknown text backbone 'bert_large'"),
        ({"vision": ["efficientnet_lite0", {"vision": "efficientnet_lite0", "vision_weights": "random"}]},
         ConfigError, "several values labelled efficientnet_lite0.*'name'"),
        ({"unseen_classes": [["cow"], "sheep"]}, ConfigError, "mixes names and lists"),
        ({"vision": [{"vision": "efficientnet_lite0", "image_size": 32}], "image_size": [64, 128]},
         ConfigError, "'image_size' is set by both"),
        ({"fold": 1, "folds": [0, 1]}, ConfigError, "'fold' is given twice"),
        ({"preset": ["tiny", "huge"]}, ConfigError, "preset=huge.*unknown preset 'huge'"),
    ],
)  # fmt: skip
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, spec, error, match):
    with pytest.raises(error, match=match):
        load_sweep(_write(tmp_path, {**BASE, **spec}), out=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "0/0"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_a_run_started_with_another_config_is_not_resumed(tmp_path):
    from accelerate import PartialState

    sweep = load_sweep(_write(tmp_path, {**BASE, "text": "glove_50d"}), out=tmp_path)
    run = sweep.runs[0]
    save_config(type(run.config)(**{**run.config.to_dict(), "lr": 1.0}), run.dir / "config.yaml")
    check_same_config(run)  # no progress yet (it failed before a checkpoint): free to start over
    (run.dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    outcome = run_one(run, PartialState())
    assert outcome.status == "failed"
    assert "started with another config (lr: 1.0 -> 0.0001)" in outcome.error
    assert "ConfigError" in (run.dir / "error.txt").read_text()


# -- the offline sweep, for real -------------------------------------------------------------------
def test_offline_sweep_runs_resumes_and_reports(voc_folder, tmp_path, monkeypatch, capsys):
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", "--config", str(CONFIGS / "offline.yaml"), "--out", str(sweep_dir),
            f"data_path={voc_folder}", "image_size=64", "max_steps=3", "checkpoint_every=2"]  # fmt: skip
    planned = [r.name for r in load_sweep(CONFIGS / "offline.yaml", args[5:], out=sweep_dir).runs]
    victim, lost = planned[2], planned[1]  # the ViT run crashes after its checkpoint at step 2

    trained, evaluated = [], []
    real_train, real_loss = train_module.train, train_module.mask_loss
    real_eval = evaluate_module.evaluate_model

    def crashing_train(config, *, resume=False, split=None):
        trained.append((Path(config.out_dir).name, resume))
        if Path(config.out_dir).name != victim or resume:
            return real_train(config, resume=resume, split=split)
        steps = []

        def loss_then_crash(*a, **k):
            steps.append(1)
            if len(steps) == 3:
                raise RuntimeError("simulated crash at step 3")
            return real_loss(*a, **k)

        monkeypatch.setattr(train_module, "mask_loss", loss_then_crash)
        try:
            return real_train(config, resume=resume, split=split)
        finally:
            monkeypatch.setattr(train_module, "mask_loss", real_loss)

    def counting_eval(source, *a, **k):
        evaluated.append(Path(source).name)
        return real_eval(source, *a, **k)

    monkeypatch.setattr(train_module, "train", crashing_train)
    monkeypatch.setattr(evaluate_module, "evaluate_model", counting_eval)

    # Pass 1, as two machines: each shard runs its half; the crash fails one run and nothing else.
    codes = [main([*args, "--shard", f"{i}/2"]) for i in range(2)]
    assert codes == [2, 0]  # the shard holding the crashed run says so
    assert "1 runs failed" in capsys.readouterr().err
    assert sorted(trained) == sorted((name, False) for name in planned)  # the shards made the whole sweep
    assert sorted(evaluated) == sorted(set(planned) - {victim})
    assert (sweep_dir / victim / "error.txt").read_text().strip().endswith("simulated crash at step 3")
    assert [p.name for p in (sweep_dir / victim / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (sweep_dir / victim / "model").exists()
    events = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    assert sorted((e["run"], e["status"]) for e in events) == sorted(
        (n, "failed" if n == victim else "done") for n in planned
    )
    status = json.loads((sweep_dir / "status.json").read_text())
    assert status["runs"] == {n: "failed" if n == victim else "done" for n in planned}
    # Frozen features were computed once per vision backbone, shared by both text models.
    assert len([p for p in (sweep_dir / "cache").iterdir() if p.is_dir()]) == 2

    # Pass 2: a kill between training and evaluation lost one metrics.json; only the missing work runs.
    (sweep_dir / lost / "metrics.json").unlink()
    trained.clear(), evaluated.clear()
    assert main(args) == 0
    assert trained == [(victim, True)]  # resumed from its checkpoint, not restarted
    assert sorted(evaluated) == sorted([lost, victim])
    assert json.loads((sweep_dir / victim / "train_state.json").read_text())["steps"] == 3
    losses = (sweep_dir / victim / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in losses] == [1, 2, 3]
    assert not (sweep_dir / victim / "error.txt").exists()

    # Pass 3: nothing left to do.
    trained.clear(), evaluated.clear()
    assert main(args) == 0
    assert trained == [] and evaluated == []
    assert "4 skipped" in capsys.readouterr().out

    assert main(["sweep-report", str(sweep_dir)]) == 0
    with open(sweep_dir / "results.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(planned)
    for name, row in rows.items():
        metrics = json.loads((sweep_dir / name / "metrics.json").read_text())
        assert row["state"] == "done"
        assert float(row["miou"]) == pytest.approx(metrics["one_way"]["miou"])
        assert float(row["gzss_hiou"]) == pytest.approx(metrics["gzss"]["hiou"], nan_ok=True)
    table = (sweep_dir / "results.md").read_text()
    assert "| vision \\ text | minilm_l6 | glove_50d |" in table
    assert table.count("| efficientnet_lite0 | **") == 1 and table.count("| vit_tiny_random | **") == 1
    with Image.open(sweep_dir / "heatmap.png") as image:
        assert image.format == "PNG" and min(image.size) > 100


# -- the report, on known numbers ------------------------------------------------------------------
def _fake_run(sweep_dir: Path, name: str, miou: float | None = None, fbiou: float = 0.5, error: str = ""):
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    if miou is not None:
        metrics = {"one_way": {"miou": miou, "fbiou": fbiou, "per_class": {}},
                   "gzss": {"miou_seen": 0.5, "miou_unseen": miou, "hiou": math.nan}}  # fmt: skip
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if error:
        (run_dir / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")


def test_report_means_folds_and_lists_failures(tmp_path):
    runs = []
    for vision in ("dino", "moco"):
        for fold in (0, 1):
            name = f"{vision}-bert-pascal5i-f{fold}"
            runs.append({"name": name, "labels": {"vision": vision, "text": "bert", "dataset": "pascal5i",
                                                  "fold": str(fold)}})  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps({"source": "x.yaml", "overrides": [], "runs": runs}))
    _fake_run(tmp_path, "dino-bert-pascal5i-f0", 0.40, fbiou=0.60)
    _fake_run(tmp_path, "dino-bert-pascal5i-f1", 0.50, fbiou=0.70)
    _fake_run(tmp_path, "moco-bert-pascal5i-f0", 0.30)
    _fake_run(tmp_path, "moco-bert-pascal5i-f1", error="RuntimeError: CUDA out of memory")

    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["results.csv", "results.md", "heatmap.png"]
    table = (tmp_path / "results.md").read_text()
    assert "| dino | **45.0** (f0 40.0 · f1 50.0); FB-IoU 65.0 |" in table
    assert "| moco | **30.0** (f0 30.0, 1/2 folds); FB-IoU 50.0 |" in table
    assert "`moco-bert-pascal5i-f1`: RuntimeError: CUDA out of memory" in table
    assert "4 runs: 3 done, 1 failed" in table
    with open(tmp_path / "results.csv") as f:
        states = {row["run"]: (row["state"], row["miou"], row["error"]) for row in csv.DictReader(f)}
    assert states["moco-bert-pascal5i-f1"] == ("failed", "", "RuntimeError: CUDA out of memory")
    assert states["dino-bert-pascal5i-f1"][:2] == ("done", "0.5")


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    with pytest.raises(FusionerError, match="not a sweep directory"):
        write_report(tmp_path)
    assert main(["sweep-report", str(tmp_path)]) == 2
