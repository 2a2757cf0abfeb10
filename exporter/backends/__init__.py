"""Backends: one module per mobile runtime, each implementing `exporter.backends.base.Backend`."""
from __future__ import annotations

import importlib

from exporter.backends.base import Backend, LoweredGraph

# name -> module that defines `BACKEND`
_MODULES = {
    "executorch": "exporter.backends.executorch",
    "coreml": "exporter.backends.coreml",
    "ort": "exporter.backends.ort",
}
BACKEND_NAMES = tuple(_MODULES)


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise KeyError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


__all__ = ["Backend", "LoweredGraph", "BACKEND_NAMES", "get_backend"]
