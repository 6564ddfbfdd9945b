"""The feature cache's folder on disk: ``index.json``, checksummed shards, the fill lock.

:class:`FeatureCache` owns one cache key's folder: it reads and writes the shards (fp16 tokens, the
mask, the CLS token where the backbone has one), checks each shard's SHA-256 before first use, and
holds the fill lock while a process writes. What goes in and when (the key, encoding stale items)
is :mod:`fusioner.engine.cache`'s job; the module docstring there says what keeps a cache current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fusioner.data.base import SegDataset
from fusioner.errors import FusionerError
from fusioner.io import atomic_write, atomic_write_json

# One logger for the cache, whichever of its two modules speaks.
log = logging.getLogger("fusioner.engine.cache")


INDEX = "index.json"
LOCK = "fill.lock"  # held while a process fills the folder; never a shard, never in the index
HOLDER = "fill.lock.holder"  # pid, host and start time of the lock's holder, for the waiting message
# 2: items carry their dataset fingerprint and the key a vocabulary digest; format-1 folders are left alone.
# 3: each item also stores the backbone's CLS token (``<id>/cls``) when it has one (ZegCLIP reads it).
FORMAT = 3


class CorruptShardError(FusionerError):
    """A shard whose bytes do not match the checksum recorded when it was written."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


# The only shard names the cache ever writes. The index names files that get opened and, when their
# checksum fails, deleted: a name with a separator, ``..`` or a drive would reach outside the folder.
_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


_NOT_AN_INDEX = "it is not a cache index (key, shards named shard-NNNNN.safetensors, items in them)"


def _valid_index(index: Any) -> bool:
    """Whether parsed JSON has the index's shape: a key, shards with checksums, items in those shards,
    and every shard a bare ``shard-NNNNN.safetensors`` name inside the cache folder."""
    if not isinstance(index, dict) or not isinstance(index.get("key"), dict):
        return False
    shards, items = index.get("shards"), index.get("items")
    if not isinstance(shards, dict) or not isinstance(items, dict):
        return False
    if not all(isinstance(name, str) and _SHARD_NAME.fullmatch(name) for name in shards):
        return False
    if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in shards.values()):
        return False
    return all(isinstance(v, dict) and v.get("shard") in shards and "names" in v for v in items.values())


class FeatureCache:
    """One cache key's folder: ``index.json`` + ``shard-NNNNN.safetensors`` (+ the fill lock)."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        self.key = key
        self.dir = Path(root) / f"{key['vision'].replace(':', '_').replace('/', '_')}-{digest}"
        self._handles: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # shard -> the checksum it was verified against
        self._index_digest: str | None = None  # SHA-1 of the index.json bytes last read or written
        self._index_damaged = False  # the index.json on disk is unreadable (and not yet replaced)
        self._index = self._load_index(self._read_index_bytes())

    # -- index ------------------------------------------------------------------------------
    def _read_index_bytes(self) -> bytes | None:
        path = self.dir / INDEX
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FusionerError(f"cannot read feature cache index {path}: {e}") from None

    def _load_index(self, raw: bytes | None) -> dict[str, Any]:
        path = self.dir / INDEX
        self._index_digest = hashlib.sha1(raw).hexdigest() if raw is not None else None
        self._index_damaged = False
        fresh = {"key": self.key, "shards": {}, "items": {}}
        if raw is None:
            return fresh
        try:
            index = json.loads(raw.decode("utf-8"))
            problem = "" if _valid_index(index) else _NOT_AN_INDEX
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = str(e)
        if problem:
            # Without the index no shard can be matched to an image or checked against its checksum.
            log.warning(
                "feature cache index %s is unreadable (%s); its shards can no longer be trusted: "
                "removing them and rebuilding the cache",
                path,
                problem,
            )
            self._index_damaged = True
            return fresh
        if index["key"] != self.key:
            log.warning("cache %s was written for another key; rebuilding it", self.dir)
            return fresh
        return index

    def reload(self) -> None:
        """Re-read ``index.json`` if another process rewrote it; forget shards it no longer vouches for."""
        raw = self._read_index_bytes()
        if (hashlib.sha1(raw).hexdigest() if raw is not None else None) == self._index_digest:
            return  # compared by content, not mtime: two rewrites within one clock tick look alike
        self._index = self._load_index(raw)
        shards = self._index["shards"]
        for shard in list(self._handles) + list(self._verified):
            # A shard dropped or rewritten under the same name must be opened and checked afresh.
            if shard not in shards or self._verified.get(shard) != shards[shard]["sha256"]:
                self._handles.pop(shard, None)
                self._verified.pop(shard, None)

    def _save_index(self) -> None:
        raw = (json.dumps(self._index, indent=2) + "\n").encode()
        atomic_write(self.dir / INDEX, lambda tmp: tmp.write_bytes(raw))
        self._index_digest = hashlib.sha1(raw).hexdigest()
        self._index_damaged = False

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index["items"]

    def __len__(self) -> int:
        return len(self._index["items"])

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self]

    def is_current(self, item_id: str, fingerprint: str) -> bool:
        """Whether ``item_id`` is cached from content whose fingerprint was ``fingerprint``."""
        entry = self._index["items"].get(item_id)
        return entry is not None and entry.get("fingerprint") == fingerprint

    def fingerprint(self, item_id: str) -> str | None:
        """The dataset fingerprint ``item_id`` was encoded from; None when it is not cached."""
        entry = self._index["items"].get(item_id)
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
        return sum((self.dir / s).stat().st_size for s in self._index["shards"])

    # -- the fill lock ----------------------------------------------------------------------
    @contextmanager
    def filling(self) -> Iterator[None]:
        """Hold the folder's fill lock; inside, the index is the latest on disk and no one else writes.

        A process that finds the lock taken says who holds it and waits: the holder is encoding the
        same images, and this one then reads them instead of encoding them again.
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
            self.reload()
            if self._index_damaged:
                self._save_index()
            self._remove_orphans()
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

    def _remove_orphans(self) -> None:
        """Delete shards the index does not list and half-written temporaries; only the lock holder may.

        They come from a killed fill, an unreadable index or a key change, and no reader can reach them.
        """
        listed = self._index["shards"]
        for path in [*self.dir.glob("shard-*.safetensors"), *self.dir.glob(".shard-*.tmp")]:
            if path.name not in listed:
                log.info("removing %s, which the cache index does not list", path)
                path.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------------------
    def write_shard(self, items: dict[str, CachedItem]) -> Path:
        """Write one shard atomically, then record it (with its checksum) in the index.

        Items already cached point to the new shard afterwards; a shard left with no item is deleted.
        """
        name = f"shard-{len(self._index['shards']):05d}.safetensors"
        while (self.dir / name).exists() or name in self._index["shards"]:
            name = f"shard-{int(name[6:11]) + 1:05d}.safetensors"
        tensors: dict[str, Tensor] = {}
        for item_id, item in items.items():
            tensors[f"{item_id}/tokens"] = item.tokens.to(torch.float16).contiguous().cpu()
            tensors[f"{item_id}/mask"] = item.mask.to(_mask_dtype(item.mask)).contiguous().cpu()
            if item.cls is not None:
                tensors[f"{item_id}/cls"] = item.cls.to(torch.float16).contiguous().cpu()
        path = atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        sha = file_sha256(path)
        self._index["shards"][name] = {"sha256": sha, "count": len(items)}
        for item_id, item in items.items():
            self._index["items"][item_id] = {
                "shard": name,
                "names": list(item.names),
                "fingerprint": item.fingerprint,
                "cls": item.cls is not None,
            }
        used = {entry["shard"] for entry in self._index["items"].values()}
        for shard in [s for s in self._index["shards"] if s not in used]:
            self._drop_shard(shard)
        self._save_index()
        self._verified[name] = sha
        return path

    # -- reading ----------------------------------------------------------------------------
    def _handle(self, shard: str) -> Any:
        expected = self._index["shards"][shard]["sha256"]
        if self._verified.get(shard) != expected:
            path = self.dir / shard
            if not path.is_file() or file_sha256(path) != expected:
                raise CorruptShardError(f"feature cache shard {path} is missing, truncated or corrupted")
            self._verified[shard] = expected
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
            entry.get("fingerprint", ""),
            handle.get_tensor(f"{item_id}/cls") if entry.get("cls") else None,
        )

    def read_cls(self, item_id: str) -> Tensor | None:
        """The item's CLS token alone (None when its backbone has none): no tokens or mask read."""
        entry = self._index["items"].get(item_id)
        if entry is None:
            raise KeyError(f"{item_id!r} is not in the feature cache {self.dir}")
        return self._handle(entry["shard"]).get_tensor(f"{item_id}/cls") if entry.get("cls") else None

    def corrupt_shards(self) -> list[str]:
        """The indexed shards whose bytes do not match their checksum (each is hashed once)."""
        bad = []
        for shard in self._index["shards"]:
            try:
                self._handle(shard)
            except CorruptShardError:
                bad.append(shard)
        return bad

    def verify(self) -> list[Path]:
        """Check every shard; drop bad ones from the index (their items become missing) and return them."""
        bad = self.corrupt_shards()
        for shard in bad:
            log.warning(
                "feature cache shard %s is missing, truncated or corrupted; its images will be recomputed",
                self.dir / shard,
            )
            self._drop_shard(shard)
        if bad:
            self._save_index()
        return [self.dir / shard for shard in bad]

    def _drop_shard(self, shard: str) -> None:
        self._handles.pop(shard, None)
        self._verified.pop(shard, None)
        del self._index["shards"][shard]
        self._index["items"] = {k: v for k, v in self._index["items"].items() if v["shard"] != shard}
        (self.dir / shard).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps in their own process.
        return {**self.__dict__, "_handles": {}}
