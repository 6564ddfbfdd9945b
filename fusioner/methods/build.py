"""Building a method's head, its vision side and the refiner from a Config or a saved record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from torch import nn

from fusioner.config import register_check
from fusioner.errors import ConfigError, FusionerError
from fusioner.methods.registry import METHODS, PSEUDO_LABELS, REFINERS, method_of
from fusioner.methods.zegformer import GROUPINGS


def build_head(config: Any, vision: Any, text: Any) -> nn.Module:
    """A freshly initialised head of ``config.method`` between these two adapters."""
    method = METHODS[getattr(config, "method", "fusioner")]
    return method.head_cls(method.from_config(config, vision, text))


def head_from_record(record: Mapping[str, Any]) -> nn.Module:
    """The head a saved ``config.json`` describes (models saved before methods existed: fusioner)."""
    name = record.get("method", "fusioner")
    if name not in METHODS:
        raise FusionerError(
            f"model config names method {name!r}, which this fusioner does not know; "
            f"known: {', '.join(METHODS)}"
        )
    method = METHODS[name]
    return method.head_cls(method.config_cls(**record["head"]))


def head_record(head: nn.Module) -> dict[str, Any]:
    """``{"method", "head"}`` entries of a saved model's ``config.json``."""
    return {"method": method_of(head).name, "head": asdict(head.config)}


def attach_vision(head: nn.Module, vision: Any) -> Any:
    """The vision adapter the head runs on: the frozen one, or one the head's own parameters enter
    (ZegCLIP's deep prompts, ``head.attach``)."""
    attach = getattr(head, "attach", None)
    return attach(vision) if attach is not None else vision


def build_refiner(settings: Any) -> Any:
    """A refiner from a Config (attributes) or a saved ``refine`` record (a mapping); None = none."""
    values = dict(settings) if isinstance(settings, Mapping) else settings.to_dict()
    name = values.get("refine", "none") or "none"
    if name not in REFINERS:
        raise FusionerError(f"refine {name!r} is not one of {', '.join(REFINERS)}")
    return REFINERS[name](values)


@register_check
def check_config(config: Any) -> None:
    """The method keys' own rules, run by ``Config.__post_init__`` before anything loads."""
    for key, allowed in (("method", METHODS), ("refine", REFINERS), ("pseudo_labels", PSEUDO_LABELS)):
        if getattr(config, key) not in allowed:
            raise ConfigError(
                f"config key {key!r}: {getattr(config, key)!r} is not one of {', '.join(allowed)}"
            )
    if config.zegformer_grouping not in GROUPINGS:
        raise ConfigError(
            f"config key 'zegformer_grouping': {config.zegformer_grouping!r} is not one of "
            f"{', '.join(GROUPINGS)}"
        )
    for key in ("refine_weight", "zegformer_lambda", "sazs_min_iou", "pseudo_merge"):
        if not 0 <= getattr(config, key) <= 1:
            raise ConfigError(f"config key {key!r}: expected 0 to 1, got {getattr(config, key)!r}")
    for key in ("spectral_eigs", "spectral_segments", "zegformer_queries", "pseudo_clusters"):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key {key!r}: expected at least 1, got {getattr(config, key)!r}")
    if not config.pseudo_scales or not all(s.isdigit() and int(s) >= 1 for s in config.pseudo_scales):
        raise ConfigError(
            "config key 'pseudo_scales': expected window sizes of 1 or more (e.g. [1, 3]), "
            f"got {config.pseudo_scales!r}"
        )
    if config.teacher_vision and config.pseudo_labels != "clip-zss" and not config.global_loss_weight:
        raise ConfigError(
            f"config key 'teacher_vision': {config.teacher_vision!r} teaches only CLIP-ZSS's terms; "
            "set pseudo_labels=clip-zss or global_loss_weight > 0, or leave it empty"
        )
    if config.deep_prompts and config.method != "zegclip":
        raise ConfigError(
            f"config key 'deep_prompts': {config.deep_prompts} prompt tokens are a zegclip option; "
            f"method is {config.method!r}"
        )
    if config.deep_prompts and config.use_cache:
        raise ConfigError(
            "config key 'deep_prompts': the prompts change the backbone's tokens at every step, so the "
            "frozen-feature cache cannot be used; set use_cache=false"
        )
