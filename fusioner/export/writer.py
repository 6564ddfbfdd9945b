"""``fusioner export``: a trained model's graphs, vocabulary and manifest into a new folder.

Everything is written into a staging folder beside ``--out`` and moved into place with the
manifest last, so a folder holding ``export.json`` is a complete export; an existing ``--out`` is
replaced only when an earlier export wrote it (:func:`claim_folder`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusioner.adapters.hf_text import HFText
from fusioner.errors import FusionerError
from fusioner.export.format import (
    CONFIG_NAME,
    EMBEDDINGS,
    MANIFEST,
    NAMES,
    OWN_FILES,
    PREDICTOR,
    TEXT,
    TOKENIZER,
    WRITER,
)
from fusioner.export.graphs import PredictorGraph, TextGraph, export_graph
from fusioner.export.runtime import ort_session
from fusioner.model import FusionerModel
from fusioner.version import __version__

EXAMPLE_NAMES = ("dog", "potted plant", "a photo of a cat")  # 3 names, tokens of different lengths


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: tuple[str, ...]
    predictor_diff: float  # max |onnxruntime - PyTorch| logits on the example input, at export
    text_diff: float | None  # the same for the text graph's embeddings, when there is one


def claim_folder(out: Path) -> bool:
    """True when ``out`` holds an earlier export (to be replaced), False when it is absent or empty.

    Refuses (FusionerError) a file, or a folder holding anything an export did not write.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise FusionerError(f"--out {out} is a file; expected a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    manifest = out / MANIFEST
    mark = None
    if manifest.is_file():
        try:
            mark = json.loads(manifest.read_text()).get("written_by")
        except (OSError, ValueError, AttributeError):
            mark = None
    foreign = [e for e in entries if e not in OWN_FILES]
    if mark != WRITER or foreign:
        what = foreign[0] if foreign else entries[0]
        raise FusionerError(
            f"--out {out} is not empty and fusioner export did not create it (it holds {out / what}); "
            "choose a new or empty folder"
        )
    return True


def export_onnx(
    source: str | Path,
    out: str | Path,
    *,
    classes: Sequence[str] = (),
    text_graph: bool = True,
) -> ExportResult:
    """Export the model at ``source`` (run dir, model folder or Hub id) into ``out`` (see module doc).

    ``classes``: names whose embeddings go beside the graphs. ``text_graph=False`` skips ``text.onnx``
    (then only ``classes`` can be asked at run time, as with a text model that is not a Hugging Face
    transformer). ``out`` must be new, empty or an earlier export; FusionerError otherwise.
    """
    out = Path(out)
    replacing = claim_folder(out)  # before the model loads: a refusal costs nothing
    for package in ("onnx", "onnxscript", "onnxruntime"):  # torch's exporter needs the first two
        if importlib.util.find_spec(package) is None:
            raise FusionerError(f"exporting needs {package}: pip install 'fusioner[export]'")
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise FusionerError(
            f"--classes has duplicate names: {sorted({n for n in classes if classes.count(n) > 1})}"
        )
    model = FusionerModel.from_pretrained(source).float().eval()
    if getattr(model, "refiner", None) is not None:
        # A refiner (fusioner/methods) runs on the backbone's tokens outside the head: not in the graph.
        raise FusionerError(
            f"model {source} refines its logits (refine: {model.refiner.record().get('refine')}), which "
            "the ONNX graph cannot hold; export a model saved with refine: none"
        )
    text_graph = text_graph and isinstance(model.text, HFText)
    if not text_graph and not classes:
        why = f"text model {model.text.name!r} has no ONNX graph (only Hugging Face transformers do)"
        if isinstance(model.text, HFText):
            why = "--no-text-graph was given"
        raise FusionerError(f"{why}: give the names to export with --classes, or the export can name nothing")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with torch.no_grad():
            manifest, diffs = _write_export(model, stage, classes, text_graph)
        files = tuple(sorted(p.name for p in stage.iterdir()))
        manifest["files"] = [*files, MANIFEST]
        # Plain writes: the stage is this call's own folder, and moving it into place is the atomic step.
        _write_json(stage / MANIFEST, manifest)
        _move_into_place(stage, out, replacing)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(out, (*files, MANIFEST), *diffs)


def _write_export(
    model: FusionerModel, stage: Path, classes: list[str], text_graph: bool
) -> tuple[dict[str, Any], tuple[float, float | None]]:
    size, text_dim = model.image_size, model.text.embed_dim
    generator = torch.Generator().manual_seed(0)
    # Example sizes of 2 and 3: torch.export fixes any dimension whose example is 0 or 1.
    images = torch.rand(2, 3, size, size, generator=generator)
    text = model.text(list(EXAMPLE_NAMES)).float().cpu()
    batch, names = torch.export.Dim("batch", min=1), torch.export.Dim("names", min=1)
    graph = PredictorGraph(model).eval()
    path = stage / PREDICTOR
    export_graph(graph, (images, text), ["images", "text", "logits"], ({0: batch}, {0: names}), path)
    predictor_diff = _max_diff(path, {"images": images, "text": text}, graph(images, text))
    manifest: dict[str, Any] = {
        "written_by": WRITER,
        "fusioner_version": __version__,
        "torch_version": torch.__version__,
        "image_size": size,
        "threshold": model.threshold,
        "predictor": {
            "file": PREDICTOR,
            "inputs": {
                "images": f"b 3 {size} {size} float32 in [0, 1] (resized to image_size; b dynamic)",
                "text": f"k {text_dim} float32 unit-norm name embeddings (k dynamic)",
            },
            "outputs": {"logits": "b k h w float32 at the decoder's resolution (8x the token grid)"},
            "max_abs_diff_vs_torch": predictor_diff,
        },
        "text": None,
        "vocabulary": None,
    }
    text_diff = None
    if text_graph:
        manifest["text"], text_diff = _export_text(model.text, stage)
    if classes:
        embeddings = model.text(classes).float().cpu().numpy()  # k c
        _write_json(stage / NAMES, classes)
        np.save(stage / EMBEDDINGS, embeddings)
        manifest["vocabulary"] = {"names": NAMES, "embeddings": EMBEDDINGS, "count": len(classes)}
    manifest["text_adapter"] = {
        "name": model.text.name,
        "embed_dim": text_dim,
        "templates": list(model.text.templates),
    }
    _write_json(stage / CONFIG_NAME, model.record())  # the model's own record, for the reader
    return manifest, (predictor_diff, text_diff)


def _export_text(adapter: HFText, stage: Path) -> tuple[dict[str, Any], float]:
    """``text.onnx`` + ``tokenizer/`` of a Hugging Face text adapter; returns its manifest entry."""
    tokenizer, encoder = adapter.tokenizer, adapter.model
    prompts = [adapter.prefix + t for t in EXAMPLE_NAMES]
    example = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    keys = list(example.keys())
    tensors = tuple(example[k] for k in keys)
    limit = min(int(tokenizer.model_max_length), int(getattr(encoder.config, "max_position_embeddings", 512)))
    texts, tokens = torch.export.Dim("texts", min=1), torch.export.Dim("tokens", min=1, max=limit)
    graph = TextGraph(encoder, keys, adapter.pooling).float().eval()
    path = stage / TEXT
    # forward(*tensors) is one parameter: its dynamic shapes are one tuple.
    dims = (tuple({0: texts, 1: tokens} for _ in keys),)
    export_graph(graph, tensors, [*keys, "embeddings"], dims, path)
    diff = _max_diff(path, dict(zip(keys, tensors, strict=True)), graph(*tensors))
    tokenizer.save_pretrained(str(stage / TOKENIZER))
    entry = {
        "file": TEXT,
        "tokenizer": TOKENIZER,
        "inputs": {k: "t l int64 (the tokenizer's output; t, l dynamic)" for k in keys},
        "outputs": {"embeddings": f"t c float32: the last hidden states pooled ({adapter.pooling})"},
        "pooling": adapter.pooling,
        "prefix": adapter.prefix,  # put before every prompt (E5's "query: "), in Python
        "max_tokens": limit,
        "max_abs_diff_vs_torch": diff,
    }
    return entry, diff


def _max_diff(path: Path, inputs: dict[str, Tensor], expected: Tensor) -> float:
    """Max |onnxruntime - PyTorch| on the export's own example: a broken graph shows at export time."""
    session = ort_session(path, threads=1)  # a few images: more threads would only wait for cores
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.abs(got - expected.numpy()).max())


def _move_into_place(stage: Path, out: Path, replacing: bool) -> None:
    """Move the staged files into ``out``, the manifest last: a folder holding it is complete.

    An export killed half-way leaves only names an export writes, so the next one may replace them.
    """
    out.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in stage.iterdir()}
    if replacing:
        for stale in sorted(OWN_FILES - new):  # what the earlier export wrote and this one does not
            _remove(out / stale)
    for name in sorted(new - {MANIFEST}) + [MANIFEST]:
        if (stage / name).is_dir():
            _remove(out / name)
        os.replace(stage / name, out / name)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
