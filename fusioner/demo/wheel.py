"""A wheel of the fusioner that is running, for a Space that must install exactly this code.

The package index may hold no fusioner of this version (or none at all), so ``--export-space``
bundles the library it runs with. The wheel is built from the installed files and metadata, not
from a source tree: an editable checkout and a pip-installed copy give the same wheel, and no build
backend (or network) is needed. Pure Python, so ``py3-none-any``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import zipfile
from importlib.metadata import Distribution, distributions
from pathlib import Path

from fusioner.version import __version__

DIST = "fusioner"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# Fixed timestamps: the same files give a byte-identical wheel (a re-export changes nothing).
EPOCH = (2020, 1, 1, 0, 0, 0)


def installed() -> Distribution:
    """fusioner's installed metadata: a ``.dist-info`` (what pip wrote) over a checkout's stale
    ``fusioner.egg-info``, which the current folder can put first on sys.path."""
    found = list(distributions(name=DIST))
    if not found:
        from fusioner.errors import FusionerError

        raise FusionerError("fusioner is not installed (pip install -e .): there is no metadata to bundle")
    return next((d for d in found if d.read_text("METADATA") is not None), found[0])


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _package_files(top: str) -> list[tuple[str, Path]]:
    """(path in the wheel, file on disk) of every file of top-level package ``top``, caches skipped."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    files = []
    for path in sorted(root.rglob("*")):
        parts = set(path.relative_to(root).parts)
        if path.is_file() and not parts & SKIP_DIRS and path.suffix not in (".pyc", ".pyo"):
            files.append((f"{top}/{path.relative_to(root).as_posix()}", path))
    return files


def _metadata(dist: Distribution, version: str) -> str:
    """Core metadata 2.1: name, version and the declared requirements (extras included)."""
    meta = dist.metadata
    requires = list(dist.requires or [])
    extras = sorted(
        set(meta.get_all("Provides-Extra") or [])
        | set(re.findall(r'extra == "([^"]+)"', "\n".join(requires)))
    )
    lines = ["Metadata-Version: 2.1", f"Name: {DIST}", f"Version: {version}"]
    for key in ("Summary", "License", "Requires-Python"):
        if meta.get(key):
            lines.append(f"{key}: {meta[key]}")
    lines += [f"Provides-Extra: {e}" for e in extras]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n"


def runtime_requirements(extras: tuple[str, ...] = ("demo",)) -> list[str]:
    """The installed fusioner's requirements for ``extras`` (markers of other extras dropped)."""
    out = []
    for requirement in installed().requires or []:
        name, _, marker = requirement.partition(";")
        found = re.search(r'extra == "([^"]+)"', marker)
        if found and found.group(1) not in extras:
            continue
        rest = re.sub(r'\s*(and\s+)?extra == "[^"]+"(\s+and)?\s*', "", marker).strip()
        out.append(f"{name.strip()}; {rest}" if rest else name.strip())
    return out


def build_wheel(folder: Path) -> Path:
    """Write ``fusioner-<version>-py3-none-any.whl`` into ``folder``; returns its path."""
    dist = installed()
    version = __version__
    info = f"{DIST}-{version}.dist-info"
    tops = [t for t in (dist.read_text("top_level.txt") or DIST).split() if t]
    entries: dict[str, bytes] = {}
    for top in tops:
        for name, path in _package_files(top):
            entries[name] = path.read_bytes()
    entries[f"{info}/METADATA"] = _metadata(dist, version).encode()
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: fusioner export-space\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entries[f"{info}/top_level.txt"] = ("\n".join(tops) + "\n").encode()
    if points := dist.read_text("entry_points.txt"):
        entries[f"{info}/entry_points.txt"] = points.encode()
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in entries.items()]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{DIST}-{version}-py3-none-any.whl"
    tmp = wheel.with_name(f".{wheel.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            item = zipfile.ZipInfo(name, date_time=EPOCH)
            item.compress_type = zipfile.ZIP_DEFLATED
            item.external_attr = 0o644 << 16
            archive.writestr(item, data)
    tmp.replace(wheel)
    return wheel
