"""Threads: one setting honoured by every runtime in this process and in the processes it starts.

`set_threads(n)` records n in `$ONDEVICE_LORA_THREADS` (inherited by subprocesses: the bench workers,
the XNNPACK heap probe) and applies it at once to what runs in-process:

  torch        `torch.set_num_threads`: the autograd baseline, the transformers + PEFT reference, eager graphs;
  NumPy BLAS   `threadpoolctl`: the MIL interpreter (Core ML bundles off macOS).

The runtimes read `threads()` when they start work:

  ONNX Runtime  `intra_op_num_threads` of every session it creates (`exporter.backends.ort.session_options`);
  ExecuTorch    its shared threadpool (XNNPACK's and the optimized kernels' workers), resized before the
                process loads its first program (resizing it later would leave loaded XNNPACK delegates
                holding the old pool, so a later change is refused: `ThreadsError`);
  Core ML       no thread setting exists: the OS schedules Core ML's CPU work (see the README).

Unset, every runtime uses the usable cores (the CPU affinity mask, which is what a container grants).
"""
from __future__ import annotations

import os

ENV = "ONDEVICE_LORA_THREADS"


class ThreadsError(RuntimeError):
    """A thread count that cannot be honoured."""


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def threads() -> int:
    """The thread count every runtime uses: `$ONDEVICE_LORA_THREADS`, else the usable cores."""
    value = os.environ.get(ENV, "")
    try:
        n = int(value)
    except ValueError:
        n = 0
    return n if n > 0 else usable_cores()


def set_threads(n: int | None) -> int:
    """Use n threads everywhere (None: the usable cores); returns the count in force."""
    import torch

    n = n or usable_cores()
    if n < 1:
        raise ThreadsError(f"a thread count must be at least 1, got {n}")
    os.environ[ENV] = str(n)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # without `with`: in force until changed
    except ImportError:  # pragma: no cover (a dependency)
        pass
    return n
