"""Name -> builder registries for vision and text adapters.

Builders are registered next to their implementation (``@register_vision("dino_vits16", ...)``)
so adding a backbone is one decorated function, never another branch in a factory. Imports go one
way: the implementation modules import this one, and :mod:`fusioner.adapters` imports them (which
runs their decorators), so this module imports no implementation and the registries are full as
soon as anything under ``fusioner.adapters`` is imported. A *family*
(``timm:``, ``hf:``, ``open_clip:``) is a prefix whose remainder is passed to the builder as the model id.
Builders take ``weights`` (hub id, local file or folder; None = the entry's default) plus keyword
overrides of the architecture, which is how the tests build tiny models through the real path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fusioner.adapters.base import TextAdapter, VisionAdapter
from fusioner.errors import UnknownNameError


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    weights: str  # where the default weights come from, for users and the README table
    family: bool = False  # a prefix like "timm:" that takes any model id after it
    # For a family whose ids are known offline (timm's, open_clip's): is this model id one of them?
    # It may raise UnknownNameError itself, to say which part is wrong and list the valid choices.
    accepts: Callable[[str], bool] | None = None


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, weights: str, family: bool = False, accepts: Callable[[str], bool] | None = None
    ) -> Callable:
        def decorator(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} adapter {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, weights, family, accepts)
            return fn

        return decorator

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def names(self) -> list[str]:
        return [f"{e.name}:<name>" if e.family else e.name for e in self.entries()]

    def lookup(self, name: str) -> tuple[Entry, str]:
        """The entry that builds ``name`` and, for a family, the model id after the prefix."""
        prefix, sep, model_id = name.partition(":")
        entry = self._entries.get(prefix) if sep else self._entries.get(name)
        if entry is None or entry.family != bool(sep) or (sep and not model_id):
            raise UnknownNameError(f"unknown {self.kind} backbone {name!r}; known: {', '.join(self.names())}")
        return entry, model_id

    def check(self, name: str, where: str = "") -> Entry:
        """The entry that would build ``name``, checked as far as possible without building it.

        Raises :class:`UnknownNameError` (prefixed with ``where``, e.g. a file and run) for a name
        that is not registered, and for a family id the family knows offline not to exist.
        """
        prefix = f"{where}: " if where else ""
        known = ", ".join(self.names())
        if not isinstance(name, str):
            raise UnknownNameError(f"{prefix}unknown {self.kind} backbone {name!r}; known: {known}")
        try:
            entry, model_id = self.lookup(name)
            accepted = entry.accepts is None or entry.accepts(model_id)
        except UnknownNameError as e:
            raise UnknownNameError(f"{prefix}{e}") from None
        if not accepted:
            raise UnknownNameError(
                f"{prefix}unknown {self.kind} backbone {name!r}: {entry.name} has no model {model_id!r}; "
                f"known: {known}"
            )
        return entry

    def create(self, name: str, weights: str | None = None, **kwargs: Any) -> Any:
        entry, model_id = self.lookup(name)
        if entry.family:
            return entry.build(model_id, weights=weights, **kwargs)
        return entry.build(weights=weights, **kwargs)


VISION = Registry("vision")
TEXT = Registry("text")
register_vision = VISION.register
register_text = TEXT.register


def registry(kind: str) -> Registry:
    """The ``vision`` or ``text`` registry."""
    if kind not in ("vision", "text"):
        raise ValueError(f"backbone kind {kind!r}: expected 'vision' or 'text'")
    return VISION if kind == "vision" else TEXT


def check(kind: str, name: str, where: str = "") -> Entry:
    """Check a ``vision`` or ``text`` backbone name without building it (see :meth:`Registry.check`)."""
    return registry(kind).check(name, where)


def list_vision() -> list[str]:
    return VISION.names()


def list_text() -> list[str]:
    return TEXT.names()


def create_vision(name: str, weights: str | None = None, **kwargs: Any) -> VisionAdapter:
    """Build a frozen vision adapter by registered name, e.g. ``dino_vits16`` or ``timm:resnet50``."""
    return VISION.create(name, weights, **kwargs).freeze()


def create_text(name: str, weights: str | None = None, **kwargs: Any) -> TextAdapter:
    """Build a frozen text adapter by registered name, e.g. ``minilm_l6`` or ``hf:bert-base-cased``."""
    return TEXT.create(name, weights, **kwargs).freeze()
