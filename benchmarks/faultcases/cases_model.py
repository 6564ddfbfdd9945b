"""Issue 13, WEAK cases: damaged checkpoints and model files, a corrupt index, bad or mistyped input."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from faultcases.common import (
    Base,
    Row,
    case,
    index_of,
    mentions,
    message,
    run,
    snapshot,
    voc_image,
)


@case("WEAK", "damaged latest checkpoint (truncated model.safetensors)")
def damaged_checkpoint(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    latest = r / "checkpoints" / "step-00000004"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    damaged = weights.read_bytes()
    ran = run(["fusioner", "train", "--config", str(r / "config.yaml"), "--resume"], d)
    msg = message(ran)
    aside = r / "checkpoints" / "step-00000004.damaged" / "model.safetensors"
    fell_back = "resuming from step-00000002" in ran.err
    return Row(
        "WEAK",
        "",
        "truncate RUN/checkpoints/step-00000004/model.safetensors; `fusioner train ... --resume`",
        ran.rc,
        0,
        msg,
        mentions(msg, [str(latest), "damaged", "truncated"]) and fell_back,
        aside.is_file()
        and aside.read_bytes() == damaged
        and (latest / "model.safetensors").is_file()
        and (r / "model" / "model.safetensors").is_file(),
        "resumed from step-00000002 (second warning); the damaged one kept as step-00000004.damaged; "
        "step-00000004 and model/ written again",
    )


def _damaged_model(base: Base, d: Path, damage: Callable[[Path], None], did: str, needles: list[str]) -> Row:
    model = Path(shutil.copytree(base.run / "model", d / "model"))
    damage(model)
    before = snapshot(model)
    out = d / "out"
    ran = run(
        [
            "fusioner",
            "predict",
            str(voc_image("sample_0000")),
            "--model",
            str(model),
            "--classes",
            "cat",
            "--out",
            str(out),
        ],
        d,
    )
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        f"{did}; `fusioner predict x.jpg --model MODEL --classes cat --out OUT`",
        ran.rc,
        2,
        msg,
        mentions(msg, needles, absent=("Traceback",)),
        snapshot(model) == before and not out.exists(),
        "the model folder untouched (not deleted or rewritten); no --out folder created",
    )


@case("WEAK", "truncated model.safetensors")
def truncated_weights(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])

    return _damaged_model(
        base, d, damage, "cut 100 bytes off MODEL/model.safetensors", [str(d / "model" / "model.safetensors")]
    )


@case("WEAK", "cut-off config.json")
def cut_config_json(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[: len(text) // 2])

    return _damaged_model(
        base, d, damage, "cut MODEL/config.json in half", [str(d / "model" / "config.json")]
    )


@case("WEAK", "config.json head width not fitting the backbone")
def head_width(base: Base, d: Path) -> Row:
    def damage(model: Path) -> None:
        record = json.loads((model / "config.json").read_text())
        record["head"]["vision_dim"] = 999
        (model / "config.json").write_text(json.dumps(record))

    return _damaged_model(
        base,
        d,
        damage,
        'set "head.vision_dim": 999 in MODEL/config.json',
        [str(d / "model" / "config.json"), "vision_dim is 999", "wide"],
    )


@case("WEAK", "corrupt cache index.json")
def corrupt_index(base: Base, d: Path) -> Row:
    cache = Path(shutil.copytree(base.cache, d / "cache"))
    cache_dir, before = index_of(cache)
    index = cache_dir / "index.json"
    index.write_bytes(b'{"key": {"vision": "efficientnet_lite0"}, "shards": {')
    config = base.write_config(d / "c.yaml", cache_dir=str(cache), out_dir=str(d / "run"))
    ran = run(["fusioner", "cache", "--config", str(config)], d)
    msg = message(ran)
    try:
        after = json.loads(index.read_text())
        listed = sorted(after["shards"])
    except (ValueError, KeyError):
        after, listed = {"items": {}}, []
    on_disk = sorted(p.name for p in cache_dir.glob("shard-*.safetensors"))
    return Row(
        "WEAK",
        "",
        "cut CACHE/<key>/index.json mid-JSON; `fusioner cache --config c.yaml`",
        ran.rc,
        0,
        msg,
        mentions(msg, [str(index), "unreadable"]),
        set(after["items"]) == set(before["items"]) and listed == on_disk,
        f"index rebuilt: {len(after['items'])} of {len(before['items'])} items listed; "
        "shards on disk = listed",
    )


@case("WEAK", "a config file that is not UTF-8")
def not_utf8(base: Base, d: Path) -> Row:
    path = base.write_config(d / "c.yaml", out_dir=str(d / "run"))
    path.write_bytes(path.read_bytes() + "# notes: caf\xe9 au lait\n".encode("latin-1"))
    before = path.read_bytes()
    ran = run(["fusioner", "train", "--config", str(path)], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`fusioner train --config c.yaml` (saved as Latin-1: `caf\\xe9` in a comment)",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(path), "not UTF-8", "0xe9"]),
        path.read_bytes() == before and not (d / "run").exists(),
        "the file's bytes unchanged; out_dir never created",
    )


@case("WEAK", "a mistyped local model path")
def mistyped_model(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    typo = d / "rnu"
    ran = run(["fusioner", "eval", "--model", str(typo)], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`fusioner eval --model DIR/rnu` (meant DIR/run; DIR exists)",
        ran.rc,
        2,
        msg,
        mentions(msg, [str(typo), "does not exist"], absent=("Hub", "huggingface")),
        not typo.exists() and (r / "model").is_dir(),
        "nothing created; the real run untouched",
    )


@case("WEAK", "evaluation where no image holds an unseen name")
def eval_no_unseen(base: Base, d: Path) -> Row:
    r = base.copy_run(d / "run")
    out = d / "metrics.json"
    ran = run(["fusioner", "eval", "--model", str(r), "--out", str(out), "unseen_classes=horse"], d)
    msg = message(ran)
    written = out if out.is_file() else out / "metrics.json"
    miou = json.loads(written.read_text())["one_way"]["miou"] if written.is_file() else 0.0
    undefined = miou is None or (isinstance(miou, float) and math.isnan(miou))
    return Row(
        "WEAK",
        "",
        "`fusioner eval --model RUN --out metrics.json unseen_classes=horse` (no val image holds horse)",
        ran.rc,
        0,
        msg,
        mentions(msg, ["horse", "undefined"]),
        written.is_file() and undefined,
        f"metrics.json written, one_way.miou = {miou!r} (not 0.0)",
    )


@case("WEAK", "FusionerModel.predict with 0-255 inputs")
def predict_0_255(base: Base, d: Path) -> Row:
    snippet = (
        "import numpy as np, torch; from PIL import Image; from fusioner.model import FusionerModel\n"
        f"model = FusionerModel.from_pretrained({str(base.run / 'model')!r})\n"
        f"image = torch.from_numpy(np.asarray(Image.open({str(voc_image('sample_0000'))!r})))\n"
        "image = image.permute(2, 0, 1)\n"
        "labels = model.predict(image.float()[None], ['cat', 'dog'])  # forgot / 255\n"
        "print('labels', labels.unique().tolist())\n"
    )
    ran = run([sys.executable, "-c", snippet], d)
    msg = message(ran)
    return Row(
        "WEAK",
        "",
        "`python -c` FusionerModel.predict(uint8 image .float(), ['cat','dog']) (no / 255)",
        ran.rc,
        1,
        msg,
        mentions(msg, ["FusionerError", "0 to 255", "expected [0, 1]"]),
        "labels" not in ran.out,
        "no labels returned (exit 1 = the uncaught FusionerError of a Python snippet)",
    )
