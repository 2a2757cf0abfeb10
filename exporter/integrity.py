"""Bundle integrity: every file is listed in the manifest with its size and sha256, and the manifest
itself is covered by `manifest.sha256`, a sidecar in `sha256sum` format (`<hex>  manifest.json`), so
that an app (or `cd BUNDLE && sha256sum -c manifest.sha256`) can check it with standard tools.

Checking a bundle: (1) sha256 of the bytes of manifest.json == the sidecar's; (2) every file the
manifest lists exists with its size and sha256. Any difference is an IntegrityError naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from exporter.bundle_format import MANIFEST, MANIFEST_CHECKSUM


class IntegrityError(ValueError):
    """A bundle file that is missing or differs from what its manifest records (one line for the user)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder (e.g. an .mlpackage): over its files' relative paths and hashes."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def bundle_files(root: Path) -> list[Path]:
    """Every file of a bundle except the manifest and its checksum, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name not in (MANIFEST, MANIFEST_CHECKSUM))


def file_entries(root: Path) -> dict[str, dict]:
    """The manifest's `files`: relative path -> {bytes, sha256}."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in bundle_files(root)}


def write_manifest(root: Path, manifest: dict) -> None:
    """Write manifest.json and its sha256 sidecar."""
    data = json.dumps(manifest, indent=1, allow_nan=False).encode()
    (Path(root) / MANIFEST).write_bytes(data)
    (Path(root) / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")


def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of manifest.json, checked against manifest.sha256. Raises FileNotFoundError without a manifest."""
    root = Path(root)
    data = (root / MANIFEST).read_bytes()
    try:
        line = (root / MANIFEST_CHECKSUM).read_text().split()
    except FileNotFoundError:
        raise IntegrityError(f"{root}: {MANIFEST_CHECKSUM} is missing, so the manifest cannot be checked "
                             f"(a bundle from an older build? rebuild it)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{root}: cannot read {MANIFEST_CHECKSUM} ({e.__class__.__name__})") from None
    if len(line) != 2 or line[1] != MANIFEST:
        raise IntegrityError(f"{root}: {MANIFEST_CHECKSUM} is not '<sha256>  {MANIFEST}'")
    if hashlib.sha256(data).hexdigest() != line[0]:
        raise IntegrityError(f"{root}: {MANIFEST} was altered (its sha256 differs from {MANIFEST_CHECKSUM})")
    return data


_checked: dict[tuple, bool] = {}  # files already hashed in this process, by (bundle, manifest, sizes, mtimes)


def check_files(root: Path, manifest: dict) -> None:
    """Raise IntegrityError naming the first listed file that is missing or altered.

    A bundle whose files were all hashed before in this process, unchanged since (same manifest, sizes
    and modification times), is not hashed again."""
    root = Path(root)
    stats = []
    for rel, info in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{root}: {rel} is missing")
        st = path.stat()
        if st.st_size != info["bytes"]:
            raise IntegrityError(f"{root}: {rel} was altered (size {st.st_size}, the manifest says {info['bytes']})")
        stats.append((rel, info["sha256"], st.st_size, st.st_mtime_ns, st.st_ino))
    key = (str(root.resolve()), tuple(stats))
    if key in _checked:
        return
    for rel, info in manifest["files"].items():
        if sha256_file(root / rel) != info["sha256"]:
            raise IntegrityError(f"{root}: {rel} was altered (sha256 differs from the manifest's)")
    _checked[key] = True


def resign(root: Path, manifest: dict) -> None:
    """Re-record every file's size and sha256 and rewrite the manifest and its checksum (tests and tools
    that deliberately change a bundle)."""
    manifest["files"] = file_entries(root)
    write_manifest(root, manifest)
