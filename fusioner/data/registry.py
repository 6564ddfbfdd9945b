"""Name -> builder registry of datasets: ``config.dataset`` -> ``build_<name>(config) -> Split``.

The same mechanism as the adapters' (:mod:`fusioner.adapters.registry`): each dataset module
decorates its builder with ``@register_dataset("<name>")`` and :mod:`fusioner.data` imports the
modules, so this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from fusioner.errors import UnknownNameError

if TYPE_CHECKING:
    from fusioner.config import Config
    from fusioner.data.splits import Split

Builder = Callable[["Config"], "Split"]

_BUILDERS: dict[str, Builder] = {}
# config.dataset -> its builder, in registration order; read-only, the decorator is the way in.
BUILDERS: Mapping[str, Builder] = MappingProxyType(_BUILDERS)
# config.dataset -> how many folds it has (0: none, its held-out names come from elsewhere), so the
# config can refuse an out-of-range fold before anything loads.
_FOLDS: dict[str, int] = {}
FOLDS: Mapping[str, int] = MappingProxyType(_FOLDS)


def register_dataset(name: str, *, num_folds: int = 0) -> Callable[[Builder], Builder]:
    def decorator(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _BUILDERS[name] = fn
        _FOLDS[name] = num_folds
        return fn

    return decorator


def get_builder(name: str) -> Builder:
    if name not in _BUILDERS:
        known = ", ".join(_BUILDERS)
        raise UnknownNameError(f"config key 'dataset': unknown dataset {name!r}; known: {known}")
    return _BUILDERS[name]
