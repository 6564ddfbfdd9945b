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

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fusioner.data.base import SegDataset
from fusioner.engine.cache_store import CorruptShardError, FeatureCache, file_sha256
from fusioner.inference import square_view
from fusioner.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1
INDEX = "index.json"
PART_SIZE = 512  # items per part: a killed fill loses at most the part in progress
_PART_NAME = re.compile(r"part-\d{5,}\.safetensors")
_MEMBERS = ("precompute_key", "precompute", "precomputed")


def precomputes(refiner: Any) -> bool:
    """Whether ``refiner`` has per-image inputs to precompute (the three members of the docstring)."""
    return refiner is not None and all(callable(getattr(refiner, m, None)) for m in _MEMBERS)


def _valid_index(index: Any) -> bool:
    if not isinstance(index, dict) or not isinstance(index.get("key"), dict):
        return False
    parts, items = index.get("parts"), index.get("items")
    if not isinstance(parts, dict) or not isinstance(items, dict):
        return False
    if not all(isinstance(p, str) and _PART_NAME.fullmatch(p) for p in parts):
        return False
    if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in parts.values()):
        return False
    return all(isinstance(v, dict) and v.get("part") in parts and "fingerprint" in v for v in items.values())


class RefineStore:
    """One refiner key's inputs for the items of one feature cache: ``index.json`` + parts."""

    def __init__(self, cache: FeatureCache, refiner: Any) -> None:
        self.cache, self.refiner = cache, refiner
        self.key = {**refiner.precompute_key(), "format": FORMAT}
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = cache.dir / f"refine-{digest}"
        self._handles: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # part -> the checksum it was verified against
        self._index = self._load()

    def _load(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"key": self.key, "parts": {}, "items": {}}
        path = self.dir / INDEX
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return fresh
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("refiner store index %s is unreadable (%s); computing its items again", path, e)
            return fresh
        if not _valid_index(index) or index["key"] != self.key:
            log.warning("refiner store index %s is not this store's; computing its items again", path)
            return fresh
        return index

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index["items"]

    def __len__(self) -> int:
        return len(self._index["items"])

    def stale(self, dataset: SegDataset) -> list[tuple[int, str, str]]:
        """``(index, id, features' fingerprint)`` of each item of ``dataset`` that the feature cache
        holds and this store has not computed from those very features."""
        out = []
        for i in range(len(dataset)):
            item_id = dataset.item_id(i)
            fingerprint = self.cache.fingerprint(item_id)
            entry = self._index["items"].get(item_id)
            if fingerprint is not None and (entry is None or entry["fingerprint"] != fingerprint):
                out.append((i, item_id, fingerprint))
        return out

    # -- reading ----------------------------------------------------------------------------
    def _handle(self, part: str) -> Any:
        expected = self._index["parts"][part]["sha256"]
        if self._verified.get(part) != expected:
            path = self.dir / part
            if not path.is_file() or file_sha256(path) != expected:
                raise CorruptShardError(f"refiner store part {path} is missing, truncated or corrupted")
            self._verified[part] = expected
            self._handles.pop(part, None)
        if part not in self._handles:
            self._handles[part] = safe_open(str(self.dir / part), framework="pt")
        return self._handles[part]

    def read(self, item_id: str) -> Tensor:
        entry = self._index["items"].get(item_id)
        if entry is None:
            raise KeyError(f"{item_id!r} is not in the refiner store {self.dir}")
        return self._handle(entry["part"]).get_tensor(item_id)

    def serving(self, item_id: str) -> AbstractContextManager[None]:
        """Inside: the refiner uses ``item_id``'s stored inputs, when they were computed from the
        features the cache holds now (else it computes its own)."""
        entry = self._index["items"].get(item_id)
        if entry is None or entry["fingerprint"] != self.cache.fingerprint(item_id):
            return nullcontext()
        return self.refiner.precomputed(self.read(item_id))

    # -- filling ----------------------------------------------------------------------------
    def _bad_parts(self) -> list[str]:
        bad = []
        for part in self._index["parts"]:
            try:
                self._handle(part)
            except CorruptShardError:
                bad.append(part)
        return bad

    def _drop_part(self, part: str) -> None:
        self._handles.pop(part, None)
        self._verified.pop(part, None)
        del self._index["parts"][part]
        self._index["items"] = {k: v for k, v in self._index["items"].items() if v["part"] != part}
        (self.dir / part).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The feature cache's fill lock, this store's index re-read and cleaned of damaged parts
        and of files no index lists (a killed fill's)."""
        with self.cache.filling():
            self._index, self._handles, self._verified = self._load(), {}, {}
            for part in self._bad_parts():
                log.warning(
                    "refiner store part %s is damaged; its items will be computed again", self.dir / part
                )
                self._drop_part(part)
            for path in [*self.dir.glob("part-*.safetensors"), *self.dir.glob(".part-*.tmp")]:
                if path.name not in self._index["parts"]:
                    path.unlink(missing_ok=True)
            yield

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
        name = f"part-{len(self._index['parts']):05d}.safetensors"
        while (self.dir / name).exists() or name in self._index["parts"]:
            name = f"part-{int(name[5:10]) + 1:05d}.safetensors"
        tensors = {item_id: value.contiguous() for item_id, (value, _) in pending.items()}
        path = atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        sha = file_sha256(path)
        self._index["parts"][name] = {"sha256": sha, "count": len(pending)}
        for item_id, (_, fingerprint) in pending.items():
            self._index["items"][item_id] = {"part": name, "fingerprint": fingerprint}
        used = {entry["part"] for entry in self._index["items"].values()}
        for part in [p for p in self._index["parts"] if p not in used]:
            self._drop_part(part)
        atomic_write_json(self.dir / INDEX, self._index)
        self._verified[name] = sha

    def fill(
        self, dataset: SegDataset, image_size: int, device: Any = "cpu", *, progress: bool = True
    ) -> int:
        """Compute the inputs of every cached item of ``dataset`` that has none current; how many."""
        if not self.stale(dataset) and not self._bad_parts():
            return 0  # nothing to write: no lock, a read-only cache serves as is
        with self._locked():
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
