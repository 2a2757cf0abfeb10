"""The MIL op table: one NumPy function per Core ML op type the exporter emits, with the semantics the
coremltools MIL op reference documents (coremltools.converters.mil.mil.ops.defs, iOS15-iOS18).

Every function takes the op's inputs as keyword arguments (numpy arrays, numpy scalars, or tuples of
them for variadic inputs such as `concat.values`; an optional input the op does not set is absent) and
returns one array, or a list for ops with several outputs (`split`). Floating-point ops compute in the
dtype of their inputs (float32 in our bundles, as Core ML does on the CPU); nothing is accumulated in
float64. Deliberately not coremltools' `value_inference`: it exists for constant folding (silu has
none, some reductions break on NumPy 2, results are cast to float32 regardless of the op's type).

Epsilons are applied exactly as each op defines them (`y = 1 / (x + epsilon)`, `1 / sqrt(x + epsilon)`,
`log(x + epsilon)`, defaults 1e-4, 1e-12, 1e-45), so the interpreter shows what a converted graph
computes, converter surprises included.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class MILError(RuntimeError):
    """An op the interpreter cannot run (unknown type, unsupported attribute, out-of-bounds index)."""


def _f(x):
    return np.asarray(x)


def _keep(dtype_of, value) -> np.ndarray:
    """Result in the dtype of the op's first input (T -> T ops); numpy scalars stay rank 0."""
    return np.asarray(value, dtype=np.asarray(dtype_of).dtype)


def _binary(fn: Callable) -> Callable:
    def op(x, y):
        x, y = _f(x), _f(y)
        with np.errstate(all="ignore"):
            return _keep(x, fn(x, y))
    return op


def _compare(fn: Callable) -> Callable:
    return lambda x, y: np.asarray(fn(_f(x), _f(y)))


def _unary(fn: Callable) -> Callable:
    def op(x):
        x = _f(x)
        with np.errstate(all="ignore"):
            return _keep(x, fn(x))
    return op


def _with_epsilon(fn: Callable, default: float) -> Callable:
    """inverse / rsqrt / log: the op's own epsilon, added to x in x's dtype before `fn`."""
    def op(x, epsilon=None):
        x = _f(x)
        eps = x.dtype.type(default if epsilon is None else epsilon)
        with np.errstate(all="ignore"):
            return _keep(x, fn(x + eps))
    return op


def sigmoid(x):
    x = _f(x)
    with np.errstate(over="ignore"):
        return _keep(x, 1 / (1 + np.exp(-x)))


def silu(x):
    x = _f(x)
    return _keep(x, x * sigmoid(x))


def gelu(x, mode="EXACT"):
    """Core ML's gelu: TANH_APPROXIMATION 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (GeGLU's
    gelu_pytorch_tanh); the other modes are refused rather than guessed."""
    x = _f(x)
    if str(mode) != "TANH_APPROXIMATION":
        raise MILError(f"gelu mode {mode!r} is not implemented by the NumPy interpreter")
    c = x.dtype.type(np.sqrt(2 / np.pi))
    with np.errstate(over="ignore"):
        return _keep(x, x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x))))


def pad(x, pad, mode="constant", constant_val=0.0):
    """Core ML's pad: `pad` holds (before, after) pairs for the last len(pad) / 2 axes; constant mode only."""
    x, pad = _f(x), np.asarray(pad).astype(np.int64).reshape(-1)
    if str(mode) != "constant":
        raise MILError(f"pad mode {mode!r} is not implemented by the NumPy interpreter")
    if pad.size % 2 or pad.size // 2 > x.ndim or (pad < 0).any():
        raise MILError(f"pad {pad.tolist()} does not fit a rank-{x.ndim} tensor")
    widths = [(0, 0)] * (x.ndim - pad.size // 2) + [tuple(p) for p in pad.reshape(-1, 2)]
    return _keep(x, np.pad(x, widths, constant_values=x.dtype.type(constant_val)))


def clip(x, alpha, beta):
    x = _f(x)
    return _keep(x, np.minimum(np.maximum(x, alpha), beta))


_CAST = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "int16": np.int16, "int8": np.int8,
         "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}


def cast(x, dtype):
    """Float -> int truncates toward zero (C conversion); anything -> bool is `x != 0`."""
    dtype = str(dtype)
    if dtype not in _CAST:
        raise MILError(f"cast to {dtype!r} is not supported")
    x = _f(x)
    return x != 0 if dtype == "bool" else x.astype(_CAST[dtype])


def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """(data - offset) * scale in float32, scale and offset repeated over blocks: data (N, K), scale / offset
    (N, G) -> block size K / G along each axis where they differ. (data - offset) is a small integer, exact."""
    data = np.asarray(data)
    scale = np.asarray(scale, dtype=np.float32)
    reps = [d // s for d, s in zip(data.shape, scale.shape)]
    q = data.astype(np.float32)
    if offset is not None:
        q = q - _blocks(np.asarray(offset).astype(np.float32), reps)
    return (q * _blocks(scale, reps)).astype(np.float32)


def _blocks(t: np.ndarray, reps: list[int]) -> np.ndarray:
    for axis, r in enumerate(reps):
        if r != 1:
            t = np.repeat(t, r, axis=axis)
    return t


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(int(a) % rank if rank else 0 for a in np.atleast_1d(axes))


def _reduce(fn: Callable) -> Callable:
    """reduce_*(x, axes=None: every axis, keep_dims=False)."""
    def op(x, axes=None, keep_dims=False):
        x = _f(x)
        ax = None if axes is None else _axes(axes, x.ndim)
        return _keep(x, fn(x, axis=ax, keepdims=bool(keep_dims)))
    return op


def softmax(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)) along `axis`; a row of -inf gives NaN (as torch does)."""
    x = _f(x)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
        return _keep(x, e / np.sum(e, axis=int(axis), keepdims=True))


def matmul(x, y, transpose_x=False, transpose_y=False):
    """x @ y with numpy broadcasting of the batch dims; the flags transpose the last two dims (rank >= 2)."""
    x, y = _f(x), _f(y)
    if transpose_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return _keep(x, np.matmul(x, y))


def linear(x, weight, bias=None):
    """x @ weight^T + bias; weight (out, in)."""
    x = _f(x)
    y = np.matmul(x, _f(weight).T)
    return _keep(x, y if bias is None else y + _f(bias))


def concat(values, axis, interleave=False):
    values = [_f(v) for v in values]
    axis = int(axis) % values[0].ndim
    if not interleave:
        return np.concatenate(values, axis=axis)
    # interleave: the i-th slices of every input along `axis`, in turn (all inputs the same shape)
    stacked = np.stack(values, axis=axis + 1)  # (..., D, n, ...)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def stack(values, axis):
    """The tensors (of one shape) stacked along a new axis `axis`."""
    return np.stack([_f(v) for v in values], axis=int(axis))


def expand_dims(x, axes):
    """New size-1 dims at `axes`, negative axes counted on the output rank."""
    return np.expand_dims(_f(x), tuple(int(a) for a in np.atleast_1d(axes)))


def squeeze(x, axes=None):
    x = _f(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


def reshape(x, shape):
    """`0` copies the input's dim (when len(shape) == rank(x)); one `-1` is inferred."""
    x = _f(x)
    shape = [int(s) for s in np.atleast_1d(shape)]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def transpose(x, perm):
    return np.transpose(_f(x), [int(p) for p in perm])


def tile(x, reps):
    x = _f(x)
    reps = [int(r) for r in np.atleast_1d(reps)]
    if len(reps) != x.ndim:
        raise MILError(f"tile: reps {reps} must have rank(x) = {x.ndim} entries")
    return np.tile(x, reps)


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """x[begin:end:stride] per dim; begin_mask -> from the start (the end for a negative stride), end_mask
    -> to the end, squeeze_mask -> the single index begin[i] (the dim is dropped). Negative begin/end count
    from the end; out-of-range bounds clamp as Python slices do."""
    x = _f(x)
    n = x.ndim
    stride = np.ones(n, int) if stride is None else np.atleast_1d(stride)
    bm = np.zeros(n, bool) if begin_mask is None else np.atleast_1d(begin_mask)
    em = np.zeros(n, bool) if end_mask is None else np.atleast_1d(end_mask)
    sm = np.zeros(n, bool) if squeeze_mask is None else np.atleast_1d(squeeze_mask)
    begin, end = np.atleast_1d(begin), np.atleast_1d(end)
    index = []
    for i in range(n):
        if sm[i]:
            b = int(begin[i])
            if not -x.shape[i] <= b < x.shape[i]:
                raise MILError(f"slice_by_index: squeezed index {b} out of range for dim {i} of size {x.shape[i]}")
            index.append(b)
        else:
            index.append(slice(None if bm[i] else int(begin[i]), None if em[i] else int(end[i]), int(stride[i])))
    return np.ascontiguousarray(x[tuple(index)])


def split(x, axis, num_splits=None, split_sizes=None):
    x = _f(x)
    axis = int(axis) % x.ndim
    if split_sizes is not None:
        sizes = [int(s) for s in np.atleast_1d(split_sizes)]
        if sum(sizes) != x.shape[axis]:
            raise MILError(f"split: sizes {sizes} do not add up to dim {axis} of size {x.shape[axis]}")
    else:
        count = int(num_splits)
        if x.shape[axis] % count:
            raise MILError(f"split: dim {axis} of size {x.shape[axis]} is not divisible into {count}")
        sizes = [x.shape[axis] // count] * count
    return [np.ascontiguousarray(p) for p in np.split(x, np.cumsum(sizes)[:-1], axis=axis)]


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    """x's slices along `axis` at `indices`. iOS17+: only 0 <= i < D[axis] is in bounds (negative indices
    too are out of bounds; with validate_indices=False Core ML's result for them is undefined): the
    interpreter raises for any out-of-bounds index rather than guess."""
    x, idx = _f(x), np.asarray(indices)
    axis = int(axis) % x.ndim
    if int(batch_dims) != 0:
        raise MILError("gather with batch_dims > 0 is not supported")
    bad = (idx < 0) | (idx >= x.shape[axis])
    if bad.any():
        raise MILError(f"gather: index {int(idx[bad].ravel()[0])} out of bounds for axis {axis} of size "
                       f"{x.shape[axis]} (validate_indices={bool(validate_indices)}; Core ML's result is undefined)")
    return np.take(x, idx, axis=axis)


def select(cond, a, b):
    """cond ? a : b, the three broadcast together."""
    a = _f(a)
    return np.asarray(np.where(_f(cond), a, b), dtype=a.dtype)


def range_1d(start, end, step):
    start = _f(start)
    return np.arange(start, end, step, dtype=start.dtype)


def fill(shape, value=0.0):
    value = _f(value)
    return np.full([int(s) for s in np.atleast_1d(shape)], value, dtype=value.dtype)


def fill_like(ref_tensor, value=0.0):
    value = _f(value)
    return np.full(_f(ref_tensor).shape, value, dtype=value.dtype)


def shape(x):
    return np.asarray(_f(x).shape, dtype=np.int32)


def _sign_floor_div(x, y):
    return np.floor_divide(x, y) if np.issubdtype(np.result_type(x, y), np.integer) else np.floor(x / y)


OPS: dict[str, Callable] = {
    # elementwise binary (numpy broadcasting, the dtype of x)
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "floor_div": _binary(_sign_floor_div), "mod": _binary(np.mod),
    "pow": _binary(np.power), "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    # comparisons and logic (bool)
    "equal": _compare(np.equal), "not_equal": _compare(np.not_equal), "less": _compare(np.less),
    "less_equal": _compare(np.less_equal), "greater": _compare(np.greater),
    "greater_equal": _compare(np.greater_equal), "logical_and": _compare(np.logical_and),
    "logical_or": _compare(np.logical_or),
    "logical_not": lambda x: np.logical_not(_f(x)),
    # elementwise unary
    "abs": _unary(np.abs), "cos": _unary(np.cos), "sin": _unary(np.sin), "exp": _unary(np.exp),
    "sqrt": _unary(np.sqrt), "tanh": _unary(np.tanh), "floor": _unary(np.floor),
    "inverse": _with_epsilon(lambda x: 1 / x, 1e-4), "rsqrt": _with_epsilon(lambda x: 1 / np.sqrt(x), 1e-12),
    "log": _with_epsilon(np.log, 1e-45),
    "sigmoid": sigmoid, "silu": silu, "gelu": gelu, "pad": pad, "clip": clip, "cast": cast,
    # reductions
    "reduce_sum": _reduce(np.sum), "reduce_mean": _reduce(np.mean), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min), "reduce_prod": _reduce(np.prod), "softmax": softmax,
    # linear algebra
    "matmul": matmul, "linear": linear,
    # shapes and indexing
    "concat": concat, "stack": stack, "expand_dims": expand_dims, "squeeze": squeeze, "reshape": reshape,
    "transpose": transpose, "tile": tile, "slice_by_index": slice_by_index, "split": split, "gather": gather,
    "select": select, "range_1d": range_1d, "fill": fill, "fill_like": fill_like, "shape": shape,
    # compressed constants (quantized weights)
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
}


def run_op(op_type: str, kwargs: dict):
    fn = OPS.get(op_type)
    if fn is None:
        raise MILError(f"MIL op {op_type!r} is not implemented by the NumPy interpreter "
                       f"(exporter/backends/mil_ops.py knows {len(OPS)} op types)")
    return fn(**kwargs)
