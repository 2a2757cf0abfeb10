"""Quantized frozen weights: asymmetric integer codes per group of input columns, dequantized per block.

A matrix W (N, K) (out, in) is cut into groups of `g` consecutive input columns (`g = K`: one group per
row, i.e. per output channel). Each group has a float32 scale s and an integer zero point z:

    lo = min(W_group, 0),  hi = max(W_group, 0),  s = (hi - lo) / qmax   (s = 1 for an all-zero group)
    z  = clamp(round(-lo / s), 0, qmax),  q = clamp(round(W / s) + z, 0, qmax)
    dequantized:  W' = (q - z) * s            (qmax = 2^bits - 1; round half to even)

(zero is inside every group's range, so zero weights and zero padding rows stay exactly zero.)

Storage (`QuantizedTensors`): `qweight` uint8 (N, K * bits / 8): int8 one code per byte; int4 two codes
per byte along K, the even column in the low nibble (q[2i] = byte & 15, q[2i+1] = byte >> 4);
`scales` float32 (N, K / g); `zeros` uint8 (N, K / g), one code each.

Dequantization inside a graph uses float32 ops only (cast, multiply by 1/16, floor, subtract,
multiply), every one of them exact on the codes, so eager PyTorch, ExecuTorch, ONNX Runtime and Core ML
compute bit-identical weights, and `QuantizedWeight` dequantizes only the rows or columns a block of
the graph reads. Norms and biases are never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

SCHEMES = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
# default group size per scheme (one place): int4 groups of 64 input columns; int8 one group per row
DEFAULT_GROUP_SIZE = {"int4": 64, "int8": 0}
SUFFIXES = ("qweight", "scales", "zeros")  # the stored tensors of one quantized matrix: `<module>.<suffix>`


@dataclass(frozen=True)
class QuantFormat:
    """How frozen matrices are stored: `scheme` int4 / int8, `group_size` input columns per scale
    (0: one group per row)."""

    scheme: str
    group_size: int

    def __post_init__(self) -> None:
        if self.scheme not in BITS:
            raise ValueError(f"unknown quantization {self.scheme!r}; choose from {', '.join(SCHEMES)}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"--quant-group-size must be a non-negative integer (0: one group per row), got {g}")
        if self.bits == 4 and g % 2:
            raise ValueError(f"--quant-group-size {g} is odd; int4 packs two codes per byte, so groups must be even")

    @classmethod
    def make(cls, scheme: str, group_size: int | None = None) -> "QuantFormat | None":
        """The format of `--quant scheme [--quant-group-size N]` (None for `none`)."""
        if scheme == "none":
            if group_size is not None:
                raise ValueError("--quant-group-size needs --quant int4 or int8")
            return None
        if scheme not in BITS:
            raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
        return cls(scheme, DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size)

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def check(self, name: str, shape: tuple[int, int]) -> None:
        """Refuse (ValueError, one line) a matrix whose input dimension the groups do not tile."""
        K = shape[1]
        if K % self.group(K):
            raise ValueError(f"--quant-group-size {self.group_size} does not divide {name}'s {K} input columns; "
                             f"choose a divisor of every projection's input size (or 0: one group per row)")
        if K % self.per_byte:
            raise ValueError(f"{name} has an odd number of input columns ({K}); int4 packs two per byte")

    def stored_shapes(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, int], str]]:
        """suffix -> (shape, dtype) of the stored tensors of an (N, K) matrix."""
        N, K = shape
        groups = K // self.group(K)
        return {"qweight": ((N, K // self.per_byte), "uint8"), "scales": ((N, groups), "float32"),
                "zeros": ((N, groups), "uint8")}

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the stored tensors of an (N, K) matrix."""
        item = {"uint8": 1, "float32": 4}
        return sum(s[0] * s[1] * item[d] for s, d in self.stored_shapes(shape).values())

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size}


def quantize(w: Tensor, fmt: QuantFormat) -> dict[str, Tensor]:
    """W (N, K) -> {"qweight", "scales", "zeros"} as in the module docstring (float32 math, deterministic
    and row-independent: rows quantized in any batches give the same bytes)."""
    N, K = w.shape
    g = fmt.group(K)
    wg = w.to(torch.float32).reshape(N, K // g, g)  # (N, G, g)
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    scales = (hi - lo) / fmt.qmax  # (N, G)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.clamp(torch.round(-lo / scales), 0, fmt.qmax)
    q = torch.clamp(torch.round(wg / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, fmt.qmax)
    q = q.reshape(N, K).to(torch.uint8)
    if fmt.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2): even column low nibble
    return {"qweight": q.contiguous(), "scales": scales.contiguous(), "zeros": zeros.to(torch.uint8).contiguous()}


def unpack(qweight: Tensor, bits: int) -> Tensor:
    """Codes as float32 (N, K) from the stored bytes (uint8, or int32 where a runtime has no uint8 inputs).

    int4: lo = b - 16 floor(b / 16), hi = floor(b / 16), interleaved (lo, hi) along K; exact in float32."""
    b = qweight.to(torch.float32)
    if bits == 8:
        return b
    hi = torch.floor(b * 0.0625)
    lo = b - hi * 16.0
    return torch.stack((lo, hi), dim=-1).reshape(b.shape[0], b.shape[1] * 2)  # (N, K)


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int) -> Tensor:
    """W' = (q - z) * s, float32 (N, K); the group size is K / scales.shape[1]."""
    q = unpack(qweight, bits)
    N, K = q.shape
    G = scales.shape[1]
    qg = q.reshape(N, G, K // G)  # (N, G, g)
    return ((qg - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)).reshape(N, K)


class QuantizedWeight:
    """A frozen (N, K) matrix held as codes; indexing dequantizes only what is read.

        w[J]       rows J (a slice)          -> (|J|, K) float32
        w[:, J]    columns J (a slice)       -> (N, |J|): only J's codes (with their groups' scales)
        w.dense()  the whole matrix
        w.embedding(ids)  rows ids (any shape of int64 indices) -> ids.shape + (K,)
    """

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, fmt: QuantFormat):
        self.qweight, self.scales, self.zeros, self.fmt = qweight, scales, zeros, fmt
        self.shape = (qweight.shape[0], qweight.shape[1] * fmt.per_byte)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], fmt: QuantFormat) -> "QuantizedWeight":
        return cls(tensors["qweight"], tensors["scales"], tensors["zeros"], fmt)

    @property
    def group(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    def dense(self) -> Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.fmt.bits)

    def rows(self, J: slice) -> Tensor:
        a, b = J.start or 0, self.shape[0] if J.stop is None else J.stop
        return dequantize(*(_part(t, 0, a, b) for t in (self.qweight, self.scales, self.zeros)), self.fmt.bits)

    def cols(self, J: slice) -> Tensor:
        """Columns [start, stop): runs of whole groups dequantized together, a partial group (a block inside
        a group, e.g. of an int8 row that is one group) with that group's scale; nothing else."""
        start, stop = J.start or 0, self.shape[1] if J.stop is None else J.stop
        g, per = self.group, self.fmt.per_byte
        if start % per or stop % per:  # inside a byte of packed int4 codes: the covering groups, then J
            g0, g1 = start // g, -(-stop // g)
            part = self._cols(g0 * g, g1 * g, g0, g1)  # (N, (g1 - g0) g)
            return _part(part, 1, start - g0 * g, stop - g0 * g)
        pieces, a = [], start
        while a < stop:
            whole = (stop // g) * g  # the end of the last whole group inside [a, stop)
            if a % g == 0 and whole > a:
                pieces.append(self._cols(a, whole, a // g, whole // g))
                a = whole
            else:
                b = min((a // g + 1) * g, stop)
                pieces.append(self._cols(a, b, a // g, a // g + 1))
                a = b
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _cols(self, a: int, b: int, g0: int, g1: int) -> Tensor:
        """Columns [a, b) dequantized with groups [g0, g1) (their columns, or all of [a, b) in one group)."""
        per = self.fmt.per_byte
        return dequantize(_part(self.qweight, 1, a // per, b // per), _part(self.scales, 1, g0, g1),
                          _part(self.zeros, 1, g0, g1), self.fmt.bits)

    def embedding(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                          self.zeros.index_select(0, flat), self.fmt.bits)  # (n, K)
        return rows.reshape(*ids.shape, self.shape[1])

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, slice):
            return self.rows(index)
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice):
            return self.cols(index[1])
        raise TypeError(f"a quantized weight is indexed by a row slice or [:, column slice], not {index!r}")


def _part(t: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """t[start:stop] along `dim`, or t itself when that is all of it (a full slice traces to an `alias`
    op, which Core ML's converter rejects)."""
    if start == 0 and stop == t.shape[dim]:
        return t
    return t[start:stop] if dim == 0 else t[:, start:stop]


def dense(w) -> Tensor:
    """A weight as a float tensor: itself, or a QuantizedWeight dequantized whole."""
    return w.dense() if isinstance(w, QuantizedWeight) else w


def embedding(ids: Tensor, w) -> Tensor:
    """w[ids] for a float or quantized (rows, K) weight."""
    if isinstance(w, QuantizedWeight):
        return w.embedding(ids)
    return torch.nn.functional.embedding(ids, w)


def stored_name(matrix: str, suffix: str) -> str:
    """`self_attn.q_proj.weight` + `qweight` -> `self_attn.q_proj.qweight` (a matrix's stored tensor)."""
    return f"{matrix.removesuffix('.weight')}.{suffix}"


def is_quantized_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """Which frozen tensors are quantized: every 2-D projection (`*_proj.weight`); norms and biases are not."""
    return len(shape) == 2 and name.endswith("_proj.weight")


def stored_tensors(shapes: dict[str, tuple[int, ...]], fmt: QuantFormat | None) -> dict[str, tuple[tuple, str]]:
    """The tensors a layer's frozen weights are stored as: name -> (shape, dtype), in `shapes`' order."""
    out: dict[str, tuple[tuple, str]] = {}
    for name, shape in shapes.items():
        if fmt is not None and is_quantized_matrix(name, shape):
            for suffix, spec in fmt.stored_shapes(shape).items():
                out[stored_name(name, suffix)] = spec
        else:
            out[name] = (tuple(shape), "float32")
    return out


def quantize_layer(weights: dict[str, Tensor], fmt: QuantFormat | None) -> dict[str, Tensor]:
    """A layer's float tensors -> the tensors it is stored as (`stored_tensors`' names)."""
    if fmt is None:
        return weights
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        if is_quantized_matrix(name, tuple(w.shape)):
            for suffix, t in quantize(w, fmt).items():
                out[stored_name(name, suffix)] = t
        else:
            out[name] = w
    return out


def assemble(stored: dict[str, Tensor], names: list[str], shapes: dict[str, tuple[int, ...]],
             fmt: QuantFormat | None) -> dict:
    """Stored tensors -> {Hugging Face name: tensor or QuantizedWeight} for the layer math."""
    out = {}
    for name in names:
        if fmt is not None and is_quantized_matrix(name, shapes[name]):
            out[name] = QuantizedWeight(*(stored[stored_name(name, s)] for s in SUFFIXES), fmt)
        else:
            out[name] = stored[name]
    return out


def dequantized(w: Tensor, fmt: QuantFormat | None) -> Tensor:
    """What the bundle's graphs compute with for a float matrix W: W itself, or (q - z) * s of its codes."""
    if fmt is None:
        return w
    t = quantize(w, fmt)
    return dequantize(t["qweight"], t["scales"], t["zeros"], fmt.bits)
