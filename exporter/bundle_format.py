"""The bundle format in one place: folder and file names, store names, dtypes, PEFT names and the
thresholds a bundle is verified against. The README's "Bundle format" section documents these;
`exporter.manifest` validates a manifest's structure (`manifest_schema.json`)."""
from __future__ import annotations

import functools
from fnmatch import fnmatchcase

FORMAT_VERSION = 2  # 2: graph entries carry program / role / kind / layer / attention

# files and folders
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.sha256"  # "<sha256 hex>  manifest.json" (sha256sum format)
EMBEDDING_FILE = "weights/embedding.safetensors"
LM_HEAD_FILE = "weights/lm_head.safetensors"
FINAL_NORM_FILE = "weights/final_norm.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_DIR = "training"  # ONNX Runtime training artifacts
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def layer_file(i: int) -> str:
    return f"weights/layer_{i:02d}.safetensors"


# tensor dtypes: manifest name -> bytes per element
DTYPE_BYTES = {"float32": 4, "int64": 8, "int32": 4, "float16": 2, "uint8": 1}


def weight_format(fmt) -> dict:
    """The manifest's `weights.format` of a quantized bundle (`graphs.quant.QuantFormat`): enough for an app
    or another runtime to read the weight files (README, "Quantized weights")."""
    return {
        "scheme": fmt.scheme, "bits": fmt.bits, "group_size": fmt.group_size,
        "quantized": ["every layer's *_proj.weight, stored as <module>.qweight / .scales / .zeros",
                      "the embedding (and an untied LM head), stored as qweight / scales / zeros"],
        "qweight": {"dtype": "uint8", "shape": "(out, in * bits / 8)",
                    "packing": "one code per byte" if fmt.bits == 8 else
                               "two codes per byte along the input dimension, low nibble first: "
                               "q[o, 2i] = b[o, i] & 15, q[o, 2i + 1] = b[o, i] >> 4"},
        "scales": {"dtype": "float32", "shape": "(out, in / group)"},
        "zeros": {"dtype": "uint8", "shape": "(out, in / group)"},
        "group": "group_size consecutive input columns share a scale and a zero point (0: the whole row)",
        "dequantize": "w[o, i] = (q[o, i] - zeros[o, i // group]) * scales[o, i // group], in float32",
    }


# store names (the app's tensor store; exporter.schedule lists them all)
def lora_state_name(layer: int, name: str) -> str:
    return f"lora.{layer}.{name}"


def grad_state_name(layer: int, name: str) -> str:
    return f"grad.{layer}.{name}"


def grad_of(state_name: str) -> str:
    """The store name of a LoRA parameter's gradient: `lora.3.<module>.lora_A` -> `grad.3.<module>.lora_A`."""
    layer, name = state_name[len("lora."):].split(".", 1)
    return grad_state_name(int(layer), name)


# Paged state (README, "Paged state"): store tensors matching these patterns live in files between the
# calls that read or write them; only a call's own inputs and outputs are resident while it runs.
# Layer checkpoints (x.i; in a split bundle also h.i, the attention's output, and z.i, the MLP output of a
# family with an mlp_out norm), LoRA parameters, their gradients and the optimizer state are per layer, so a
# step holds one layer's worth of them at a time.
PAGED = ("x.*", "h.*", "z.*", "lora.*", "grad.*", "optim.*")


@functools.cache
def is_paged(name: str, patterns: tuple[str, ...] = PAGED) -> bool:
    """True when store tensor `name` is paged under `patterns` (shell-style, `*` matches any text; memoized:
    the schedule and the runner ask for every store name at every call)."""
    return any(fnmatchcase(name, p) for p in patterns)


def peft_tensor_name(layer: int, name: str) -> str:
    """`self_attn.q_proj.lora_A` of layer 3 -> PEFT's saved name `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    return f"base_model.model.model.layers.{layer}.{name}.weight"


# verification: a bundle passes when every LoRA gradient (and the loss) agrees with the float64 reference
COSINE_MIN = 0.99999
REL_ERR_MAX = 1e-4  # max |ours - ref| / max |ref|
