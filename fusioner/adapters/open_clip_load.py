"""open_clip models by architecture and pretrained tag: config, weights, tokenizer, preprocessing.

:func:`create_clip` builds the architecture's open_clip model with keyword overrides merged into its
config, finds (or downloads) the tag's checkpoint before building, and loads it with open_clip's
own loader; a timm image tower is rebuilt for any input size first. The adapters that wrap the
towers are in :mod:`fusioner.adapters.open_clip`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import timm
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer
from torch import nn

from fusioner.adapters import weights as W
from fusioner.adapters.hf_text import TOKENIZER_FILES
from fusioner.errors import ConfigError, UnknownNameError, WeightsError

# open_clip's Hub file names, safetensors first.
_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _closest_first(word: str, choices: Sequence[str]) -> list[str]:
    ratio = {c: difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio() for c in choices}
    return sorted(choices, key=lambda c: (-ratio[c], c))


def parse_model_id(model_id: str) -> tuple[str, str]:
    """``"<architecture>/<pretrained tag>"`` -> both, checked against open_clip's offline tables.

    Raises :class:`UnknownNameError` listing the known architectures (or the architecture's known
    tags), closest to what was written first.
    """
    arch, _, tag = model_id.partition("/")
    where = f"open_clip:{model_id}"
    archs = open_clip.list_models()
    if arch not in archs:
        raise UnknownNameError(
            f"unknown open_clip architecture {arch!r} (in {where!r}); known, closest first: "
            f"{', '.join(_closest_first(arch, archs))}"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        known = ", ".join(_closest_first(tag, tags)) if tags else "none (open_clip ships no weights for it)"
        raise UnknownNameError(
            f"open_clip {arch} has no pretrained tag {tag!r} (in {where!r}; write open_clip:{arch}/<tag>); "
            f"known tags, closest first: {known}"
        )
    return arch, tag


def default_source(name: str, arch: str, tag: str) -> tuple[str, tuple[str, ...]]:
    """Where open_clip's table says the weights of ``arch`` / ``tag`` live, and the file names to try."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" (its default file names) or "org/repo/file".
        repo, filename = posixpath.split(hub)
        return f"hf-hub:{repo}", (filename,) if filename else _CLIP_FILES
    if cfg.get("url"):
        return cfg["url"], _CLIP_FILES
    raise WeightsError(f"{name}: open_clip lists no download for {arch} / {tag}; pass weights=/path/to/file")


def _rebuild_trunk(name: str, visual: TimmModel, trunk_name: str, overrides: Mapping[str, Any]) -> None:
    """Replace a timm image tower by the same model built with ``dynamic_img_size`` (and ``overrides``).

    open_clip builds its timm towers for their training size only; timm's own constructor is the
    one place that switches a model to any input size (position table resampled per input, patch
    embedding not strict), so the tower is rebuilt through it before any weights are loaded.
    """
    old = visual.trunk
    if not hasattr(old, "patch_embed"):
        raise ConfigError(
            f"{name}: dense tokens need a ViT-like timm image tower; {trunk_name} "
            f"({type(old).__name__}) is not one"
        )
    kwargs = {"num_classes": old.num_classes, "global_pool": old.global_pool, **overrides}
    try:
        visual.trunk = timm.create_model(trunk_name, pretrained=False, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"{name}: the timm image tower {trunk_name} cannot take dynamic_img_size or {sorted(overrides)} "
            f"({e}); dense tokens need a ViT-like tower"
        ) from e


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning (it logs to the root logger) while building."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def create_clip(
    name: str,
    arch: str,
    tag: str,
    weights: str | None,
    overrides: Mapping[str, Any],
    *,
    trunk: Mapping[str, Any] | None = None,
    text_only: bool = False,
) -> tuple[nn.Module, dict[str, Any], Path | None]:
    """The open_clip model of ``arch`` with ``overrides`` and its weights (default: ``tag``'s).

    ``trunk`` (vision only): rebuild a timm image tower for any input size, with these timm
    overrides. ``text_only``: the image tower is replaced by ``nn.Identity`` before loading and
    its tensors are skipped (the text tower still loads strictly). Returns the model, its merged
    config and the checkpoint file (None for random weights).
    """
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    # OpenAI's CLIPs were trained with QuickGELU; open_clip's plain configs use nn.GELU.
    cfg = _merge(
        {**open_clip.get_model_config(arch), "quick_gelu": tag_cfg.get("quick_gelu", False)}, overrides
    )
    path = None
    if weights != W.RANDOM:
        # Found (or downloaded) before the model is built: a missing file fails in milliseconds.
        source, names = (weights, _CLIP_FILES) if weights else default_source(name, arch, tag)
        path = W.resolve_file(name, source, names=names)
    # create_model reads custom_text (which model class) from its own config, and refuses it as an
    # override. It would also log "initialized randomly" about weights that load just below.
    with _quiet_open_clip():
        model = open_clip.create_model(
            arch, pretrained=None, **{k: v for k, v in cfg.items() if k != "custom_text"}
        )
    if trunk is not None:
        if isinstance(model.visual, TimmModel):
            _rebuild_trunk(name, model.visual, cfg["vision_cfg"]["timm_model_name"], trunk)
        elif trunk:
            raise ConfigError(f"{name}: trunk= overrides a timm image tower; {arch}'s is open_clip's own")
    # big_vision .npz files are converted tower by tower into the model: keep the image tower there.
    skip_visual = text_only and (path is None or path.suffix not in (".npz", ".npy"))
    if skip_visual:
        # The image tower is most of the memory, and a text adapter never runs it.
        model.visual = nn.Identity()
    if path is None:
        return model.eval(), cfg, None
    part = "'s text tower" if text_only else ""
    target = f"open_clip {arch}{part} with the given overrides"
    try:
        # open_clip's own loader: format conversions (OpenAI, big_vision), position embedding
        # resizing, strict loading (for a text tower, strict below but for the image tower's keys).
        result = open_clip.load_checkpoint(model, str(path), strict=not skip_visual)
    except RuntimeError as e:
        if W.is_load_error(e):
            raise W.load_error(name, path, target, e) from e
        raise
    if skip_visual:
        unexpected = [k for k in result.unexpected_keys if not k.startswith("visual.")]
        if result.missing_keys or unexpected:
            raise WeightsError(
                f"{name}: the weights in {path} do not fit {target}: missing {result.missing_keys[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return model.eval(), cfg, path


def clip_preprocessing(arch: str, tag: str) -> tuple[Sequence[float], Sequence[float]]:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    return cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)


def clip_tokenizer(name: str, arch: str, cfg: Mapping[str, Any], checkpoint: Path | None) -> Any:
    """open_clip's tokenizer for ``arch``; a Hugging Face one is read from beside the checkpoint when there.

    The Hub repos of SigLIP-style models hold the tokenizer next to the weights, so a downloaded
    or hand-copied folder works offline; otherwise the config's tokenizer id is fetched.
    """
    text_cfg = cfg["text_cfg"]
    context_length = text_cfg.get("context_length")
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    folder = checkpoint.parent if checkpoint is not None else None
    source = str(folder) if folder and any((folder / f).is_file() for f in TOKENIZER_FILES) else hf_name
    hint = f"put its tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) beside the weights file"
    with W.fetching(name, f"the tokenizer {source}", hint):
        return HFTokenizer(
            source,
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=W.is_offline(),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
