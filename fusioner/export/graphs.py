"""The two modules ``torch.onnx`` exports: vision adapter + head, and a Hugging Face text encoder."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusioner.adapters.hf_text import POOLINGS
from fusioner.methods.registry import call_head
from fusioner.model import FusionerModel


class PredictorGraph(nn.Module):
    """Vision adapter + head: images ``b 3 s s`` in [0, 1], text ``k c`` -> logits ``b k h w``."""

    def __init__(self, model: FusionerModel) -> None:
        super().__init__()
        self.vision = model.vision
        self.head = model.head

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        out = self.vision(images)
        # The decoder's resolution: inference.py resizes once, to each image's own size. A head that
        # resizes its features before scoring (``decoder: released``) scores at the input's size, as
        # inference.head_logits asks it to: resizing logits instead would not be the released order.
        at = {"size": tuple(images.shape[-2:])} if getattr(self.head, "resizes_features", False) else {}
        return call_head(self.head, out.tokens, out.grid, text, out.cls, **at)


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


def export_graph(
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
