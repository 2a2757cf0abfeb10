"""Content-keyed cache of build artifacts (lowered programs and weight files), so that a rebuild with the
same inputs copies them instead of re-tracing and re-lowering. (Copies, not hard links: a bundle file
edited in place must never change the cache.)

Location: $ONDEVICE_LORA_CACHE, else $XDG_CACHE_HOME/ondevice-lora, else ~/.cache/ondevice-lora.
A key covers every input that changes the bytes: shapes, weights identity (a checkpoint's content
hash), backend, library versions and the source of the code that produces the graphs.

Every entry records the sha256 of each file it holds. Before reuse, the copy in the bundle is hashed
and compared; an entry that does not match (or records no hashes) is deleted and reported as a miss,
so the artifact is rebuilt and the cache repaired.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
from pathlib import Path

_PACKAGES = ("torch", "executorch", "coremltools", "onnx", "onnxscript", "onnxruntime-training")


def _versions() -> dict:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def code_digest(backend) -> str:
    """sha256 over the source of graphs/ (families included), the graph definitions and the ops they call
    (`quant_op`), the backend module and its sibling modules."""
    import graphs
    from exporter import graph_defs, quant_op

    h = hashlib.sha256()
    root = Path(graphs.__file__).parent
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.read_bytes())
    h.update(Path(graph_defs.__file__).read_bytes())
    h.update(Path(quant_op.__file__).read_bytes())
    h.update(inspect.getsource(type(backend)).encode())
    h.update(Path(inspect.getfile(type(backend))).read_bytes())
    for path in sorted(Path(inspect.getfile(type(backend))).parent.glob("*.py")):  # helpers (coreml_exact, ...)
        h.update(path.read_bytes())
    return h.hexdigest()


class CacheError(ValueError):
    """A cache entry that cannot be used; the message is one line naming the entry and `--no-cache`."""


def _broken(entry: Path, why: str) -> CacheError:
    return CacheError(f"the build cache entry {entry} is broken ({why}); delete it, or build with --no-cache")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _program_files(lowered: list[dict]) -> list[str]:
    """The files of a lowered program: each graph's file and external data (a file, or a .mlpackage folder)."""
    return sorted({g["file"] for g in lowered} | {g["external_data"] for g in lowered if g.get("external_data")})


class ArtifactCache:
    def __init__(self, root: Path | None, enabled: bool = True):
        self.root = Path(root) if root else None
        self.enabled = enabled and root is not None
        self.discarded: list[str] = []  # keys of entries that did not match their recorded hashes

    def _discard(self, key: str, copies: list[Path]) -> None:
        for path in copies:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        shutil.rmtree(self._dir(key), ignore_errors=True)
        if self._dir(key).exists():  # a broken entry that stays would be found again by every build
            raise _broken(self._dir(key), "its files do not match their recorded sha256 and it cannot be removed")
        self.discarded.append(key)

    def _verified(self, key: str, pairs: list[tuple[str, Path]], hashes: dict) -> bool:
        """Each copied file's sha256 equals the entry's record; otherwise the entry and the copies go."""
        from exporter.integrity import sha256_path

        for rel, copy in pairs:
            if rel not in hashes or sha256_path(copy) != hashes[rel]:
                self._discard(key, [c for _, c in pairs])
                return False
        return True

    @classmethod
    def default(cls) -> "ArtifactCache":
        root = os.environ.get("ONDEVICE_LORA_CACHE")
        if not root:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            root = os.path.join(base, "ondevice-lora")
        return cls(Path(root))

    @classmethod
    def disabled(cls) -> "ArtifactCache":
        return cls(None, enabled=False)

    def key(self, inputs: dict) -> str:
        payload = json.dumps({"inputs": inputs, "versions": _versions()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    # single files (weights)
    def fetch_file(self, key: str, target: Path) -> bool:
        if not self.enabled:
            return False
        src, record = self._dir(key) / "file", self._dir(key) / "sha256"
        if not src.is_file():
            return False
        try:
            hashes = {"file": record.read_text().strip()}
        except OSError:
            hashes = {}
        _copy(src, target)
        return self._verified(key, [("file", target)], hashes)

    def store_file(self, key: str, path: Path) -> None:
        if not self.enabled:
            return
        tmp = self._dir(key).with_name(self._dir(key).name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from exporter.integrity import sha256_path

            tmp.mkdir(parents=True)
            _copy(path, tmp / "file")
            (tmp / "sha256").write_text(sha256_path(path))
            tmp.rename(self._dir(key))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another build stored it first, or no space: not fatal

    # lowered programs: their files under graphs/ plus the manifest entries
    def fetch_program(self, key: str, stage: Path) -> list[dict] | None:
        if not self.enabled:
            return None
        d = self._dir(key)
        meta = d / "lowered.json"
        if not meta.is_file():
            return None
        try:
            lowered = json.loads(meta.read_text())
            hashes = json.loads((d / "sha256.json").read_text())
        except (OSError, ValueError):
            self._discard(key, [])
            return None
        pairs = []
        for rel in _program_files(lowered):
            if not (d / "files" / rel).exists():
                self._discard(key, [c for _, c in pairs])
                return None
            _copy(d / "files" / rel, stage / rel)
            pairs.append((rel, stage / rel))
        return lowered if self._verified(key, pairs, hashes) else None

    def store_program(self, key: str, stage: Path, lowered: list[dict]) -> None:
        if not self.enabled:
            return
        final = self._dir(key)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from exporter.integrity import sha256_path

            hashes = {}
            for rel in _program_files(lowered):
                _copy(stage / rel, tmp / "files" / rel)
                hashes[rel] = sha256_path(stage / rel)
            (tmp / "sha256.json").write_text(json.dumps(hashes))
            (tmp / "lowered.json").write_text(json.dumps(lowered))
            tmp.rename(final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
