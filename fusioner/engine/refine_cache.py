"""Per-image inputs a refiner precomputes, stored beside the feature cache (SAZS's eigen-masks).

SAZS (Liuxinyv/SAZS) solves the Laplacian eigenvectors its test-time refiner swaps in offline, once
per image. A refiner whose per-image inputs are worth keeping the same way (methods/sazs.py's
``SAZSRefiner``: its ``2K`` binary eigen-masks on the graph's grid, label-free) says so with three
members, all this module reads of it:

- ``precompute_key()``: what the inputs depend on, a JSON dict (for SAZS: eigs, knn, the
  ``refine_vision`` backbone and its weights);
- ``precompute(tokens, grid, image)``: one view's inputs, as the refiner computes them on the fly;
- ``precomputed(value)``: a context inside which the refiner uses ``value`` instead of computing.

Evaluation with a feature cache (fusioner/engine/evaluate.py) calls :func:`prepare_refine_store`
before scoring: every cached item of the dataset without current inputs gets them, from the cached
tokens evaluation reads (or, for a refiner with a backbone of its own, from the view inference makes
of the image), and each image is then scored inside :meth:`RefineStore.serving`. No cache (``predict``
on a user's image, sliding windows): the refiner computes on the fly, as before.

What keeps the stored inputs current:

* they live in ``<feature cache folder>/refine-<digest of the key>/``: other settings land in
  another folder (computed afresh; going back finds the first one), and the feature cache's own key
  (backbone, input size, dataset) is the parent folder's;
* each item records the fingerprint of the cached features it was computed from: an item the
  feature cache encoded again (its image changed) is computed again;
* each part's SHA-256 is checked before first use: a damaged part's items are computed again;
* filling holds the feature cache's fill lock (``FeatureCache.filling``).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fusioner.data.base import SegDataset
from fusioner.engine.cache_store import FeatureCache
from fusioner.engine.shards import ShardKind, ShardStore, StoredItems, key_digest
from fusioner.inference import square_view

log = logging.getLogger(__name__)

FORMAT = 1
PART_SIZE = 512  # items per part: a killed fill loses at most the part in progress
_MEMBERS = ("precompute_key", "precompute", "precomputed")
_PARTS = ShardKind("part", "refiner store", redo="computing its items again", required=("fingerprint",))


def precomputes(refiner: Any) -> bool:
    """Whether ``refiner`` has per-image inputs to precompute (the three members of the docstring)."""
    return refiner is not None and all(callable(getattr(refiner, m, None)) for m in _MEMBERS)


class RefineStore(StoredItems):
    """One refiner key's inputs for the items of one feature cache: ``index.json`` + parts
    (a :class:`~fusioner.engine.shards.ShardStore` of ``part-NNNNN.safetensors``)."""

    def __init__(self, cache: FeatureCache, refiner: Any) -> None:
        self.cache, self.refiner = cache, refiner
        self.key = {**refiner.precompute_key(), "format": FORMAT}
        self.dir = cache.dir / f"refine-{key_digest(self.key)}"
        self._store = ShardStore(self.dir, self.key, _PARTS, log)

    def stale(self, dataset: SegDataset) -> list[tuple[int, str, str]]:
        """``(index, id, features' fingerprint)`` of each item of ``dataset`` that the feature cache
        holds and this store has not computed from those very features."""
        out = []
        for i in range(len(dataset)):
            item_id = dataset.item_id(i)
            fingerprint = self.cache.fingerprint(item_id)
            entry = self._store.items.get(item_id)
            if fingerprint is not None and (entry is None or entry["fingerprint"] != fingerprint):
                out.append((i, item_id, fingerprint))
        return out

    # -- reading ----------------------------------------------------------------------------
    def read(self, item_id: str) -> Tensor:
        return self._store.tensor(item_id, item_id)

    def serving(self, item_id: str) -> AbstractContextManager[None]:
        """Inside: the refiner uses ``item_id``'s stored inputs, when they were computed from the
        features the cache holds now (else it computes its own)."""
        entry = self._store.items.get(item_id)
        if entry is None or entry["fingerprint"] != self.cache.fingerprint(item_id):
            return nullcontext()
        return self.refiner.precomputed(self.read(item_id))

    # -- filling ----------------------------------------------------------------------------
    def _compute(self, dataset: SegDataset, i: int, item_id: str, image_size: int, device: Any) -> Tensor:
        """Item ``i``'s inputs from what evaluation hands the refiner (fusioner/inference.py)."""
        tokens = self.cache.read(item_id).tokens.to(device)  # gh gw c
        grid = (tokens.shape[0], tokens.shape[1])
        flat = tokens.flatten(0, 1)[None].to(torch.float32)
        image = None
        if getattr(self.refiner, "vision", None) is not None:  # its own backbone sees the view
            image = square_view(dataset[i]["image"].to(device), image_size)
        return self.refiner.precompute(flat, grid, image).cpu()

    def _write(self, pending: dict[str, tuple[Tensor, str]]) -> None:
        tensors = {item_id: value.contiguous() for item_id, (value, _) in pending.items()}
        self._store.write(tensors, {item_id: {"fingerprint": fp} for item_id, (_, fp) in pending.items()})

    def fill(
        self, dataset: SegDataset, image_size: int, device: Any = "cpu", *, progress: bool = True
    ) -> int:
        """Compute the inputs of every cached item of ``dataset`` that has none current; how many."""
        if not self.stale(dataset) and not self._store.corrupt():
            return 0  # nothing to write: no lock, a read-only cache serves as is
        # Under the feature cache's fill lock: this store's latest index, cleaned of damaged parts
        # and of files no index lists (a killed fill's).
        with self.cache.filling():
            self._store.tidy()
            self._store.verify()
            todo = self.stale(dataset)
            pending: dict[str, tuple[Tensor, str]] = {}
            for i, item_id, fingerprint in tqdm(
                todo, desc="precomputing refiner inputs", unit="img", disable=not progress
            ):
                pending[item_id] = (self._compute(dataset, i, item_id, image_size, device), fingerprint)
                if len(pending) >= PART_SIZE:
                    self._write(pending)
                    pending = {}
            if pending:
                self._write(pending)
        return len(todo)


def prepare_refine_store(
    cache: FeatureCache | None,
    refiner: Any,
    dataset: SegDataset,
    image_size: int,
    device: Any = "cpu",
    *,
    progress: bool = True,
) -> RefineStore | None:
    """The filled store of ``refiner``'s inputs for the cached items of ``dataset``; None without a
    cache or for a refiner with nothing to precompute."""
    if cache is None or not precomputes(refiner):
        return None
    store = RefineStore(cache, refiner)
    store.fill(dataset, image_size, device, progress=progress)
    return store


__all__ = ["FORMAT", "RefineStore", "precomputes", "prepare_refine_store"]
