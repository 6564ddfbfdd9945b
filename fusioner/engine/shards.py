"""A folder of checksummed safetensors files and the ``index.json`` that lists them.

Two stores keep per-image tensors this way: the feature cache (:mod:`fusioner.engine.cache_store`,
``shard-NNNNN.safetensors``) and the refiner inputs beside it (:mod:`fusioner.engine.refine_cache`,
``part-NNNNN.safetensors``). :class:`ShardStore` is what they share; each keeps what goes in, its
key and its lock. The index, with ``kind`` the files' prefix (``shard``, ``part``)::

    {"key": {...}, "<kind>s": {name: {"sha256": ..., "count": n}}, "items": {id: {"<kind>": name, ...}}}

What it guarantees:

* a file's SHA-256 is recorded when it is written and checked before its first use; a file that
  fails (missing, truncated, corrupted) raises :class:`CorruptShardError`, and :meth:`verify` drops
  it with its items;
* an index that is unreadable, or not of this shape, or names a file other than a bare
  ``<kind>-NNNNN.safetensors`` in the folder, is not trusted: the store starts empty, so a tampered
  index never has a path outside the folder opened or deleted;
* files are written atomically, then the index; :meth:`tidy` (under the owner's lock) deletes the
  files no index lists (a killed write's, an untrusted index's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fusioner.errors import FusionerError
from fusioner.io import atomic_write

INDEX = "index.json"

_log = logging.getLogger(__name__)
_NOT_AN_INDEX = "it is not a {what} index (key, {kind}s named {kind}-NNNNN.safetensors, items in them)"


class CorruptShardError(FusionerError):
    """A shard whose bytes do not match the checksum recorded when it was written."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    """12 hex digits of a store's key: the name of its folder."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ShardKind:
    """One store's files: ``prefix`` names them (``<prefix>-NNNNN.safetensors``, the index's
    ``<prefix>s`` and each item's ``<prefix>`` field), ``what`` names the store in messages
    ("feature cache"), ``redo`` says what its owner does about lost items ("rebuilding the cache"),
    ``required`` are the fields every item entry of a valid index has."""

    prefix: str
    what: str
    redo: str
    required: tuple[str, ...] = ()


class ShardStore:
    """One folder's ``index.json`` and the files it lists."""

    def __init__(
        self, folder: Path, key: dict[str, Any], kind: ShardKind, log: logging.Logger = _log
    ) -> None:
        self.dir, self.key, self.kind = Path(folder), key, kind.prefix
        self._what, self._redo, self._required, self._log = kind.what, kind.redo, kind.required, log
        # The only names this store writes. The index names files that get opened and, when their
        # checksum fails, deleted: a name with a separator, ``..`` or a drive would reach outside.
        self._name = re.compile(rf"{re.escape(kind.prefix)}-\d{{5,}}\.safetensors")
        self._handles: dict[str, Any] = {}
        self._verified: dict[str, str] = {}  # file -> the checksum it was verified against
        self._digest: str | None = None  # SHA-1 of the index.json bytes last read or written
        self._damaged = False  # the index.json on disk is unreadable (and not yet replaced)
        self._index = self._load(self._read_bytes())

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self._index[f"{self.kind}s"]

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        return self._index["items"]

    # -- the index --------------------------------------------------------------------------
    def _read_bytes(self) -> bytes | None:
        path = self.dir / INDEX
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FusionerError(f"cannot read {self._what} index {path}: {e}") from None

    def _valid(self, index: Any) -> bool:
        """Whether parsed JSON has the index's shape, every file a bare name inside the folder."""
        if not isinstance(index, dict) or not isinstance(index.get("key"), dict):
            return False
        shards, items = index.get(f"{self.kind}s"), index.get("items")
        if not isinstance(shards, dict) or not isinstance(items, dict):
            return False
        if not all(isinstance(name, str) and self._name.fullmatch(name) for name in shards):
            return False
        if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in shards.values()):
            return False
        return all(
            isinstance(v, dict)
            and isinstance(v.get(self.kind), str)
            and v[self.kind] in shards
            and all(f in v for f in self._required)
            for v in items.values()
        )

    def _load(self, raw: bytes | None) -> dict[str, Any]:
        path = self.dir / INDEX
        self._digest = hashlib.sha1(raw).hexdigest() if raw is not None else None
        self._damaged = False
        fresh: dict[str, Any] = {"key": self.key, f"{self.kind}s": {}, "items": {}}
        if raw is None:
            return fresh
        try:
            index = json.loads(raw.decode("utf-8"))
            problem = "" if self._valid(index) else _NOT_AN_INDEX.format(what=self._what, kind=self.kind)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = str(e)
        if problem:
            # Without the index no file can be matched to an image or checked against its checksum.
            self._log.warning(
                "%s index %s is unreadable (%s); its %ss can no longer be trusted: removing them and %s",
                self._what,
                path,
                problem,
                self.kind,
                self._redo,
            )
            self._damaged = True
            return fresh
        if index["key"] != self.key:
            self._log.warning("%s %s was written for another key; %s", self._what, self.dir, self._redo)
            return fresh
        return index

    def reload(self) -> None:
        """Re-read ``index.json`` if another process rewrote it; forget files it no longer vouches for."""
        raw = self._read_bytes()
        if (hashlib.sha1(raw).hexdigest() if raw is not None else None) == self._digest:
            return  # compared by content, not mtime: two rewrites within one clock tick look alike
        self._index = self._load(raw)
        for shard in list(self._handles) + list(self._verified):
            # A file dropped or rewritten under the same name must be opened and checked afresh.
            if shard not in self.shards or self._verified.get(shard) != self.shards[shard]["sha256"]:
                self._handles.pop(shard, None)
                self._verified.pop(shard, None)

    def _save(self) -> None:
        raw = (json.dumps(self._index, indent=2) + "\n").encode()
        atomic_write(self.dir / INDEX, lambda tmp: tmp.write_bytes(raw))
        self._digest = hashlib.sha1(raw).hexdigest()
        self._damaged = False

    def tidy(self) -> None:
        """The latest index, an unreadable one replaced, and the files it does not list deleted
        (with half-written temporaries). Only the holder of the owner's lock may."""
        self.reload()
        if self._damaged:
            self._save()
        for path in [*self.dir.glob(f"{self.kind}-*.safetensors"), *self.dir.glob(f".{self.kind}-*.tmp")]:
            if path.name not in self.shards:
                self._log.info("removing %s, which the %s index does not list", path, self._what)
                path.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum((self.dir / s).stat().st_size for s in self.shards)

    # -- reading ----------------------------------------------------------------------------
    def handle(self, shard: str) -> Any:
        """The file's ``safe_open`` handle, its checksum verified on first use."""
        expected = self.shards[shard]["sha256"]
        if self._verified.get(shard) != expected:
            path = self.dir / shard
            if not path.is_file() or file_sha256(path) != expected:
                raise CorruptShardError(f"{self._what} {self.kind} {path} is missing, truncated or corrupted")
            self._verified[shard] = expected
            self._handles.pop(shard, None)
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard]

    def entry(self, item_id: str) -> dict[str, Any]:
        entry = self.items.get(item_id)
        if entry is None:
            raise KeyError(f"{item_id!r} is not in the {self._what} {self.dir}")
        return entry

    def tensor(self, item_id: str, name: str) -> Tensor:
        """Tensor ``name`` of the file that holds ``item_id``."""
        return self.handle(self.entry(item_id)[self.kind]).get_tensor(name)

    def corrupt(self) -> list[str]:
        """The indexed files whose bytes do not match their checksum (each is hashed once)."""
        bad = []
        for shard in self.shards:
            try:
                self.handle(shard)
            except CorruptShardError:
                bad.append(shard)
        return bad

    def verify(self) -> list[Path]:
        """Check every file; drop bad ones from the index (their items become missing) and return them."""
        bad = self.corrupt()
        for shard in bad:
            self._log.warning(
                "%s %s %s is missing, truncated or corrupted; its items will be computed again",
                self._what,
                self.kind,
                self.dir / shard,
            )
            self._drop(shard)
        if bad:
            self._save()
        return [self.dir / shard for shard in bad]

    # -- writing ----------------------------------------------------------------------------
    def write(self, tensors: dict[str, Tensor], items: dict[str, dict[str, Any]]) -> Path:
        """Write ``tensors`` as one new file atomically, then record it (with its checksum) and
        ``items`` (each entry: the file's name, then its fields) in the index.

        Items already stored point to the new file afterwards; a file left with no item is deleted.
        """
        number = len(self.shards)
        while (name := f"{self.kind}-{number:05d}.safetensors") in self.shards or (self.dir / name).exists():
            number += 1
        path = atomic_write(self.dir / name, lambda tmp: save_file(tensors, str(tmp)))
        sha = file_sha256(path)
        self.shards[name] = {"sha256": sha, "count": len(items)}
        for item_id, fields in items.items():
            self.items[item_id] = {self.kind: name, **fields}
        used = {entry[self.kind] for entry in self.items.values()}
        for shard in [s for s in self.shards if s not in used]:
            self._drop(shard)
        self._save()
        self._verified[name] = sha
        return path

    def _drop(self, shard: str) -> None:
        self._handles.pop(shard, None)
        self._verified.pop(shard, None)
        del self.shards[shard]
        self._index["items"] = {k: v for k, v in self.items.items() if v[self.kind] != shard}
        (self.dir / shard).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps in their own process.
        return {**self.__dict__, "_handles": {}}


class StoredItems:
    """``item_id in owner`` and ``len(owner)`` for a class that keeps its items in ``self._store``."""

    _store: ShardStore

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._store.items

    def __len__(self) -> int:
        return len(self._store.items)


__all__ = [
    "INDEX",
    "CorruptShardError",
    "ShardKind",
    "ShardStore",
    "StoredItems",
    "file_sha256",
    "key_digest",
]
