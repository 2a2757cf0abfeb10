"""Quantized frozen weights (graphs/quant.py): the codes, their dequantization bit for bit on every backend,
the layer math on quantized weights, and whole tiny bundles at int4 and int8 verified on every backend
against transformers + PEFT loaded with the dequantized checkpoint weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter import graph_defs as gd
from exporter.backends import get_backend
from graphs import layer as layer_math
from graphs import quant
from graphs.config import LoraConfig
from graphs.quant import QuantFormat, QuantizedWeight
from helpers import TINY_FAMILY_SPECS, random_layer_weights, random_lora, runnable_backends
from runtime_harness.verify import format_report, verify

FORMATS = [QuantFormat("int4", 16), QuantFormat("int4", 0), QuantFormat("int8", 0), QuantFormat("int8", 16)]


def _ids(fmt: QuantFormat) -> str:
    return f"{fmt.scheme}-g{fmt.group_size}"


# ----------------------------------------------------------------------------- the codes

@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_quantize_stores_codes_within_half_a_step(fmt):
    w = torch.randn(24, 64) * 0.05
    w[3] = 0.0  # an all-zero row (the padding rows of the embedding) stays exactly zero
    t = quant.quantize(w, fmt)
    g = fmt.group(64)
    assert t["qweight"].dtype == torch.uint8 and t["qweight"].shape == (24, 64 * fmt.bits // 8)
    assert t["scales"].shape == t["zeros"].shape == (24, 64 // g)
    assert int(t["zeros"].max()) <= fmt.qmax
    dq = quant.dequantize(t["qweight"], t["scales"], t["zeros"], fmt.bits)
    step = t["scales"].repeat_interleave(g, dim=1)
    assert ((dq - w).abs() <= step / 2 + 1e-7).all()  # round to nearest: at most half a step off
    assert torch.equal(dq[3], torch.zeros(64))
    assert torch.equal(dq, quant.dequantized(w, fmt))  # what verify's reference computes with


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    fmt = QuantFormat("int4", 4)
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]]) * 0.1  # lo = 0, hi = 0.3: scale 0.02, zero point 0
    t = quant.quantize(w, fmt)
    assert t["zeros"].tolist() == [[0]]
    codes = [0, 5, 10, 15]
    assert t["qweight"].tolist() == [[codes[0] | codes[1] << 4, codes[2] | codes[3] << 4]]
    assert quant.unpack(t["qweight"], 4).tolist() == [codes]


def test_quantization_is_row_independent():
    """The build quantizes the embedding in row blocks and verify's reference row ranges: same bytes."""
    fmt = QuantFormat("int4", 16)
    w = torch.randn(40, 64)
    whole = quant.quantize(w, fmt)
    parts = [quant.quantize(w[a:b], fmt) for a, b in ((0, 7), (7, 40))]
    for k in quant.SUFFIXES:
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_quantized_weight_reads_only_what_is_asked_and_equals_the_dense_matrix(fmt):
    w = QuantizedWeight.from_tensors(quant.quantize(torch.randn(24, 64), fmt), fmt)
    dense = w.dense()
    for J in (slice(0, 8), slice(5, 24)):
        assert torch.equal(w[J], dense[J])
    for J in (slice(0, 32), slice(16, 64), slice(5, 37), slice(6, 38), slice(8, 56), slice(18, 30)):  # aligned or not
        assert torch.equal(w[:, J], dense[:, J])
    ids = torch.tensor([[3, 0, 23], [7, 7, 1]])
    assert torch.equal(w.embedding(ids), dense[ids])


def test_the_phone_budget_counts_the_stored_bytes():
    from exporter.budget import call_lower_bound_bytes
    from exporter.registry import MODELS

    spec, lora = MODELS["qwen2.5-0.5b"], LoraConfig()
    bound = {q: call_lower_bound_bytes(gd.StepShapes(spec, lora, quant=QuantFormat.make(q)))
             for q in ("none", "int8", "int4")}
    layer = sum(torch.Size(s).numel() for s in spec.layer_weight_shapes().values())
    assert bound["none"] > bound["int8"] > bound["int4"]
    assert bound["none"] - bound["int4"] > 3 * layer  # float32 -> about 0.58 bytes per weight


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="is odd"):
        QuantFormat("int4", 7)
    with pytest.raises(ValueError, match="unknown quantization"):
        QuantFormat.make("int2")
    with pytest.raises(ValueError, match="does not divide"):
        QuantFormat("int4", 64).check("mlp.down_proj.weight", (64, 96))
    assert QuantFormat.make("none") is None and QuantFormat.make("int8") == QuantFormat("int8", 0)


# ----------------------------------------------------------------------------- the layer math

@pytest.mark.parametrize("fmt", [QuantFormat("int4", 16), QuantFormat("int8", 0)], ids=_ids)
@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_layer_on_quantized_weights_equals_the_layer_on_their_dequantized_values(family, fmt):
    """Bit for bit: dequantizing per block (rows, columns) gives the values of the dequantized matrix, so the
    structured forward and backward and the autodiff backward are those of the dequantized weights."""
    spec = TINY_FAMILY_SPECS[family]
    lora = LoraConfig(rank=4, seq_len=12)
    weights = random_layer_weights(spec, torch.float32, 0.05)
    stored = quant.quantize_layer(weights, fmt)
    q = quant.assemble(stored, list(weights), spec.layer_weight_shapes(), fmt)
    d = {n: quant.dense(w) for n, w in q.items()}
    assert sum(isinstance(w, QuantizedWeight) for w in q.values()) == 7
    lr = random_lora(spec, lora, torch.float32, 0.05)
    x, dy = torch.randn(1, 12, spec.hidden_size), torch.randn(1, 12, spec.hidden_size)
    for kind in spec.attention_kinds:
        assert torch.equal(layer_math.decoder_layer_forward_structured(x, q, lr, spec, 2.0, 3, kind),
                           layer_math.decoder_layer_forward_structured(x, d, lr, spec, 2.0, 3, kind))
        for backward in (lambda w: layer_math.decoder_layer_backward(x, dy, w, lr, spec, 2.0, 3, kind),
                         lambda w: layer_math.decoder_layer_backward_autodiff(x, dy, w, lr, spec, 2.0, kind)):
            (dx_q, g_q), (dx_d, g_d) = backward(q), backward(d)
            assert torch.equal(dx_q, dx_d) and all(torch.equal(g_q[n], g_d[n]) for n in g_d)


def test_quantized_head_reads_its_chunk_in_sub_blocks_of_fixed_logits():
    """A quantized head_chunk multiplies HEAD_BLOCK_LOGITS / tokens rows at a time (128 to HEAD_BLOCK_ROWS), and
    the online softmax over the sub-blocks equals one step over the whole dequantized chunk."""
    from graphs import head as head_math

    spec, fmt = TINY_FAMILY_SPECS["qwen2"], QuantFormat("int4", 16)
    rows = {S: gd.StepShapes(spec, LoraConfig(seq_len=S), quant=fmt).head_rows for S in (8, 256, 1024, 4096)}
    assert rows == {8: gd.HEAD_BLOCK_ROWS, 256: 1024, 1024: 256, 4096: 128}
    assert gd.StepShapes(spec, LoraConfig(seq_len=1024), head_block_rows=None).head_rows is None
    S, C, H = 1024, 300, spec.hidden_size  # 300 rows: sub-blocks of 256 and 44
    shapes = gd.StepShapes(spec, LoraConfig(seq_len=S), vocab_chunk_rows=C, quant=fmt)
    torch.manual_seed(0)
    chunk = quant.quantize(torch.randn(C, H) * 0.05, fmt)
    parts = [chunk[k] for k in ("qweight", "scales", "zeros")]
    x, norm_w = torch.randn(1, S, H), torch.rand(H) + 0.5
    labels, offset = torch.randint(0, spec.vocab_size, (1, S)), torch.tensor([0])
    state = head_math.head_init_state(1, S, H)
    ours = gd.HeadChunk(shapes)(x, norm_w, labels, *parts, offset, *state)
    dense = quant.dense(QuantizedWeight(*parts, fmt))
    ref = head_math.head_chunk(x, norm_w, labels, dense, offset, *state, spec.rms_norm_eps, spec.vocab_size)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- every backend, bit for bit

class _Dequant(torch.nn.Module):
    """What a graph dequantizes of one stored matrix: a row block, an unaligned column block, picked rows."""

    def __init__(self, fmt: QuantFormat):
        super().__init__()
        self.fmt = fmt

    def forward(self, qweight, scales, zeros, ids):
        w = QuantizedWeight(qweight, scales, zeros, self.fmt)
        return w[3:17], w[:, 5:37], w.embedding(ids)


class _DequantBaked(torch.nn.Module):
    """A baked matrix (Core ML's layer packages): `ondevice_lora::dequantize` of constants, plus x (zeros)."""

    def __init__(self, stored: dict, fmt: QuantFormat):
        super().__init__()
        for k, v in stored.items():
            self.register_buffer(k, v)
        self.bits = fmt.bits

    def forward(self, x):
        from exporter.quant_op import dequantize

        return (dequantize(self.qweight, self.scales, self.zeros, self.bits) + x,)


@pytest.mark.parametrize("fmt", [QuantFormat("int4", 16), QuantFormat("int8", 0)], ids=_ids)
@pytest.mark.parametrize("backend", runnable_backends())
def test_dequantization_is_bit_exact_on_every_backend(backend, fmt, tmp_path):
    torch.manual_seed(1)
    w = torch.randn(24, 64) * 0.05
    stored = quant.quantize(w, fmt)
    expected = QuantizedWeight.from_tensors(stored, fmt)
    ids = torch.tensor([[3, 0, 23, 7]])
    inputs = [gd.TensorSpec(n, tuple(t.shape), "uint8" if t.dtype == torch.uint8 else "float32")
              for n, t in stored.items()] + [gd.TensorSpec("ids", (1, 4), "int64")]
    outputs = [gd.TensorSpec("rows", (14, 64)), gd.TensorSpec("cols", (24, 32)), gd.TensorSpec("picked", (1, 4, 64))]
    graphs = [gd.GraphDef("layer_forward", _Dequant(fmt), inputs, outputs)]
    feeds = [[*(t.numpy() for t in stored.values()), ids.numpy()]]
    wanted = [[expected[3:17], expected[:, 5:37], expected.embedding(ids)]]
    b = get_backend(backend)
    if b.weights_in_graphs:  # Core ML: also the constants path (constexpr_blockwise_shift_scale)
        graphs.append(gd.GraphDef("layer_backward", _DequantBaked(stored, fmt), [gd.TensorSpec("x", (24, 64))],
                                  [gd.TensorSpec("w", (24, 64))]))
        feeds.append([np.zeros((24, 64), np.float32)])
        wanted.append([expected.dense()])
    lowered = b.lower("probe", graphs, tmp_path)
    for lg, feed, want in zip(lowered, feeds, wanted):
        entry = json.loads(json.dumps(lg.to_dict()))
        got = b.load(tmp_path, entry)(feed)
        for g, e in zip(got, want):
            assert np.array_equal(np.asarray(g, np.float32), e.numpy()), lg.id


# ----------------------------------------------------------------------------- whole tiny bundles

@pytest.mark.parametrize("quant_setting", [("int4", 16), ("int8", 0)], ids=["int4-g16", "int8"])
@pytest.mark.parametrize("backend", runnable_backends())
def test_quantized_bundle_verifies_against_its_dequantized_checkpoint(backend, quant_setting, tiny_bundles):
    bundle = tiny_bundles("qwen2", backend, *quant_setting)
    manifest = json.loads((bundle / "manifest.json").read_text())
    fmt = manifest["weights"]["format"]
    assert (fmt["scheme"], fmt["group_size"]) == quant_setting
    report = verify(bundle, seed=0)
    assert report["ok"], format_report(report, 5)
    q = report["quantization"]  # for information: the float checkpoint gives another loss
    assert q["format"] == quant_setting[0] and q["loss_rel_diff"] > 0
    float_bundle_bytes = sum(i["bytes"] for f, i in json.loads(
        (tiny_bundles("qwen2", backend) / "manifest.json").read_text())["files"].items() if f.startswith("weights/"))
    weight_bytes = sum(i["bytes"] for f, i in manifest["files"].items() if f.startswith("weights/"))
    if not manifest["weights"]["layers_in_graphs"]:  # the layer files hold codes, not floats
        assert weight_bytes < float_bundle_bytes / (2 if quant_setting[0] == "int8" else 3)


def test_a_verify_of_a_quantized_bundle_fails_on_the_float_checkpoint(tiny_bundles, tmp_path):
    """The reference really uses the dequantized weights: the same bundle checked against the float
    checkpoint (its format removed from the manifest) fails."""
    import shutil

    from exporter.integrity import resign

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles("qwen2", "ort", "int4", 16), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["weights"].pop("format")
    resign(bundle, manifest)
    assert not verify(bundle, seed=0)["ok"]


@pytest.mark.parametrize("quant_setting", [("int4", 16), ("int8", 0)], ids=["int4-g16", "int8"])
def test_mesp_layer_arena_holds_no_float_copy_of_a_whole_matrix(quant_setting, tiny_bundles):
    """ExecuTorch plans each call's arena: dequantizing per block (rows of a kv group or MLP block, columns of
    o_proj / down_proj) adds less than one whole float matrix to the float bundle's layer arena: the attention
    graphs less than q_proj (they dequantize a kv group's rows of it at a time), the others less than the
    smallest matrix."""
    pytest.importorskip("executorch")
    spec = TINY_FAMILY_SPECS["qwen2"]
    smallest = min(np.prod(s) * 4 for n, s in spec.layer_weight_shapes().items() if quant.is_quantized_matrix(n, s))

    def arenas(bundle):
        graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
        return {g["kind"]: g["arena_bytes"] for g in graphs.values() if g["role"] == "layer"}

    plain, quantized = arenas(tiny_bundles("qwen2", "executorch")), arenas(tiny_bundles("qwen2", "executorch", *quant_setting))
    assert set(plain) == set(quantized) and len(plain) >= 6  # the sub-layer graphs
    q_proj = np.prod(spec.layer_weight_shapes()["self_attn.q_proj.weight"]) * 4
    for kind in plain:
        bound = q_proj if kind.startswith("attn_") else smallest
        assert quantized[kind] - plain[kind] < bound, (kind, quantized[kind], plain[kind])
