"""Peak bytes of the tensors a function allocates, on CPU: a TorchDispatchMode that counts each new
storage when an op creates it and forgets it when the storage is freed (weakref finalizer)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._seen or storage.nbytes() == 0:
                continue  # a view or an in-place result: no new memory
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def peak_allocated_bytes(fn, *args, **kwargs):
    """(fn(*args, **kwargs), peak bytes of tensors allocated during the call that were alive at once)."""
    tracker = _StorageTracker()
    with tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak
