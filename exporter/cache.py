"""Content-keyed cache of build artifacts (lowered programs and weight files), so that a rebuild with the
same inputs copies them instead of re-tracing and re-lowering. (Copies, not hard links: a bundle file
edited in place must never change the cache.)

Location: $ONDEVICE_LORA_CACHE, else $XDG_CACHE_HOME/ondevice-lora, else ~/.cache/ondevice-lora.
A key covers every input that changes the bytes: shapes, weights identity, backend, library
versions and the source of the code that produces the graphs.
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
    """sha256 over the source of graphs/, the graph definitions, the backend module and its sibling modules."""
    import graphs
    from exporter import graph_defs

    h = hashlib.sha256()
    for path in sorted(Path(graphs.__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    h.update(Path(graph_defs.__file__).read_bytes())
    h.update(inspect.getsource(type(backend)).encode())
    h.update(Path(inspect.getfile(type(backend))).read_bytes())
    for path in sorted(Path(inspect.getfile(type(backend))).parent.glob("*.py")):  # helpers (coreml_exact, ...)
        h.update(path.read_bytes())
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


class ArtifactCache:
    def __init__(self, root: Path | None, enabled: bool = True):
        self.root = Path(root) if root else None
        self.enabled = enabled and root is not None

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
        src = self._dir(key) / "file"
        if not src.is_file():
            return False
        _copy(src, target)
        return True

    def store_file(self, key: str, path: Path) -> None:
        if not self.enabled:
            return
        tmp = self._dir(key).with_name(self._dir(key).name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            _copy(path, tmp / "file")
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
        lowered = json.loads(meta.read_text())
        for rel in sorted({g["file"] for g in lowered}):
            target = stage / rel
            if not target.exists():
                _copy(d / "files" / rel, target)
        return lowered

    def store_program(self, key: str, stage: Path, lowered: list[dict]) -> None:
        if not self.enabled:
            return
        final = self._dir(key)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel in sorted({g["file"] for g in lowered}):
                _copy(stage / rel, tmp / "files" / rel)
            for rel in sorted({g.get("external_data") for g in lowered if g.get("external_data")}):
                _copy(stage / rel, tmp / "files" / rel)
            (tmp / "lowered.json").write_text(json.dumps(lowered))
            tmp.rename(final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
