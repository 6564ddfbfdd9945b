"""The feature cache's folder on disk: ``index.json``, checksummed shards, the fill lock.

:class:`FeatureCache` owns one cache key's folder: it reads and writes the shards (fp16 tokens, the
mask, the CLS token where the backbone has one) and holds the fill lock while a process writes; the
index, the checksums checked before first use and the atomic writes are
:class:`~fusioner.engine.shards.ShardStore`'s (shared with the refiner store). What goes in and when
(the key, encoding stale items) is :mod:`fusioner.engine.cache`'s job; the module docstring there
says what keeps a cache current.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import Tensor

from fusioner.data.base import SegDataset
from fusioner.engine.shards import (
    INDEX,
    CorruptShardError,
    ShardKind,
    ShardStore,
    StoredItems,
    file_sha256,
    key_digest,
)
from fusioner.errors import FusionerError
from fusioner.io import atomic_write_json

# One logger for the cache, whichever of its two modules speaks.
log = logging.getLogger("fusioner.engine.cache")

LOCK = "fill.lock"  # held while a process fills the folder; never a shard, never in the index
HOLDER = "fill.lock.holder"  # pid, host and start time of the lock's holder, for the waiting message
# 2: items carry their dataset fingerprint and the key a vocabulary digest; format-1 folders are left alone.
# 3: each item also stores the backbone's CLS token (``<id>/cls``) when it has one (ZegCLIP reads it).
FORMAT = 3
_SHARDS = ShardKind("shard", "feature cache", redo="rebuilding the cache", required=("names",))


@dataclass
class CachedItem:
    tokens: Tensor  # gh gw c, fp16
    mask: Tensor  # s s, uint8 (the dataset's labels, 255 = ignore); int16 where labels do not fit
    names: tuple[str, ...]
    fingerprint: str = ""  # the dataset's item_fingerprint when it was encoded
    cls: Tensor | None = None  # c, fp16: the backbone's CLS token (None for backbones without one)


def _mask_dtype(mask: Tensor) -> torch.dtype:
    # uint8 holds labels 0..254 and 255 = ignore; name lists of 255 or more (ADE20K-847, Pascal
    # Context-459) have higher labels and ignore = -1, which uint8 would wrap onto other labels.
    if mask.numel() == 0 or (int(mask.min()) >= 0 and int(mask.max()) <= 255):
        return torch.uint8
    return torch.int16


class FeatureCache(StoredItems):
    """One cache key's folder: ``index.json`` + ``shard-NNNNN.safetensors`` (+ the fill lock)."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.key = key
        self.dir = Path(root) / f"{key['vision'].replace(':', '_').replace('/', '_')}-{key_digest(key)}"
        self._store = ShardStore(self.dir, key, _SHARDS, log)

    # -- index ------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read ``index.json`` if another process rewrote it; forget shards it no longer vouches for."""
        self._store.reload()

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self]

    def is_current(self, item_id: str, fingerprint: str) -> bool:
        """Whether ``item_id`` is cached from content whose fingerprint was ``fingerprint``."""
        entry = self._store.items.get(item_id)
        return entry is not None and entry.get("fingerprint") == fingerprint

    def fingerprint(self, item_id: str) -> str | None:
        """The dataset fingerprint ``item_id`` was encoded from; None when it is not cached."""
        entry = self._store.items.get(item_id)
        return None if entry is None else entry.get("fingerprint", "")

    def stale(self, dataset: SegDataset) -> list[tuple[int, str]]:
        """``(index, fingerprint)`` of each item of ``dataset`` not cached, or changed since it was."""
        out = []
        for i in range(len(dataset)):
            fingerprint = dataset.item_fingerprint(i)
            if not self.is_current(dataset.item_id(i), fingerprint):
                out.append((i, fingerprint))
        return out

    def size_bytes(self) -> int:
        return self._store.size_bytes()

    # -- the fill lock ----------------------------------------------------------------------
    @contextmanager
    def filling(self) -> Iterator[None]:
        """Hold the folder's fill lock; inside, the index is the latest on disk and no one else writes.

        A process that finds the lock taken says who holds it and waits: the holder is encoding the
        same images, and this one then reads them instead of encoding them again. Shards the index
        does not list (a killed fill's, an unreadable index's) are deleted on entry.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.dir / LOCK)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.warning(
                    "feature cache %s is being filled by %s; waiting for it to finish",
                    self.dir,
                    self._holder(),
                )
                lock.acquire()
        except OSError as e:
            raise FusionerError(
                f"cannot lock the feature cache {self.dir} to fill it ({e}); config key 'cache_dir' "
                "must name a writable folder"
            ) from None
        holder = self.dir / HOLDER
        try:
            atomic_write_json(
                holder,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
            self._store.tidy()
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def _holder(self) -> str:
        try:
            h = json.loads((self.dir / HOLDER).read_text())
            return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process (no readable {self.dir / HOLDER})"

    # -- writing ----------------------------------------------------------------------------
    def write_shard(self, items: dict[str, CachedItem]) -> Path:
        """Write one shard atomically, then record it (with its checksum) in the index.

        Items already cached point to the new shard afterwards; a shard left with no item is deleted.
        """
        tensors: dict[str, Tensor] = {}
        for item_id, item in items.items():
            tensors[f"{item_id}/tokens"] = item.tokens.to(torch.float16).contiguous().cpu()
            tensors[f"{item_id}/mask"] = item.mask.to(_mask_dtype(item.mask)).contiguous().cpu()
            if item.cls is not None:
                tensors[f"{item_id}/cls"] = item.cls.to(torch.float16).contiguous().cpu()
        entries = {
            item_id: {"names": list(item.names), "fingerprint": item.fingerprint, "cls": item.cls is not None}
            for item_id, item in items.items()
        }
        return self._store.write(tensors, entries)

    # -- reading ----------------------------------------------------------------------------
    def read(self, item_id: str) -> CachedItem:
        entry = self._store.entry(item_id)
        return CachedItem(
            self._store.tensor(item_id, f"{item_id}/tokens"),
            self._store.tensor(item_id, f"{item_id}/mask"),
            tuple(entry["names"]),
            entry.get("fingerprint", ""),
            self._store.tensor(item_id, f"{item_id}/cls") if entry.get("cls") else None,
        )

    def read_cls(self, item_id: str) -> Tensor | None:
        """The item's CLS token alone (None when its backbone has none): no tokens or mask read."""
        entry = self._store.entry(item_id)
        return self._store.tensor(item_id, f"{item_id}/cls") if entry.get("cls") else None

    def corrupt_shards(self) -> list[str]:
        """The indexed shards whose bytes do not match their checksum (each is hashed once)."""
        return self._store.corrupt()

    def verify(self) -> list[Path]:
        """Check every shard; drop bad ones from the index (their items become missing) and return them."""
        return self._store.verify()


__all__ = [
    "FORMAT",
    "HOLDER",
    "INDEX",
    "LOCK",
    "CachedItem",
    "CorruptShardError",
    "FeatureCache",
    "file_sha256",
]
