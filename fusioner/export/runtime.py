"""An ONNX export run with onnxruntime: :class:`OnnxPredictor`, ``fusioner predict --onnx``.

:class:`OnnxPredictor` resizes, tiles, chunks names and thresholds through fusioner/inference.py,
the functions the PyTorch model uses, so both paths differ only inside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from fusioner.adapters.base import TextAdapter, VisionOutput
from fusioner.errors import FusionerError
from fusioner.export.format import EMBEDDINGS, MANIFEST, NAMES, PREDICTOR, WRITER
from fusioner.inference import batch_logits, labels_of
from fusioner.io import read_json
from fusioner.model.model import _check_pixels


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
