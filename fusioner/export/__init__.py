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

``writer.py`` writes the folder (the modules it exports are in ``graphs.py``, its file names in
``format.py``); ``runtime.py`` runs it with onnxruntime (:class:`OnnxPredictor`).
"""

from fusioner.export.format import MANIFEST, OWN_FILES, PREDICTOR, TEXT, WRITER
from fusioner.export.graphs import PredictorGraph, TextGraph
from fusioner.export.runtime import OnnxPredictor, OnnxText, ort_session, predict_onnx
from fusioner.export.writer import ExportResult, claim_folder, export_onnx

__all__ = [
    "MANIFEST",
    "OWN_FILES",
    "PREDICTOR",
    "TEXT",
    "WRITER",
    "ExportResult",
    "OnnxPredictor",
    "OnnxText",
    "PredictorGraph",
    "TextGraph",
    "claim_folder",
    "export_onnx",
    "ort_session",
    "predict_onnx",
]
