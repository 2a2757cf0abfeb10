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
# runtimes that run another backend's bundles: name -> (bundle backend, module, attribute)
_EXTRA_RUNTIMES = {"mil": ("coreml", "exporter.backends.coreml", "MIL_RUNTIME")}
RUNTIME_NAMES = BACKEND_NAMES + tuple(_EXTRA_RUNTIMES)


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise KeyError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


def get_runtime(runtime: str | None, backend: str) -> Backend:
    """The Backend whose `load` runs a `backend` bundle's graphs on `runtime` (None: the backend's own).
    Raises KeyError when that runtime cannot run that backend's graphs."""
    if runtime is None or runtime == backend:
        return get_backend(backend)
    if runtime in _EXTRA_RUNTIMES and _EXTRA_RUNTIMES[runtime][0] == backend:
        _, module, attribute = _EXTRA_RUNTIMES[runtime]
        return getattr(importlib.import_module(module), attribute)
    raise KeyError(f"a {backend} bundle cannot run on {runtime}")


__all__ = ["Backend", "LoweredGraph", "BACKEND_NAMES", "RUNTIME_NAMES", "get_backend", "get_runtime"]
