"""The NumPy MIL interpreter (exporter/backends/mil_ops.py, mil_runtime.py) and the build-time exactness
check (coreml_exact.py): one op-table test per op type on its edge cases, against NumPy/torch written
out independently; coremltools' private milproto loader on a multifunction package with blob weights;
an unknown op named in the error; the epsilon rule on programs built with coremltools' MIL builder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from exporter.backends import coreml_exact  # noqa: E402
from exporter.backends.mil_ops import OPS, MILError, run_op  # noqa: E402

f32 = np.float32
rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape).astype(f32)


def test_elementwise_binary_broadcast_and_keep_dtype():
    x, y = r(2, 1, 3), r(4, 1)
    for op, fn in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("real_div", np.divide),
                   ("maximum", np.maximum), ("minimum", np.minimum)):
        got = run_op(op, {"x": x, "y": y})
        assert got.shape == (2, 4, 3) and got.dtype == f32
        np.testing.assert_array_equal(got, fn(x, y), err_msg=op)
    # a float32 scalar constant keeps float32 (NumPy 2 promotion would not widen, but check it)
    assert run_op("mul", {"x": x, "y": f32(4.0)}).dtype == f32
    np.testing.assert_array_equal(run_op("pow", {"x": f32(10000.0), "y": np.array([0, .5], f32)}), [1, 100])
    np.testing.assert_array_equal(run_op("pow", {"x": x, "y": f32(2.0)}), x * x)


def test_floor_div_and_mod_on_negative_integers():
    x, y = np.array([7, -7, 16], np.int32), np.int32(2)
    np.testing.assert_array_equal(run_op("floor_div", {"x": x, "y": y}), [3, -4, 8])
    assert run_op("floor_div", {"x": x, "y": y}).dtype == np.int32
    np.testing.assert_array_equal(run_op("floor_div", {"x": np.array([-7.], f32), "y": f32(2)}), [-4.])
    np.testing.assert_array_equal(run_op("mod", {"x": x, "y": np.int32(3)}), [1, 2, 1])


def test_comparisons_and_logic_broadcast_to_bool():
    x, y = np.arange(6, dtype=np.int32).reshape(2, 3), np.int32(2)
    for op, fn in (("greater_equal", np.greater_equal), ("less", np.less), ("not_equal", np.not_equal),
                   ("equal", np.equal), ("greater", np.greater), ("less_equal", np.less_equal)):
        got = run_op(op, {"x": x, "y": y})
        assert got.dtype == bool
        np.testing.assert_array_equal(got, fn(x, y), err_msg=op)
    a, b = np.array([[True], [False]]), np.array([True, False, True])
    np.testing.assert_array_equal(run_op("logical_and", {"x": a, "y": b}), a & b)
    np.testing.assert_array_equal(run_op("logical_or", {"x": a, "y": b}), a | b)
    np.testing.assert_array_equal(run_op("logical_not", {"x": b}), ~b)


def test_unary_ops_match_torch_float32():
    x = np.linspace(-30, 30, 1001, dtype=f32)  # sigmoid/silu saturate at both ends without overflow warnings
    t = torch.from_numpy(x)
    for op, ref in (("sigmoid", torch.sigmoid), ("silu", torch.nn.functional.silu), ("cos", torch.cos),
                    ("sin", torch.sin), ("exp", torch.exp), ("tanh", torch.tanh), ("abs", torch.abs)):
        got = run_op(op, {"x": x})
        assert got.dtype == f32
        np.testing.assert_allclose(got, ref(t).numpy(), rtol=2e-6, atol=1e-37, err_msg=op)
    pos = np.abs(x) + f32(0.5)
    np.testing.assert_allclose(run_op("sqrt", {"x": pos}), np.sqrt(pos), rtol=0)
    np.testing.assert_array_equal(run_op("clip", {"x": x, "alpha": f32(1), "beta": f32(3.4028235e38)}),
                                  np.maximum(x, 1))


def test_gelu_tanh_matches_torch_and_other_modes_are_refused():
    x = np.linspace(-12, 12, 1001, dtype=f32)
    got = run_op("gelu", {"x": x, "mode": "TANH_APPROXIMATION"})
    assert got.dtype == f32
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-7)
    with pytest.raises(MILError, match="gelu mode 'EXACT'"):
        run_op("gelu", {"x": x, "mode": "EXACT"})


def test_pad_constant_on_the_last_axes_and_other_modes_refused():
    x = np.arange(6, dtype=f32).reshape(1, 2, 3)
    got = run_op("pad", {"x": x, "pad": np.array([1, 0, 0, 2], np.int32), "mode": "constant", "constant_val": f32(0)})
    np.testing.assert_array_equal(got, torch.nn.functional.pad(torch.from_numpy(x), (0, 2, 1, 0)).numpy())
    assert got.dtype == f32
    with pytest.raises(MILError, match="reflect"):
        run_op("pad", {"x": x, "pad": np.array([1, 1], np.int32), "mode": "reflect"})
    with pytest.raises(MILError, match="does not fit"):
        run_op("pad", {"x": x, "pad": np.array([1, 1, 1], np.int32)})


def test_epsilon_ops_use_their_own_epsilon_exactly():
    x = np.array([1e-4, 1.0, 100.0], f32)
    np.testing.assert_array_equal(run_op("inverse", {"x": x, "epsilon": f32(1e-4)}), f32(1) / (x + f32(1e-4)))
    np.testing.assert_array_equal(run_op("inverse", {"x": x}), f32(1) / (x + f32(1e-4)))  # the default
    np.testing.assert_array_equal(run_op("inverse", {"x": x, "epsilon": f32(0)}), f32(1) / x)
    assert run_op("inverse", {"x": x})[0] == pytest.approx(5000, rel=1e-6)  # 1 / (1e-4 + 1e-4)
    np.testing.assert_array_equal(run_op("rsqrt", {"x": x}), f32(1) / np.sqrt(x + f32(1e-12)))
    np.testing.assert_array_equal(run_op("rsqrt", {"x": x, "epsilon": f32(0)}), f32(1) / np.sqrt(x))
    np.testing.assert_array_equal(run_op("log", {"x": x, "epsilon": f32(1.0)}), np.log(x + f32(1)))  # log1p
    assert run_op("log", {"x": np.zeros(1, f32)})[0] == np.log(f32(1e-45))  # default eps: finite at 0


def test_cast():
    np.testing.assert_array_equal(run_op("cast", {"x": np.array([True, False]), "dtype": "fp32"}), [1., 0.])
    np.testing.assert_array_equal(run_op("cast", {"x": np.array([-1.7, 2.9], f32), "dtype": "int32"}), [-1, 2])
    np.testing.assert_array_equal(run_op("cast", {"x": np.array([0., 2.], f32), "dtype": "bool"}), [False, True])
    with pytest.raises(MILError, match="complex"):
        run_op("cast", {"x": np.zeros(1, f32), "dtype": "complex64"})


def test_reductions_axes_keep_dims_and_none():
    x = r(2, 3, 4)
    for op, fn in (("reduce_sum", np.sum), ("reduce_mean", np.mean), ("reduce_max", np.max),
                   ("reduce_min", np.min), ("reduce_prod", np.prod)):
        got = run_op(op, {"x": x, "axes": np.array([-1], np.int32), "keep_dims": np.True_})
        assert got.shape == (2, 3, 1) and got.dtype == f32
        np.testing.assert_allclose(got, fn(x, axis=-1, keepdims=True), rtol=1e-6, err_msg=op)
        assert run_op(op, {"x": x, "axes": np.array([0, 2], np.int32)}).shape == (3,)
        assert run_op(op, {"x": x, "keep_dims": np.False_}).shape == ()  # no axes: all of them


def test_softmax_axis_and_all_minus_inf_rows():
    x = r(2, 3, 5)
    x[0, 1] = -np.inf  # a fully masked row: NaN, as torch gives
    x[1, 2, :4] = -np.inf  # one finite entry: exactly one-hot
    for axis in (-1, 1):
        got = run_op("softmax", {"x": x, "axis": np.int32(axis)})
        want = torch.softmax(torch.from_numpy(x), dim=axis).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)
    got = run_op("softmax", {"x": x, "axis": np.int32(-1)})
    assert np.isnan(got[0, 1]).all() and got[1, 2, 4] == 1 and not np.isnan(got[1]).any()


def test_matmul_transpose_flags_broadcast_and_linear():
    a, b = r(4, 3, 5), r(6, 5)
    np.testing.assert_allclose(run_op("matmul", {"x": a, "y": b, "transpose_x": np.False_,
                                                 "transpose_y": np.True_}), a @ b.T, rtol=1e-5)
    c = r(5, 3)
    np.testing.assert_allclose(run_op("matmul", {"x": c, "y": r(5, 2), "transpose_x": np.True_}).shape, (3, 2))
    np.testing.assert_allclose(run_op("matmul", {"x": r(2, 1, 3, 4), "y": r(5, 4, 2)}).shape, (2, 5, 3, 2))
    w, bias = r(7, 5), r(7)
    np.testing.assert_allclose(run_op("linear", {"x": a, "weight": w, "bias": bias}), a @ w.T + bias, rtol=1e-5)
    np.testing.assert_allclose(run_op("linear", {"x": a, "weight": w}), a @ w.T, rtol=1e-5)


def test_floor_on_negatives_halves_and_integers():
    x = np.array([-1.5, -1.0, -0.25, 0.0, 0.5, 15.9375, 255.0], f32)
    got = run_op("floor", {"x": x})
    np.testing.assert_array_equal(got, [-2, -1, -1, 0, 0, 15, 255])
    assert got.dtype == f32


def test_stack_adds_a_new_axis():
    a, b = r(2, 3), r(2, 3)
    for axis in (0, -1, 2):
        np.testing.assert_array_equal(run_op("stack", {"values": (a, b), "axis": np.int32(axis)}),
                                      np.stack([a, b], axis))


def test_constexpr_blockwise_shift_scale_is_offset_then_scale_per_block():
    """(data - offset) * scale, scale and offset repeated over blocks of columns (K / G) and rows (N / N')."""
    data = rng.integers(0, 16, (4, 8)).astype(np.uint8)
    scale, offset = r(4, 2), rng.integers(0, 16, (4, 2)).astype(np.uint8)
    got = run_op("constexpr_blockwise_shift_scale", {"data": data, "scale": scale, "offset": offset})
    want = (data.astype(f32) - np.repeat(offset, 4, 1).astype(f32)) * np.repeat(scale, 4, 1)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == f32
    per_row = run_op("constexpr_blockwise_shift_scale", {"data": data, "scale": r(2, 1)})  # no offset
    assert per_row.shape == (4, 8)


def test_concat_and_interleave():
    a, b = r(2, 3), r(2, 3)
    np.testing.assert_array_equal(run_op("concat", {"values": (a, b), "axis": np.int32(-1)}), np.concatenate([a, b], 1))
    got = run_op("concat", {"values": (a, b), "axis": np.int32(0), "interleave": np.True_})
    np.testing.assert_array_equal(got, np.stack([a[0], b[0], a[1], b[1]]))


def test_shape_ops():
    x = r(1, 2, 1, 4)
    assert run_op("expand_dims", {"x": r(3), "axes": np.array([-1], np.int32)}).shape == (3, 1)
    assert run_op("expand_dims", {"x": r(3), "axes": np.array([0, 2], np.int32)}).shape == (1, 3, 1)
    assert run_op("squeeze", {"x": x, "axes": np.array([2], np.int32)}).shape == (1, 2, 4)
    assert run_op("squeeze", {"x": x}).shape == (2, 4)
    np.testing.assert_array_equal(run_op("reshape", {"x": x, "shape": np.array([0, -1, 4, 1], np.int32)}),
                                  x.reshape(1, 2, 4, 1))  # 0 copies the input's dim
    np.testing.assert_array_equal(run_op("transpose", {"x": x, "perm": np.array([0, 2, 1, 3], np.int32)}),
                                  x.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(run_op("tile", {"x": x, "reps": np.array([1, 1, 3, 1], np.int32)}),
                                  np.tile(x, (1, 1, 3, 1)))
    with pytest.raises(MILError, match="reps"):
        run_op("tile", {"x": x, "reps": np.array([2], np.int32)})
    np.testing.assert_array_equal(run_op("shape", {"x": x}), [1, 2, 1, 4])
    assert run_op("shape", {"x": x}).dtype == np.int32


def test_slice_by_index_masks_strides_negative_and_clamped():
    x = np.arange(4 * 96, dtype=f32).reshape(4, 96)
    got = run_op("slice_by_index", {"x": x, "begin": np.array([0, 24], np.int32), "end": np.array([4, 48], np.int32),
                                    "end_mask": np.array([True, False])})
    np.testing.assert_array_equal(got, x[:, 24:48])
    got = run_op("slice_by_index", {"x": x, "begin": np.array([3, -10], np.int32), "end": np.array([0, 200], np.int32),
                                    "begin_mask": np.array([True, False]), "end_mask": np.array([False, False]),
                                    "stride": np.array([2, 3], np.int32)})
    np.testing.assert_array_equal(got, x[:0:2, -10:200:3])  # begin_mask -> 0; end 200 clamps
    got = run_op("slice_by_index", {"x": x, "begin": np.array([-1, 0], np.int32), "end": np.array([0, 0], np.int32),
                                    "end_mask": np.array([False, True]), "squeeze_mask": np.array([True, False])})
    np.testing.assert_array_equal(got, x[-1])
    got = run_op("slice_by_index", {"x": x, "begin": np.array([0, 0], np.int32), "end": np.array([0, 0], np.int32),
                                    "begin_mask": np.array([True, True]), "end_mask": np.array([True, True]),
                                    "stride": np.array([-1, 1], np.int32)})
    np.testing.assert_array_equal(got, x[::-1])  # a negative stride with masks walks the whole dim backwards
    with pytest.raises(MILError, match="out of range"):
        run_op("slice_by_index", {"x": x, "begin": np.array([4, 0], np.int32), "end": np.array([5, 1], np.int32),
                                  "squeeze_mask": np.array([True, False])})


def test_split_sizes_and_num_splits():
    x = r(1, 4, 16)
    a, b = run_op("split", {"x": x, "axis": np.int32(-1), "split_sizes": np.array([8, 8], np.int32)})
    np.testing.assert_array_equal(a, x[..., :8]) and np.testing.assert_array_equal(b, x[..., 8:])
    parts = run_op("split", {"x": x, "axis": np.int32(1), "num_splits": np.int32(4)})
    assert len(parts) == 4 and all(p.shape == (1, 1, 16) for p in parts)
    parts = run_op("split", {"x": x, "axis": np.int32(-1), "split_sizes": np.array([3, 13], np.int32)})
    assert [p.shape[-1] for p in parts] == [3, 13]
    with pytest.raises(MILError, match="add up"):
        run_op("split", {"x": x, "axis": np.int32(-1), "split_sizes": np.array([3, 3], np.int32)})


def test_gather_in_bounds_and_out_of_bounds():
    x = r(107, 8)
    idx = np.array([[0, 106, 5]], np.int32)
    got = run_op("gather", {"x": x, "indices": idx, "axis": np.int32(0), "validate_indices": np.False_})
    np.testing.assert_array_equal(got, x[idx])
    np.testing.assert_array_equal(run_op("gather", {"x": x, "indices": np.array([7, 0], np.int32),
                                                    "axis": np.int32(-1)}), x[:, [7, 0]])
    # iOS17+: negative indices are out of bounds too; Core ML's result is undefined, the interpreter refuses
    for bad in (-1, 107):
        with pytest.raises(MILError, match=f"index {bad} out of bounds"):
            run_op("gather", {"x": x, "indices": np.array([bad], np.int32), "validate_indices": np.False_})


def test_select_broadcasts_cond_and_scalar_branches():
    cond = np.array([True, False, True])  # (107,)-like mask along the last axis
    b = r(1, 2, 3)
    got = run_op("select", {"cond": cond, "a": f32(-np.inf), "b": b})
    assert got.shape == (1, 2, 3) and got.dtype == f32
    np.testing.assert_array_equal(got, np.where(cond, -np.inf, b))
    ints = run_op("select", {"cond": np.array([[True, False]]), "a": np.array([[1, 2]], np.int32),
                             "b": np.array([[3, 4]], np.int32)})
    assert ints.dtype == np.int32 and ints.tolist() == [[1, 4]]


def test_range_fill_fill_like():
    np.testing.assert_array_equal(run_op("range_1d", {"start": np.int32(0), "end": np.int32(5), "step": np.int32(2)}),
                                  [0, 2, 4])
    got = run_op("fill", {"shape": np.array([2, 3], np.int32), "value": np.True_})
    assert got.dtype == bool and got.shape == (2, 3) and got.all()
    got = run_op("fill_like", {"ref_tensor": np.zeros((1, 1), np.int32), "value": np.int32(-100)})
    assert got.dtype == np.int32 and got.tolist() == [[-100]]


def test_unknown_op_is_named():
    with pytest.raises(MILError, match="'conv' is not implemented"):
        run_op("conv", {"x": r(1)})


def test_every_op_type_has_a_test_here():
    """A new entry in the op table needs an edge-case test in this file."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    untested = [op for op in OPS if f'"{op}"' not in source.split("def test_every_op_type_has_a_test_here")[0]]
    assert untested == [], untested


# --------------------------------------------------------------------------- loader and exactness rule

def _program(build):
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS18)
    def prog(x):
        return build(mb, x)

    return prog


def test_exactness_rule():
    rule = coreml_exact.problems
    inv = _program(lambda mb, x: mb.inverse(x=x, epsilon=1e-4, name="inv"))
    found = rule(inv, "layer_forward ")
    assert len(found) == 1 and "layer_forward main: inverse 'inv'" in found[0] and "x + 0.0001" in found[0]
    with pytest.raises(coreml_exact.MILExactnessError, match="inverse 'inv'"):
        coreml_exact.check_exact(inv)
    assert rule(_program(lambda mb, x: mb.inverse(x=x, epsilon=0.0))) == []
    assert rule(_program(lambda mb, x: mb.log(x=x))) == []  # 1e-45 <= the smallest subnormal: negligible
    assert len(rule(_program(lambda mb, x: mb.rsqrt(x=x)))) == 1  # 1e-12: refused without a bound on x
    assert len(rule(_program(lambda mb, x: mb.log(x=x, epsilon=1.0)))) == 1  # log1p's intended eps: refused too
    # a constant input is decided element by element: RoPE's frequencies are moved by 1e-4, ones are not
    freqs = np.float32(10000.0) ** (np.arange(0, 4, dtype=np.float32) / 4)
    assert len(rule(_program(lambda mb, x: mb.add(x=x, y=mb.inverse(x=freqs, epsilon=1e-4))))) == 1
    big = np.full(4, 1e6, np.float32)
    assert rule(_program(lambda mb, x: mb.add(x=x, y=mb.inverse(x=big, epsilon=1e-12)))) == []


def test_exact_epsilons_pass_zeroes_default_epsilons_only():
    pipeline = ct.PassPipeline.EMPTY
    coreml_exact.add_to(pipeline)
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    prog = _program(lambda mb, x: mb.add(x=mb.add(x=mb.inverse(x=x), y=mb.rsqrt(x=x)),
                                         y=mb.log(x=x, epsilon=1.0)))
    PASS_REGISTRY["ondevice::exact_epsilons"](prog)
    eps = {op.op_type: float(op.epsilon.val) for op in prog.functions["main"].operations if op.op_type in
           coreml_exact.EPSILON_OPS}
    assert eps == {"inverse": 0.0, "rsqrt": 0.0, "log": 1.0}


def test_converted_reciprocal_is_exact():
    """torch `1 / x`, `rsqrt`, `log` through the exporter's conversion: no epsilon left, values as eager."""
    from exporter import graph_defs as gd
    from exporter.backends.coreml import convert
    from exporter.backends.mil_runtime import load_function

    class M(torch.nn.Module):
        def forward(self, x):
            return (1.0 / x + torch.rsqrt(x) + torch.log(x),)

    g = gd.GraphDef("f", M(), [gd.TensorSpec("x", (8,))], [gd.TensorSpec("y", (8,))])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        convert(g, Path(tmp) / "f.mlpackage")
        fn = load_function(Path(tmp) / "f.mlpackage", "main")
        assert {"inverse", "rsqrt", "log"} <= fn.op_types or "real_div" in fn.op_types
        x = np.array([1e-5, 1e-4, 1e-3, 0.5, 1, 2, 1e3, 1e6], np.float32)
        got = fn({"x": x})["y"]
    np.testing.assert_allclose(got, M()(torch.from_numpy(x))[0].numpy(), rtol=1e-6)
