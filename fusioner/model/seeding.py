"""Random-weight backbones (``weights: random``) drawn from a recorded seed, so they can be rebuilt.

A backbone built with ``weights="random"`` is its architecture's random initialisation. Drawn from
whatever state the global generator happened to be in, eval, predict and export each got another
backbone than the head was trained on, and other figures on every call. Built inside
:func:`seeded_backbones` instead, it depends on the seed alone: training records that seed in the
model's config.json (``backbone_seed``) and loading draws the same backbone again. The global
generator is left as it was (``fork_rng``), so nothing else a caller seeded shifts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fusioner.adapters.weights import RANDOM
from fusioner.errors import FusionerError

SEED_KEY = "backbone_seed"  # config.json: the seed random-weight backbones were drawn from


def has_random(*weights: str | None) -> bool:
    return RANDOM in weights


@contextmanager
def seeded_backbones(seed: int | None, *weights: str | None) -> Iterator[None]:
    """Build the backbones of ``weights`` in this block: random ones are drawn from ``seed``."""
    if not has_random(*weights):
        yield
        return
    if seed is None:
        raise FusionerError("random-weight backbones need a seed to be rebuilt (config key 'seed')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def recorded_seed(record: dict, config_file: Path) -> int | None:
    """The seed to rebuild ``record``'s random backbones from; a record without one is refused."""
    weights = (record.get("vision_weights"), record.get("text_weights"))
    if not has_random(*weights):
        return None
    seed = record.get(SEED_KEY)
    if not isinstance(seed, int) or isinstance(seed, bool):
        kinds = " and ".join(k for k, w in zip(("vision", "text"), weights, strict=True) if w == RANDOM)
        raise FusionerError(
            f"{config_file}: the {kinds} backbone has random weights but no {SEED_KEY!r}, so it cannot be "
            "rebuilt as it was trained (each load would draw another one); retrain it with this version"
        )
    return seed
