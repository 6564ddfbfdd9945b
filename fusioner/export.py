"""ONNX export of a trained model, and :class:`OnnxPredictor`, which runs the export with onnxruntime.

``fusioner export RUN --format onnx --out DIR`` writes into ``DIR``:

- ``predictor.onnx``: the frozen vision adapter (its mean/std included) and the trained head as one
  graph. Inputs ``images`` ``b 3 s s`` float32 in [0, 1], where ``s`` is the model's ``image_size``
  (fixed: the adapters and the head were only ever run at that size), and ``text`` ``k c``:
  unit-norm name embeddings. Output ``logits`` ``b k h w`` at the head's own resolution (the fusion
  head's decoder: 8x the token grid). ``b`` and ``k`` are dynamic. A model with a logit refiner
  (config key ``refine``) is refused: the refiner runs outside the head.
- ``text.onnx`` + ``tokenizer/`` when the text adapter is a Hugging Face transformer (BERT,
  MiniLM, E5, ``hf:``): tokens ``t l`` (the tokenizer's own inputs) -> the last hidden states
  pooled as the adapter pools them (mean over non-padding tokens, CLS or max) ``t c``. Tokenizing,
  the adapter's prefix, prompt templates and normalisation stay in Python (:class:`OnnxText` goes
  through :class:`~fusioner.adapters.base.TextAdapter`'s own code).
- ``names.json`` + ``embeddings.npy`` (``k c`` float32) with ``--classes``: that vocabulary's
  embeddings, for runtimes with no tokenizer and for text adapters with no graph (CLIP text,
  word vectors).
- ``config.json`` (the model's own record) and ``export.json`` (what is where, shapes, the
  parity measured at export, versions); ``export.json`` also marks the folder as this command's.

:class:`OnnxPredictor` resizes, tiles, chunks names and thresholds through fusioner/inference.py,
the functions the PyTorch model uses, so both paths differ only inside the graph.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

import fusioner
from fusioner.adapters.base import TextAdapter, VisionOutput
from fusioner.adapters.hf_text import POOLINGS, HFText
from fusioner.errors import FusionerError
from fusioner.inference import batch_logits, labels_of
from fusioner.io import read_json
from fusioner.model import FusionerModel
from fusioner.model.model import CONFIG_NAME, _check_pixels

MANIFEST = "export.json"
WRITER = "fusioner export"  # the manifest's mark: a folder without it is not this command's
PREDICTOR, TEXT, TOKENIZER = "predictor.onnx", "text.onnx", "tokenizer"
NAMES, EMBEDDINGS = "names.json", "embeddings.npy"
# Every name an export may write (ONNX keeps weights over 2 GB in a ``.data`` file beside the graph):
# an existing --out holding anything else is someone else's folder.
OWN_FILES = frozenset(
    {
        PREDICTOR,
        f"{PREDICTOR}.data",
        TEXT,
        f"{TEXT}.data",
        TOKENIZER,
        NAMES,
        EMBEDDINGS,
        CONFIG_NAME,
        MANIFEST,
    }
)
EXAMPLE_NAMES = ("dog", "potted plant", "a photo of a cat")  # 3 names, tokens of different lengths


# -- the graphs -------------------------------------------------------------------------------------
class PredictorGraph(nn.Module):
    """Vision adapter + head: images ``b 3 s s`` in [0, 1], text ``k c`` -> logits ``b k h w``."""

    def __init__(self, model: FusionerModel) -> None:
        super().__init__()
        self.vision = model.vision
        self.head = model.head

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        out = self.vision(images)
        # The decoder's resolution: inference.py resizes once, to each image's own size.
        return self.head(out.tokens, out.grid, text)


class TextGraph(nn.Module):
    """A Hugging Face encoder and its pooling: the tokenizer's tensors ``t l`` (in ``keys`` order)
    -> embeddings ``t c``, pooled as :class:`~fusioner.adapters.hf_text.HFText` pools them."""

    def __init__(self, encoder: nn.Module, keys: Sequence[str], pooling: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.keys = tuple(keys)
        self.pool = POOLINGS[pooling]

    def forward(self, *tensors: Tensor) -> Tensor:
        batch = dict(zip(self.keys, tensors, strict=True))
        hidden = self.encoder(**batch).last_hidden_state  # t l c
        return self.pool(hidden, batch["attention_mask"].unsqueeze(-1).to(hidden.dtype))  # mask t l 1


def _export_graph(
    module: nn.Module, args: tuple[Tensor, ...], names: Sequence[str], dims: tuple[Any, ...], path: Path
) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) of ``module`` to ``path``, fp32.

    ``dims``: torch.export's ``dynamic_shapes``, one entry per parameter of ``forward``.
    """
    ir_log = logging.getLogger("onnx_ir")
    level = ir_log.level
    # onnx_ir warns on every export that an empty attribute list was typed INTS (what it is).
    ir_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Inputs sharing a dynamic axis (the text graph's) get it named once; torch warns per input.
            warnings.filterwarnings("ignore", message=".*since it shares the same shape constraints")
            program = torch.onnx.export(
                module,
                args,
                input_names=list(names[: len(args)]),
                output_names=list(names[len(args) :]),
                dynamic_shapes=dims,
                dynamo=True,
                verbose=False,
            )
    finally:
        ir_log.setLevel(level)
    program.save(str(path))


# -- export -----------------------------------------------------------------------------------------
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
    _export_graph(graph, (images, text), ["images", "text", "logits"], ({0: batch}, {0: names}), path)
    predictor_diff = _max_diff(path, {"images": images, "text": text}, graph(images, text))
    manifest: dict[str, Any] = {
        "written_by": WRITER,
        "fusioner_version": fusioner.__version__,
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
    _export_graph(graph, tensors, [*keys, "embeddings"], dims, path)
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


# -- running an export ------------------------------------------------------------------------------
def ort_session(path: Path, *, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path``; ``threads``: intra-op threads (0 = one per core)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FusionerError("onnxruntime is not installed: pip install 'fusioner[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as e:  # a missing, truncated or foreign file: all end the same way for the user
        raise FusionerError(f"onnxruntime cannot load {path}: {e}") from None


class _GraphStages:
    """``predictor.onnx`` seen through the two calls inference.py makes on a model.

    inference.py calls ``model.vision(pixels)`` and then ``model.head(tokens, grid, text)``; the graph
    does both at once. So the vision stage hands the resized pixels through unchanged, as stride-1
    "tokens" ``b (s s) 3`` on an ``s x s`` grid, and the head stage runs the graph on them. Resizing,
    sliding windows, name chunks and the resize back are then inference.py's, as for PyTorch.
    """

    def __init__(self, session: Any) -> None:
        self.session = session

    def vision(self, pixels: Tensor) -> VisionOutput:
        h, w = pixels.shape[-2:]
        return VisionOutput(tokens=rearrange(pixels, "b c h w -> b (h w) c"), grid=(h, w))

    def head(self, tokens: Tensor, grid: tuple[int, int], text: Tensor) -> Tensor:
        pixels = rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
        if text.ndim == 3:  # "1 k c": one chunk of names, shared by the batch
            text = text[0]
        feed = {
            "images": pixels.float().contiguous().numpy(),
            "text": text.float().contiguous().numpy(),
        }
        return torch.from_numpy(self.session.run(["logits"], feed)[0])  # b k h w


class OnnxText(TextAdapter):
    """``text.onnx`` + its tokenizer behind the text-adapter contract (templates, normalising, cache)."""

    def __init__(self, session: Any, tokenizer: Any, keys: Sequence[str], *, name: str, embed_dim: int,
                 templates: Sequence[str], max_tokens: int, prefix: str = "") -> None:  # fmt: skip
        super().__init__(name, embed_dim, templates)
        self.session, self.tokenizer, self.keys, self.max_tokens = session, tokenizer, tuple(keys), max_tokens
        self.prefix = prefix

    def encode(self, texts: list[str]) -> Tensor:
        chunks = []
        for i in range(0, len(texts), 256):  # HFText's batch size
            batch = self.tokenizer(
                [self.prefix + t for t in texts[i : i + 256]],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="np",
            )
            feed = {k: np.asarray(batch[k], dtype=np.int64) for k in self.keys}
            chunks.append(torch.from_numpy(self.session.run(["embeddings"], feed)[0]))
        return torch.cat(chunks)  # t c


class OnnxPredictor:
    """An export folder run with onnxruntime, with :class:`FusionerModel`'s ``logits`` / ``predict``.

    Names are embedded by ``text.onnx`` when the export has it; names in the exported vocabulary
    (``names.json``) use its stored embeddings, and without a text graph only those can be asked.
    ``threads``: onnxruntime's intra-op threads (0 = one per core).
    """

    def __init__(
        self, directory: str | Path, *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FusionerError(
                f"{self.directory} is not a fusioner ONNX export (no {MANIFEST}); make one with "
                "fusioner export RUN --format onnx --out DIR"
            )
        manifest = read_json(manifest_path, "export manifest")
        if not isinstance(manifest, dict) or manifest.get("written_by") != WRITER:
            raise FusionerError(f"{manifest_path} was not written by fusioner export")
        self.manifest = manifest
        try:
            self.image_size = int(manifest["image_size"])
            self.threshold = float(manifest["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise FusionerError(
                f"{manifest_path}: no valid image_size / threshold ({e}); export again"
            ) from None
        self.stages = _GraphStages(
            ort_session(self.directory / PREDICTOR, threads=threads, providers=providers)
        )
        self.vocabulary: dict[str, Tensor] = {}
        if manifest.get("vocabulary"):
            names = read_json(self.directory / NAMES, "exported names")
            embeddings = torch.from_numpy(np.load(self.directory / EMBEDDINGS))
            if not isinstance(names, list) or embeddings.shape[0] != len(names):
                raise FusionerError(
                    f"{self.directory / NAMES} and {self.directory / EMBEDDINGS} disagree: "
                    f"{len(names)} names, {embeddings.shape[0]} embeddings"
                )
            self.vocabulary = dict(zip(names, embeddings, strict=True))
        self.text: OnnxText | None = None
        if manifest.get("text"):
            self.text = self._load_text(manifest, threads, providers)

    def _load_text(self, manifest: dict[str, Any], threads: int, providers: Sequence[str]) -> OnnxText:
        from transformers import AutoTokenizer

        entry, adapter = manifest["text"], manifest["text_adapter"]
        tokenizer = AutoTokenizer.from_pretrained(
            str(self.directory / entry["tokenizer"]), local_files_only=True
        )
        return OnnxText(
            ort_session(self.directory / entry["file"], threads=threads, providers=providers),
            tokenizer,
            list(entry["inputs"]),
            name=f"onnx:{adapter['name']}",
            embed_dim=int(adapter["embed_dim"]),
            templates=adapter["templates"],
            max_tokens=int(entry["max_tokens"]),
            prefix=str(entry.get("prefix", "")),
        )

    def embed(self, names: Sequence[str]) -> Tensor:
        """``k`` names -> ``k c`` unit-norm embeddings (stored vocabulary first, else the text graph)."""
        names = list(names)
        if self.vocabulary and all(n in self.vocabulary for n in names):
            return torch.stack([self.vocabulary[n] for n in names]).float()
        if self.text is None:
            unknown = [n for n in names if n not in self.vocabulary]
            known = ", ".join(list(self.vocabulary)[:10]) + (", ..." if len(self.vocabulary) > 10 else "")
            raise FusionerError(
                f"{self.directory} has no text graph and no embeddings for {unknown}: it was exported "
                f"with --classes {known or '(none)'}; export again with these names in --classes"
            )
        return self.text(names).float()

    def logits(
        self, images: Tensor | Sequence[Tensor], names: Sequence[str], *, mode: str = "fixed"
    ) -> Tensor | list[Tensor]:
        """As :meth:`FusionerModel.logits`: ``3 h w`` -> ``k h w``, ``b 3 h w`` -> ``b k h w``, list -> list.

        The graph's input is the model's ``image_size``: ``fixed`` resizes each image to it, ``sliding``
        tiles windows of it (fusioner/inference.py), as the PyTorch model does.
        """
        _check_pixels(images)
        text = self.embed(names)
        single = isinstance(images, Tensor) and images.ndim == 3
        if isinstance(images, Tensor) and images.ndim not in (3, 4):
            raise FusionerError(f"images must be 'b 3 h w' or '3 h w', got shape {tuple(images.shape)}")
        batch = [images] if single else list(images)
        out = batch_logits(
            self.stages, [im.float().cpu() for im in batch], text, size=self.image_size, mode=mode
        )
        if single:
            return out[0]
        return torch.stack(out) if isinstance(images, Tensor) else out

    def predict(
        self, images: Tensor | Sequence[Tensor], names: Sequence[str], *, mode: str = "fixed"
    ) -> Tensor | list[Tensor]:
        """Labels ``h w`` per image: 0 = background, i = names[i - 1] (as :meth:`FusionerModel.predict`)."""
        return labels_of(self.logits(images, names, mode=mode), self.threshold)


def predict_onnx(directory: str, images: list[str], names: list[str], out: Path) -> list[Path]:
    """``fusioner predict --onnx DIR``: :func:`fusioner.predict.predict_images` with an exported model."""
    from fusioner.predict import plan_outputs, write_predictions

    plan = plan_outputs(images, names, out)  # before the sessions load: a refusal costs nothing
    predictor = OnnxPredictor(directory)
    return write_predictions(plan, lambda image: predictor.predict(image, names))
