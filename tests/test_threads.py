"""`--threads`: one count honoured by every runtime (ONNX Runtime, ExecuTorch, the MIL interpreter's
BLAS) and by PyTorch (the reference and the autograd baseline)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from exporter import threads as T


def test_set_threads_applies_to_torch_numpy_and_onnxruntime():  # (conftest restores the setting after)
    from threadpoolctl import threadpool_info

    from exporter.backends.ort import session_options

    assert T.set_threads(1) == 1
    assert T.threads() == 1 and torch.get_num_threads() == 1
    assert session_options().intra_op_num_threads == 1
    assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    assert T.set_threads(None) == T.usable_cores() == T.threads()


def test_onnxruntime_pools_do_not_spin_between_runs():
    """A step runs many sessions back to back; a pool spin-waiting after its run takes the cores from the
    next session's (a mesp layer on the 2-core VM: 272 ms spinning, 148 ms not)."""
    from exporter.backends.ort import session_options

    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_unset_or_invalid_environment_means_the_usable_cores(monkeypatch):
    for value in (None, "", "0", "-3", "two"):
        if value is None:
            monkeypatch.delenv(T.ENV, raising=False)
        else:
            monkeypatch.setenv(T.ENV, value)
        assert T.threads() == T.usable_cores()


_EXECUTORCH = """
import sys
from executorch.extension.pybindings import portable_lib
from exporter.backends.executorch import use_threads
from exporter.threads import ThreadsError, set_threads
set_threads(1)
use_threads()
print(portable_lib._threadpool_get_thread_count())
set_threads(2)
try:
    use_threads()
except ThreadsError as e:
    print("refused:", e)
"""


def test_executorch_threadpool_follows_the_setting_and_refuses_a_late_change():
    done = subprocess.run([sys.executable, "-c", _EXECUTORCH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "1"
    assert lines[-1].startswith("refused: ExecuTorch already runs with 1 threads")


def test_every_harness_command_takes_threads_and_refuses_zero(capsys):
    from runtime_harness.cli import COMMANDS, main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([command, "--threads", "0"])
        assert e.value.code == 2
        assert "--threads: 0 is not a positive integer" in capsys.readouterr().err
