"""Frozen-feature cache: visual tokens computed once, stored as fp16 safetensors shards.

The backbone is frozen, so its output for an image never changes; training then runs at the speed
of the head alone. One cache folder holds one *key* (backbone name, weights fingerprint,
preprocessing, input size, dataset identity): any change to those lands in another folder, so a
stale cache can never be read for a changed backbone. Each shard stores, per image id, the tokens
``gh gw c`` (fp16) and the mask resized to the input size (uint8), everything a training step needs,
so cached training never opens an image file. Shards are read lazily through safetensors' memory
map, so caches larger than memory work. Every shard's SHA-256 is in the index and is checked on
first use: a truncated or corrupted shard is reported by path and rebuilt, never read as garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fusioner.adapters import VisionAdapter
from fusioner.data.base import SegDataset
from fusioner.data.transforms import resize
from fusioner.errors import FusionerError
from fusioner.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

INDEX = "index.json"


class CorruptShardError(FusionerError):
    """A shard whose bytes do not match the checksum recorded when it was written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(vision: VisionAdapter, image_size: int, dataset_id: str) -> dict[str, Any]:
    return {
        "vision": vision.name,
        "weights": vision.fingerprint(),
        "preprocessing": vision.preprocessing,
        "image_size": image_size,
        "dataset": dataset_id,
        "format": 1,
    }


@dataclass
class CachedItem:
    tokens: Tensor  # gh gw c, fp16
    mask: Tensor  # s s, uint8 (the dataset's labels, 255 = ignore)
    names: tuple[str, ...]


class FeatureCache:
    """One cache key's folder: ``index.json`` + ``shard-NNNNN.safetensors``."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        self.key = key
        self.dir = Path(root) / f"{key['vision'].replace(':', '_').replace('/', '_')}-{digest}"
        self._index = self._load_index()
        self._handles: dict[str, Any] = {}
        self._verified: set[str] = set()

    # -- index ------------------------------------------------------------------------------
    def _load_index(self) -> dict[str, Any]:
        path = self.dir / INDEX
        if path.is_file():
            index = json.loads(path.read_text())
            if index.get("key") == self.key:
                return index
            log.warning("cache %s was written for another key; rebuilding it", self.dir)
        return {"key": self.key, "shards": {}, "items": {}}

    def _save_index(self) -> None:
        atomic_write_json(self.dir / INDEX, self._index)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index["items"]

    def __len__(self) -> int:
        return len(self._index["items"])

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self]

    def size_bytes(self) -> int:
        return sum((self.dir / s).stat().st_size for s in self._index["shards"])

    # -- writing ----------------------------------------------------------------------------
    def write_shard(self, items: dict[str, CachedItem]) -> Path:
        """Write one shard atomically, then record it (with its checksum) in the index."""
        name = f"shard-{len(self._index['shards']):05d}.safetensors"
        while (self.dir / name).exists() or name in self._index["shards"]:
            name = f"shard-{int(name[6:11]) + 1:05d}.safetensors"
        tensors: dict[str, Tensor] = {}
        for item_id, item in items.items():
            tensors[f"{item_id}/tokens"] = item.tokens.to(torch.float16).contiguous().cpu()
            tensors[f"{item_id}/mask"] = item.mask.to(torch.uint8).contiguous().cpu()
        path = atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        self._index["shards"][name] = {"sha256": _sha256(path), "count": len(items)}
        for item_id, item in items.items():
            self._index["items"][item_id] = {"shard": name, "names": list(item.names)}
        self._save_index()
        self._verified.add(name)
        return path

    # -- reading ----------------------------------------------------------------------------
    def _handle(self, shard: str) -> Any:
        if shard not in self._verified:
            path = self.dir / shard
            expected = self._index["shards"][shard]["sha256"]
            if not path.is_file() or _sha256(path) != expected:
                raise CorruptShardError(f"feature cache shard {path} is missing, truncated or corrupted")
            self._verified.add(shard)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard]

    def read(self, item_id: str) -> CachedItem:
        entry = self._index["items"].get(item_id)
        if entry is None:
            raise KeyError(f"{item_id!r} is not in the feature cache {self.dir}")
        handle = self._handle(entry["shard"])
        return CachedItem(
            handle.get_tensor(f"{item_id}/tokens"),
            handle.get_tensor(f"{item_id}/mask"),
            tuple(entry["names"]),
        )

    def verify(self) -> list[Path]:
        """Check every shard; drop bad ones from the index (their items become missing) and return them."""
        bad = []
        for shard in list(self._index["shards"]):
            try:
                self._handle(shard)
            except CorruptShardError as e:
                log.warning("%s; its images will be recomputed", e)
                bad.append(self.dir / shard)
                self._drop_shard(shard)
        if bad:
            self._save_index()
        return bad

    def _drop_shard(self, shard: str) -> None:
        self._handles.pop(shard, None)
        self._verified.discard(shard)
        del self._index["shards"][shard]
        self._index["items"] = {k: v for k, v in self._index["items"].items() if v["shard"] != shard}
        (self.dir / shard).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps in their own process.
        return {**self.__dict__, "_handles": {}}


def _batches(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def fill_cache(
    cache: FeatureCache,
    vision: VisionAdapter,
    dataset: SegDataset,
    image_size: int,
    *,
    batch_size: int = 16,
    shard_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> int:
    """Compute and store the tokens of every dataset item not yet cached; returns how many were added.

    A killed fill loses at most the shard in progress: finished shards are already indexed.
    """
    cache.verify()
    todo = [i for i in range(len(dataset)) if dataset.item_id(i) not in cache]
    pending: dict[str, CachedItem] = {}
    added = 0
    bar = tqdm(total=len(todo), desc=f"caching {vision.name} features", unit="img", disable=not progress)
    for chunk in _batches(todo, batch_size):
        samples = [resize(dataset[i], image_size) for i in chunk]
        if samples:
            images = torch.stack([s["image"] for s in samples]).to(device)
            out = vision(images)
            tokens = out.tokens.view(len(samples), *out.grid, -1)
            for s, t in zip(samples, tokens, strict=True):
                pending[s["id"]] = CachedItem(t, s["mask"], tuple(s["names"]))
        bar.update(len(chunk))
        if len(pending) >= shard_size:
            cache.write_shard(pending)
            added += len(pending)
            pending = {}
    if pending:
        cache.write_shard(pending)
        added += len(pending)
    bar.close()
    return added


def dataset_id(config) -> str:
    """The dataset part of a cache key: its registry name and resolved root folder."""
    root = str(Path(config.data_path).resolve()) if config.data_path else ""
    return f"{config.dataset}:{root}"


def prepare_cache(config, vision: VisionAdapter, dataset: SegDataset, device: torch.device) -> FeatureCache:
    """Open (and fill what is missing of) the feature cache for ``dataset`` at the config's size.

    The cache lives in ``config.cache_dir``, or beside the run (``<out_dir>/../cache``) so that
    the runs of one sweep share it.
    """
    root = Path(config.cache_dir) if config.cache_dir else Path(config.out_dir).parent / "cache"
    cache = FeatureCache(root, cache_key(vision, config.image_size, dataset_id(config)))
    fill_cache(cache, vision, dataset, config.image_size, device=device, batch_size=config.eval_batch_size)
    return cache
