"""Core ML graphs compute the eager math: the epsilons that coremltools adds, lowered away, and a build-time
check that refuses any op whose epsilon changes the result beyond float32 rounding.

coremltools lowers torch's epsilon-free `reciprocal`, `rsqrt` and `log` to MIL ops that add an epsilon
first: `inverse(x) = 1 / (x + 1e-4)`, `rsqrt(x) = 1 / sqrt(x + 1e-12)`, `log(x) = log(x + 1e-45)` (their
defaults). `1e-4` moved the RoPE frequencies (1 / theta^(2i/D) reaches 1e-4), and `1e-12` moves RMSNorm's
rsqrt(mean(x^2) + 1e-6) by up to 5e-7 relative, 8 float32 ulps. Two steps keep Core ML exact:

1. `exact_epsilons`, a MIL pass run first after the torch frontend: an inverse / rsqrt / log whose
   epsilon is its op's default came from a torch op without one, so its epsilon becomes 0. An epsilon the
   frontend sets on purpose (`log1p` is `log(x, epsilon=1)`) is not the default and is kept.
2. `check_exact(program)`, after conversion, walks every function and refuses (MILExactnessError, naming
   the function, op type and op) any inverse / rsqrt / log whose epsilon is not negligible. The rule
   (what is decidable without knowing the inputs):
     * epsilon == 0: exact;
     * x is a constant: fn(x + eps) and fn(x) are computed in float32 for every element, and must not
       differ by more than one float32 ulp;
     * otherwise |epsilon| <= 2^-149 (the smallest float32 subnormal): adding it changes no input of
       magnitude >= 2^-125 (half an ulp or less), i.e. only inputs already at the edge of underflow.
   Anything else is refused: it changes results for some inputs the op may receive.
"""
from __future__ import annotations

import numpy as np

# the default epsilon of each op (coremltools MIL op reference, iOS15 and iOS17 elementwise_unary)
EPSILON_OPS = {"inverse": 1e-4, "rsqrt": 1e-12, "log": 1e-45}
SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)  # 2^-149

_FNS = {"inverse": lambda x: 1 / x, "rsqrt": lambda x: 1 / np.sqrt(x), "log": np.log}


class MILExactnessError(ValueError):
    """A converted op computes something else than the eager graph beyond float32 rounding."""


def _epsilon(op) -> float:
    eps = op.inputs.get("epsilon")
    return EPSILON_OPS[op.op_type] if eps is None else float(eps.val)


def _walk(block):
    for op in list(block.operations):
        for inner in op.blocks:
            yield from _walk(inner)
        yield op


def _register_pass():
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if "ondevice::exact_epsilons" in PASS_REGISTRY:
        return

    @register_pass(namespace="ondevice")
    class exact_epsilons(AbstractGraphPass):  # noqa: N801  (coremltools names passes in snake case)
        """inverse / rsqrt / log with their op's default epsilon -> the same op with epsilon 0."""

        def apply(self, prog):
            for function in prog.functions.values():
                self._block(function)

        @block_context_manager
        def _block(self, block):
            for op in list(block.operations):
                for inner in op.blocks:
                    self._block(inner)
                if op.op_type not in EPSILON_OPS:
                    continue
                eps = _epsilon(op)
                if eps == 0 or np.float32(eps) != np.float32(EPSILON_OPS[op.op_type]):
                    continue
                x = op.inputs["x"]
                zero = np.zeros((), dtype=np.float16 if "16" in str(x.dtype) else np.float32)[()]
                new = getattr(mb, op.op_type)(x=x, epsilon=zero, name=op.outputs[0].name, before_op=op)
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
                block.remove_ops([op])


def add_to(pipeline) -> None:
    """Run `ondevice::exact_epsilons` first in a coremltools PassPipeline."""
    _register_pass()
    pipeline.insert_pass(0, "ondevice::exact_epsilons")


def problems(program, label: str = "") -> list[str]:
    """Every op of a pymil Program that the rule above refuses, as 'function: op_type name: why'."""
    out = []
    for fname, function in program.functions.items():
        for op in _walk(function):
            if op.op_type not in EPSILON_OPS:
                continue
            eps = _epsilon(op)
            if eps == 0:
                continue
            x = op.inputs["x"]
            where = f"{label}{fname}: {op.op_type} {op.name!r}"
            if x.val is not None:
                xv = np.asarray(x.val, dtype=np.float32)
                with np.errstate(all="ignore"):
                    exact, ours = _FNS[op.op_type](xv), _FNS[op.op_type](xv + np.float32(eps))
                ulps = np.abs(ours - exact) / np.spacing(np.abs(exact).astype(np.float32))
                if np.all((ours == exact) | (np.isfinite(ulps) & (ulps <= 1))):
                    continue
                out.append(f"{where} adds epsilon {eps:g} to its constant input, changing the result by up "
                           f"to {float(np.nanmax(ulps)):.3g} float32 ulps")
            elif abs(eps) > SMALLEST_SUBNORMAL:
                out.append(f"{where} computes {op.op_type}(x + {eps:g}): not negligible for inputs near "
                           f"{abs(eps) * 2 ** 24:.3g} or smaller, and nothing bounds its input")
    return out


def check_exact(program, label: str = "") -> None:
    """Raise MILExactnessError listing every op `problems` finds."""
    found = problems(program, label)
    if found:
        raise MILExactnessError("Core ML conversion changed the math beyond float32 rounding: " + "; ".join(found))
