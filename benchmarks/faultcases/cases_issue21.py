"""Issue 21, BAD items 3-8, 12, 13: commands that wrote over what they did not write, and runs that
could not be rebuilt. Each row checks the bytes of what must survive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from faultcases.cases_train import fss_tree
from faultcases.common import Base, Row, case, mentions, message, run, snapshot


def _evaluated(base: Base, to: Path) -> Path:
    """A copy of the base run, evaluated under its own config (it holds its own metrics.json)."""
    r = base.copy_run(to)
    ran = run(["fusioner", "eval", "--model", str(r)], to.parent)
    if ran.rc != 0:
        raise RuntimeError(f"the run's own evaluation failed: {message(ran)}")
    return r


@case("21.3", "eval --out naming another model's config.json")
def eval_out_foreign(base: Base, d: Path) -> Row:
    other = base.copy_run(d / "other")
    target = other / "model" / "config.json"
    before = target.read_bytes()
    ran = run(["fusioner", "eval", "--model", str(base.run), "--out", str(target)], d)
    msg = message(ran)
    return Row(
        "21.3",
        "",
        "`fusioner eval --model RUN --out OTHER/model/config.json`",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(target), "did not write it"]),
        target.read_bytes() == before,
        "OTHER/model/config.json byte-identical (the other model still loads)",
    )


@case("21.4", "eval of a run on another setting (unseen_classes=cow,horse)")
def eval_other_setting(base: Base, d: Path) -> Row:
    r = _evaluated(base, d / "run")
    own = (r / "metrics.json").read_bytes()
    ran = run(["fusioner", "eval", "--model", str(r), "unseen_classes=cow,horse"], d)
    msg = message(ran, r"wrote \S+")
    written = sorted((r / "evals").glob("*.json")) if (r / "evals").is_dir() else []
    kept = (r / "metrics.json").read_bytes() == own
    return Row(
        "21.4",
        "",
        "`fusioner eval --model RUN` (its own config), then `... unseen_classes=cow,horse`",
        ran.rc,
        0,
        msg,
        mentions(msg, [str(r / "evals")]),
        kept and len(written) == 1,
        f"RUN/metrics.json byte-identical: {kept}; figures of the other setting in {len(written)} file(s) "
        "under RUN/evals/",
    )


@case("21.5", "mosaic4 generate --out equal to --fss-root, with --overwrite")
def mosaic_out_is_source(base: Base, d: Path) -> Row:
    fss = fss_tree(d / "fss")
    (fss / "notes.txt").write_text("my own notes")
    before = snapshot(fss)
    argv = ["mosaic4", "generate", "--fss-root", str(fss), "--out", str(fss), "--tile-size", "8"]
    ran = run([*argv, "--num", "4", "--overwrite"], d)
    msg = message(ran)
    return Row(
        "21.5",
        "",
        "`mosaic4 generate --fss-root FSS --out FSS --overwrite` (FSS also holds notes.txt)",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(fss), "--fss-root"]),
        snapshot(fss) == before,
        f"all {len(before)} files of FSS byte-identical",
    )


@case("21.6", "an empty out_dir= (an unset shell variable)")
def empty_out_dir(base: Base, d: Path) -> Row:
    config = base.write_config(d / "config.yaml")
    config.write_text("# my own commented config\n" + config.read_text())
    (d / "losses.jsonl").write_text('{"mine": true}\n')
    before = snapshot(d)
    ran = run(["fusioner", "train", "--config", "config.yaml", "out_dir="], d)
    msg = message(ran)
    return Row(
        "21.6",
        "",
        "`fusioner train --config config.yaml out_dir=` in the user's folder (config.yaml, losses.jsonl)",
        ran.rc,
        2,
        msg,
        mentions(msg, ["out_dir", "empty"]),
        snapshot(d) == before,
        "the current folder byte-identical (no run.lock, config.yaml comments kept)",
    )


@case("21.6", "out_dir naming a folder that is not a run")
def non_run_out_dir(base: Base, d: Path) -> Row:
    mine = d / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my notes\n")
    (mine / "losses.jsonl").write_text("mine\n")
    before = snapshot(mine)
    config = base.write_config(d / "c.yaml", out_dir=str(mine))
    ran = run(["fusioner", "train", "--config", str(config)], d)
    msg = message(ran)
    return Row(
        "21.6",
        "",
        "`fusioner train out_dir=MINE`, MINE holding the user's config.yaml and losses.jsonl",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(mine), "not a run directory"]),
        snapshot(mine) == before,
        "MINE byte-identical, nothing added",
    )


@case("21.7", "quickstart --out a folder holding the user's data/images/train_3.png")
def quickstart_foreign(base: Base, d: Path) -> Row:
    out = d / "work"
    (out / "data" / "images").mkdir(parents=True)
    (out / "data" / "images" / "train_3.png").write_bytes(b"the user's own picture")
    before = snapshot(out)
    ran = run(["fusioner", "quickstart", "--fast", "--out", str(out)], d)
    msg = message(ran)
    return Row(
        "21.7",
        "",
        "`fusioner quickstart --fast --out DIR`, DIR/data/images/train_3.png the user's",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(out), "did not write it"]),
        snapshot(out) == before,
        "DIR byte-identical",
    )


@case("21.8", "retraining a finished, evaluated run whose checkpoints/ was deleted")
def stale_metrics(base: Base, d: Path) -> Row:
    r = _evaluated(base, d / "run")
    shutil.rmtree(r / "checkpoints")
    before = snapshot(r)
    config = base.write_config(d / "c.yaml", out_dir=str(r), lr=0.01)
    ran = run(["fusioner", "train", "--config", str(config)], d)
    msg = message(ran)
    state = run(["python", "-c", f"from fusioner.run import RunDir; print(RunDir({str(r)!r}).state)"], d)
    return Row(
        "21.8",
        "",
        "`fusioner eval`, `rm -r RUN/checkpoints`, `fusioner train` into RUN with lr=0.01",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(r), "earlier training's results", "metrics.json"]),
        snapshot(r) == before,
        f"RUN byte-identical; no new training read as done under the old figures (state {state.out.strip()})",
    )


@case("21.12", "a random-weight run evaluated twice")
def random_weights_twice(base: Base, d: Path) -> Row:
    config = base.write_config(
        d / "c.yaml", out_dir=str(d / "run"), cache_dir=str(d / "cache"), vision_weights="random", max_steps=2
    )
    trained = run(["fusioner", "train", "--config", str(config)], d)
    if trained.rc != 0:
        raise RuntimeError(f"the random-weight run did not train: {message(trained)}")
    figures, msg, rc = [], "", 0
    for _ in range(2):
        ran = run(["fusioner", "eval", "--model", str(d / "run")], d)
        rc, msg = max(rc, ran.rc), message(ran, r"1-way mIoU \S+\s+FB-IoU \S+")
        metrics = d / "run" / "metrics.json"
        figures.append(json.loads(metrics.read_text())["one_way"] if metrics.is_file() else None)
    same = figures[0] is not None and figures[0] == figures[1]
    return Row(
        "21.12",
        "",
        "`fusioner train vision_weights=random`, then `fusioner eval --model RUN` twice",
        rc,
        0,
        msg,
        mentions(msg, ["1-way mIoU"]),
        same,
        "the two evaluations' 1-way figures equal"
        + ("" if same or None in figures else f" (FB-IoU {figures[0]['fbiou']} vs {figures[1]['fbiou']})"),
    )


@case("21.13", "a Space re-exported into the same folder for a model without metrics")
def space_reexport(base: Base, d: Path) -> Row:
    first = _evaluated(base, d / "a")
    second = base.copy_run(d / "b")
    space = d / "space"
    runs = [
        run(["fusioner", "demo", "--export-space", str(space), "--model", str(m)], d) for m in (first, second)
    ]
    stale = space / "model" / "metrics.json"
    ran = runs[-1]
    msg = message(ran, r"\S+model/config\.json")
    return Row(
        "21.13",
        "",
        "`fusioner demo --export-space SPACE --model A` (evaluated), then the same for B (not evaluated)",
        max(r.rc for r in runs),
        0,
        msg,
        mentions(msg, ["config.json"]),
        not stale.exists() and (space / "model" / "config.json").is_file(),
        f"SPACE/model/metrics.json (A's calibration) {'still there' if stale.exists() else 'gone'}",
    )
