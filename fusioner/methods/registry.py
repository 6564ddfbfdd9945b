"""Name -> method / refiner / pseudo-label registries. Imports nothing of fusioner's models.

A *method* is a trainable head with the Fusioner head's contract: ``head(tokens b n cv, grid, text
b k ct | k ct, size=None) -> logits b k h w`` (cosine x ``head.scale``, one independent sigmoid mask
per name), a frozen ``head.config`` dataclass that ``save_pretrained`` records, and ``head.scale``.
``fusioner/methods/__init__.py`` imports the implementations, whose registrations fill the tables
(timm's habit); :func:`fusioner.methods.check_config`, registered with the config
(``config.register_check``), checks a config's choices against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Method:
    """One head design: how to build its config and module, and where its dense features are."""

    name: str
    config_cls: type  # a frozen dataclass; config_cls(**record["head"]) rebuilds a saved head
    head_cls: type[nn.Module]
    # (config, vision adapter, text adapter) -> config_cls instance.
    from_config: Callable[[Any, Any, Any], Any]
    # Submodule whose output is the head's dense (per-patch or per-pixel) visual features, and its
    # width: what the CLIP-ZSS global term pools (fusioner/methods/objective.py).
    dense_module: str
    dense_dim: Callable[[nn.Module], int] = lambda head: head.config.dim
    # Whether the head reads the image's CLS token (``head(..., cls=b c)``); callers go through
    # :func:`call_head`, so heads that read only patch tokens keep the plain contract.
    takes_cls: bool = False
    # Training: score every seen name on every image (ZegCLIP) instead of the sampled present +
    # negative names, and the method's own per-name loss ``(logits b k h w, targets b k h w, valid
    # b h w) -> scalar`` in place of the library's BCE + dice (None = the library's).
    all_seen: bool = False
    loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    # False: the head's own set loss (``head.aux_loss``) is its whole training signal (ZegFormer);
    # no per-name loss on its semantic map.
    pixel_loss: bool = True


METHODS: dict[str, Method] = {}

# name -> builder(settings mapping) -> refiner or None. The settings are a Config's keys or the
# ``refine`` record of a saved model, so a refiner is rebuilt by name like the adapters.
REFINERS: dict[str, Callable[..., Any]] = {}

# name -> pseudo-label maker (fusioner/methods/pseudo_labels.py); "none" means no pseudo-classes.
PSEUDO_LABELS: dict[str, Callable[..., Any] | None] = {"none": None}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def register_refiner(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        REFINERS[name] = builder
        return builder

    return decorate


def method_of(head: nn.Module) -> Method:
    """The registered method whose head class ``head`` is (compiled / wrapped heads unwrapped)."""
    head = getattr(head, "_orig_mod", getattr(head, "module", head))
    for method in METHODS.values():
        if type(head) is method.head_cls:
            return method
    raise KeyError(f"{type(head).__name__} is no registered method's head; known: {', '.join(METHODS)}")


def call_head(
    head: nn.Module,
    tokens: Tensor,
    grid: tuple[int, int],
    text: Tensor,
    cls: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """``head(tokens, grid, text, **kwargs)``, with ``cls=cls`` for the heads that read the CLS token.

    The one place that decides it, so training (cached or not), evaluation, ``predict`` and export
    hand ZegCLIP its image embedding the same way.
    """
    plain = getattr(head, "_orig_mod", getattr(head, "module", head))
    # Anything else with the head's call (an exported graph's stages, export.py) reads no CLS.
    if any(type(plain) is m.head_cls and m.takes_cls for m in METHODS.values()):
        kwargs["cls"] = cls
    return head(tokens, grid, text, **kwargs)
