"""Replay a bundle's schedule through a runtime, exactly as an app would.

The schedule is data (see `exporter.schedule`); this interpreter knows three things only:
  * `fill` entries create a tensor in the store;
  * `call` entries gather inputs (store tensors, weights read from the bundle's safetensors files one
    call at a time, constants), cast them to the dtypes the graph declares, run the graph through the
    backend's runtime, write the outputs to the store, and drop the tensors named in `free`;
  * state tensors (LoRA parameters, optimizer state) persist across steps;
  * a program (file) the next `KEEP_LOADED` calls do not use is released after a call (its graphs' arenas
    go; it is loaded again when a later call needs it), as the README asks of an app, where the backend
    releases programs cheaply (ExecuTorch);
  * store tensors the manifest pages (`paged`: layer checkpoints, LoRA state, gradients, optimizer state)
    live in page files between calls (`PagedTensor`), read only for the call that takes them, so the
    process holds one call's tensors, as the README's paging contract asks of an app.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from exporter.backends import get_backend, get_runtime
from exporter.backends.base import GraphFn
from exporter.bundle_format import is_paged

KEEP_LOADED = 2  # a loaded program stays while one of the next KEEP_LOADED calls uses it
NP_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "float16": np.float16, "uint8": np.uint8}


def read_header(path: Path) -> tuple[int, dict]:
    """(data start, header) of a safetensors file: u64 little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return 8 + n, header
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"cannot read {path}: not a valid safetensors file ({e})") from None


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def read_tensor(path: Path, header: tuple[int, dict], name: str, rows: list[int] | None = None) -> np.ndarray:
    """One tensor (or rows [a, b) of it) read with plain file I/O into a fresh array.

    safetensors' own reader memory-maps the file, which leaves every page it touched resident (and
    counted in RSS) while the handle lives; reading exactly the bytes a call needs keeps the measured
    memory equal to what the call holds, as an app reading (or mapping) one layer at a time would."""
    start, meta = header
    try:
        info = meta[name]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = list(info["shape"])
        offset = start + info["data_offsets"][0]
        if rows is not None:
            row_items = int(np.prod(shape[1:], dtype=np.int64))
            offset += rows[0] * row_items * dtype.itemsize
            shape[0] = rows[1] - rows[0]
        return np.fromfile(path, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)
    except (KeyError, TypeError, IndexError, ValueError, OSError) as e:  # a name, dtype or size the file lacks
        raise BundleError(f"cannot read {name} from {path}: the file does not hold it as the manifest says "
                          f"({e.strerror if isinstance(e, OSError) else e})") from None


def _slice(ref: dict) -> tuple:
    """The index of a store slice {"tensor": NAME, "rows": [a, b]} or {"tensor": NAME, "cols": [a, b]}."""
    if "rows" in ref:
        return (slice(*ref["rows"]),)
    return (slice(None), slice(*ref["cols"]))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class PageDir:
    """A private scratch folder for page files (under $TMPDIR), removed with the last tensor or runner using it,
    at exit, and on the SIGTERM / SIGHUP / Ctrl-C that the CLIs turn into an exception."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="ondevice-lora-pages-")
        weakref.finalize(self, shutil.rmtree, self.path, True)


class PagedTensor:
    """A store tensor kept in a page file between the calls that use it (README, "Paged state").

    Written once, when a call outputs it; `np.asarray(t)` reads it into a fresh array for the call that takes
    it, and that array goes with the call's inputs. A new value is a new file, never a rewrite, so a shallow
    copy of the store (`dict(store)`) keeps the old value. The file is removed with the last reference."""

    __slots__ = ("pages", "path", "shape", "dtype", "__weakref__")

    def __init__(self, pages: PageDir, value: np.ndarray):
        value = np.ascontiguousarray(value)
        fd, self.path = tempfile.mkstemp(dir=pages.path, suffix=".page")
        weakref.finalize(self, _remove, self.path)
        with os.fdopen(fd, "wb") as f:
            value.tofile(f)
        self.pages, self.shape, self.dtype = pages, value.shape, value.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = np.fromfile(self.path, dtype=self.dtype).reshape(self.shape)
        return value if dtype is None else value.astype(dtype, copy=False)


def resident_bytes(store: dict) -> int:
    """Bytes of the store's tensors held in memory (page files excluded)."""
    return sum(v.nbytes for v in store.values() if not isinstance(v, PagedTensor))


class BundleError(ValueError):
    """A bundle, batch or adapter that cannot be used; the message is one line for the user."""


def load_manifest(bundle: Path, check_files: bool = True) -> dict:
    """Read `bundle/manifest.json`, check it against `manifest.sha256`, validate it (schema and schedule
    data flow) and, unless `check_files` is False, check every file it lists (size and sha256)."""
    from exporter import integrity
    from exporter.manifest import ManifestError, validate

    path = Path(bundle) / integrity.MANIFEST
    try:
        manifest = json.loads(integrity.read_manifest_bytes(bundle))
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a bundle (no manifest.json)") from None
    except integrity.IntegrityError as e:
        raise BundleError(str(e)) from None
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    try:
        validate(manifest)
    except ManifestError as e:
        raise BundleError(f"{bundle}: {e}") from None
    if check_files:
        check_bundle_files(bundle, manifest)
    return manifest


def check_bundle_files(bundle: Path, manifest: dict) -> None:
    """BundleError naming the first file the manifest lists that is missing or altered."""
    from exporter.integrity import IntegrityError, check_files

    try:
        check_files(bundle, manifest)
    except IntegrityError as e:
        raise BundleError(str(e)) from None


@dataclass
class CallRecord:
    index: int
    graph: str
    layer: int | None
    seconds: float
    store_bytes: int  # resident (not paged) store tensors after the call's outputs exist, before frees
    weights_bytes: int  # weights read from files for this call


@dataclass
class StepTrace:
    calls: list[CallRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)


class BundleRunner:
    """Runs a bundle's graphs with the runtime of its backend, or `runtime` where it can run them (`mil`:
    the NumPy MIL interpreter runs Core ML bundles on any OS). `self.backend.runtime` says which ran."""

    def __init__(self, bundle: Path, runtime: str | None = None, check_files: bool = True,
                 backend_instance=None):
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle, check_files)
        backend = self.manifest["backend"]
        if backend_instance is not None:  # a configured runtime of the bundle's backend (a profiling ORT)
            self.backend = backend_instance
        elif runtime is None or runtime == backend:
            self.backend = get_backend(backend)
        else:
            try:
                self.backend = get_runtime(runtime, backend)
            except KeyError:
                raise BundleError(f"{self.bundle} is a {backend} bundle; it cannot run on {runtime} "
                                  f"(build it with --backend {runtime})") from None
        self._fns: dict[str, GraphFn] = {}
        self._patterns = tuple(self.manifest.get("paged", ()))
        self._pages: PageDir | None = None
        self._release_plans: dict[str, dict[int, set[str]]] = {}

    # -- paged store tensors
    def paged(self, name: str) -> bool:
        """True when the manifest pages store tensor `name`."""
        return bool(self._patterns) and is_paged(name, self._patterns)

    def put(self, store: dict, name: str, value: np.ndarray) -> None:
        """store[name] = value, into a page file when the manifest pages `name`."""
        if self.paged(name):
            if self._pages is None:
                self._pages = PageDir()
            value = PagedTensor(self._pages, value)
        store[name] = value

    # -- graphs
    def graph_fn(self, graph_id: str) -> GraphFn:
        if graph_id not in self._fns:
            self._fns[graph_id] = self.backend.load(self.bundle, self.manifest["graphs"][graph_id])
        return self._fns[graph_id]

    def release_plan(self, schedule: str) -> dict[int, set[str]]:
        """Schedule index of a call -> the program files to release after it: those the next `KEEP_LOADED`
        calls do not use (after the step's last call, every file). Empty for a backend that keeps its graphs
        loaded (`Backend.releases_programs`)."""
        if not self.backend.releases_programs:
            return {}
        if schedule not in self._release_plans:
            entries = self.manifest["schedules"][schedule]
            calls = [(k, self.manifest["graphs"][e["graph"]]["file"]) for k, e in enumerate(entries) if e["op"] == "call"]
            used = {f for _, f in calls}
            self._release_plans[schedule] = {
                k: used - {f for _, f in calls[n + 1:n + 1 + KEEP_LOADED]} for n, (k, _) in enumerate(calls)}
        return self._release_plans[schedule]

    def release(self, files: set[str]) -> None:
        """Drop the loaded graphs of `files` and let the runtime free what it holds for them."""
        for gid in [g for g in self._fns if self.manifest["graphs"][g]["file"] in files]:
            del self._fns[gid]
            file = self.manifest["graphs"][gid]["file"]
            if not any(self.manifest["graphs"][g]["file"] == file for g in self._fns):
                self.backend.release(self.bundle, file)

    def load_all(self) -> None:
        """Load every graph once, so that the runtime's one-time start-up stays out of timing and memory (a step
        still releases and reloads programs as `release_plan` says)."""
        for gid in self.manifest["graphs"]:
            self.graph_fn(gid)

    # -- state
    def initial_state(self, adapter_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """State tensors: LoRA parameters from PEFT-named adapter tensors, optimizer state filled."""
        store = {}
        for t in self.manifest["state"]:
            init = t["init"]
            if "adapter" in init:
                if init["adapter"] not in adapter_tensors:
                    raise BundleError(f"adapter lacks {init['adapter']}")
                value = np.asarray(adapter_tensors[init["adapter"]], dtype=NP_DTYPES[t["dtype"]])
                if list(value.shape) != t["shape"]:
                    raise BundleError(f"adapter tensor {init['adapter']} has shape {list(value.shape)}, "
                                      f"the bundle needs {t['shape']} (another rank or model?)")
                self.put(store, t["name"], value.copy())
            else:
                self.put(store, t["name"], np.full(t["shape"], float(init["fill"]), dtype=NP_DTYPES[t["dtype"]]))
        return store

    # -- ONNX Runtime's training API (schedule train_step_ort_api)
    def _ort_training_step(self, entry: dict, store: dict[str, np.ndarray]) -> None:
        """Parameters from the store into ORT's CheckpointState, the gradients into Module, Optimizer.step,
        the updated parameters back into the store (the order the README documents)."""
        if getattr(self, "_ort_api", None) is None:
            from onnxruntime.training.api import CheckpointState, Module, Optimizer

            info = self.manifest["ort_training"]
            state = CheckpointState.load_checkpoint(str(self.bundle / info["checkpoint"]))
            module = Module(str(self.bundle / info["training_model"]), state, device="cpu")  # before any set:
            optimizer = Optimizer(str(self.bundle / info["optimizer_model"]), module)  # (else a segfault)
            self._ort_api = (state, module, optimizer)
        state, module, optimizer = self._ort_api
        for name in entry["parameters"]:
            state.parameters[name].data = np.ascontiguousarray(store[name], dtype=np.float32)
        module.train()
        module.lazy_reset_grad()
        module(*[np.ascontiguousarray(store[g], dtype=np.float32) for g in entry["gradients"]])
        optimizer.set_learning_rate(float(np.asarray(store[entry["lr"]]).reshape(-1)[0]))
        optimizer.step()
        for name in entry["parameters"]:
            self.put(store, name, np.array(state.parameters[name].data, dtype=np.float32))

    # -- one schedule
    def _weight(self, source: dict, headers: dict) -> np.ndarray:
        path = self.bundle / source["file"]
        if path not in headers:
            headers.clear()
            headers[path] = read_header(path)
        return read_tensor(path, headers[path], source["tensor"], source.get("rows"))

    def run(self, schedule: str, store: dict[str, np.ndarray], on_call: Callable[[CallRecord], None] | None = None,
            keep: Callable[[str], bool] | None = None) -> StepTrace:
        """Interpret `schedules[schedule]` on `store` (modified in place). Returns per-call timings.

        A paged tensor in `store` is a `PagedTensor` (`np.asarray` reads it).
        `keep(name)` True keeps a tensor the schedule would free (e.g. LoRA gradients, to compare them)."""
        trace = StepTrace()
        files: dict = {}  # the safetensors header of the weight file in use
        release = self.release_plan(schedule)

        def finish(entry: dict, record: CallRecord) -> None:
            """After a call: drop the names it frees (unless kept) and the programs the next calls do not use,
            record it, report it (a memory probe then restarts its peak without them)."""
            for name in entry["free"]:
                if keep is None or not keep(name):
                    store.pop(name, None)
            self.release(release.get(record.index, set()))
            trace.calls.append(record)
            if on_call is not None:
                on_call(record)

        for index, entry in enumerate(self.manifest["schedules"][schedule]):
            if entry["op"] == "fill":
                self.put(store, entry["tensor"], np.full(entry["shape"], float(entry["value"]), NP_DTYPES[entry["dtype"]]))
                continue
            if entry["op"] == "ort_training_step":
                t0 = time.perf_counter()
                self._ort_training_step(entry, store)
                finish(entry, CallRecord(index, "ort_training_step", None, time.perf_counter() - t0,
                                         resident_bytes(store), 0))
                continue
            graph = self.manifest["graphs"][entry["graph"]]
            args, weight_bytes = [], 0
            for spec in graph["inputs"]:
                source = entry["inputs"][spec["name"]]
                if isinstance(source, str):
                    value = store[source]
                elif "file" in source:
                    value = self._weight(source, files)
                    weight_bytes += value.nbytes
                elif "tensor" in source:  # rows or columns of a store tensor
                    value = np.asarray(store[source["tensor"]])[_slice(source)]
                else:
                    value = np.asarray(source["value"])
                args.append(np.ascontiguousarray(value, dtype=NP_DTYPES[spec["dtype"]]))
            fn = self.graph_fn(entry["graph"])
            t0 = time.perf_counter()
            outputs = fn(args)
            seconds = time.perf_counter() - t0
            del args
            for spec, value in zip(graph["outputs"], outputs):
                target = entry["outputs"][spec["name"]]
                if not isinstance(target, str):  # into rows or columns of a store tensor: a new value of it
                    whole = np.array(store[target["tensor"]])
                    whole[_slice(target)] = value
                    target, value = target["tensor"], whole
                self.put(store, target, value)
            fn = outputs = value = None  # nothing of the call outlives it but the store (a released
            #                               program must not stay alive through `fn`)
            finish(entry, CallRecord(index, entry["graph"], entry.get("layer"), seconds,
                                     resident_bytes(store), weight_bytes))
        files.clear()
        return trace

    def step(self, store: dict[str, np.ndarray], input_ids: np.ndarray, labels: np.ndarray, lr: float,
             schedule: str = "train_step", on_call=None, keep=None) -> tuple[float, StepTrace]:
        """One schedule run on a batch; returns (loss, trace). State in `store` is updated in place."""
        store["batch.input_ids"] = np.asarray(input_ids, dtype=np.int64)
        store["batch.labels"] = np.asarray(labels, dtype=np.int64)
        store["lr"] = np.asarray([lr], dtype=np.float32)
        trace = self.run(schedule, store, on_call, keep)
        loss = float(np.asarray(store.pop("loss")).reshape(-1)[0])
        for name in ("batch.input_ids", "batch.labels", "lr"):
            store.pop(name, None)
        return loss, trace
