"""Frozen weights, read lazily: one decoder layer (or one block of embedding rows) at a time.

Sources:
  * a local folder with `config.json` and `*.safetensors` (single file or sharded with an index);
  * a Hugging Face repo id, fetched (or found in the cache) by `huggingface_hub.snapshot_download`;
  * `random`: a seeded, architecture-faithful initialisation (Hugging Face `_init_weights`:
    linear and embedding weights ~ N(0, 0.02), biases 0, RMSNorm weights 1, or 0 for a family whose
    norms use (1 + w)), generated per tensor so that any layer can be produced alone.
Every tensor is checked against the ModelSpec's name and shape as it is read, and returned float32.

Names: callers use the text model's canonical names (`model.layers.{i}.<name>`, `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight`). A checkpoint may store the text model under another prefix (a
multimodal wrapper: Gemma-3-4b's `language_model.model.`); `CheckpointWeights` maps the names to the
prefix the checkpoint uses (`stored_name`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from graphs.config import ModelSpec

LAYER_PREFIX = "model.layers.{}."
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
TEXT_PREFIX = "model."  # the canonical prefix of the text model's tensors
# Where multimodal checkpoints keep the text model: the hub's layout (transformers < 4.52) and the one
# transformers 5 writes. The spec's `checkpoint_prefix` is tried first.
WRAPPER_PREFIXES = ("language_model.model.", "model.language_model.")
# where an untied LM head sits beside a wrapped text model (transformers 5 keeps `lm_head.weight`)
_HEAD_PREFIX = {"language_model.model.": "language_model."}
INIT_STD = 0.02
_RANDOM_BLOCK_ROWS = 4096


class WeightsError(ValueError):
    """A checkpoint that cannot be found, read, or does not match the architecture."""


class WeightSource:
    """Interface: `layer(i)`, `rows(name, start, stop)`, `tensor(name)`; `head_name` is the LM head matrix."""

    spec: ModelSpec
    description: str

    @property
    def head_name(self) -> str:
        return EMBEDDING if self.spec.tie_word_embeddings else LM_HEAD

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def content_sha256(self) -> str | None:
        """A hash of the weights' content (None where the description alone determines them: random)."""
        return None

    def identity(self) -> dict:
        """What determines the weight values: the description, plus the content hash of a checkpoint."""
        return {"source": self.description, "sha256": self.content_sha256()}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The frozen tensors of layer `index`, by name relative to the layer, float32."""
        prefix = LAYER_PREFIX.format(index)
        return {name: self.tensor(prefix + name) for name in self.spec.layer_weight_shapes()}

    @property
    def family(self):
        """The spec's `graphs.family.Family` (which norms a layer has, and their style)."""
        from graphs.family import get_family

        return get_family(self.spec.family)

    def expected_shape(self, name: str) -> tuple[int, ...]:
        spec = self.spec
        if name in (EMBEDDING, LM_HEAD):
            return (spec.vocab_size, spec.hidden_size)
        if name == FINAL_NORM:
            return (spec.hidden_size,)
        if name.startswith("model.layers."):
            index, rel = name[len("model.layers."):].split(".", 1)
            if int(index) < spec.num_layers and rel in spec.layer_weight_shapes():
                return spec.layer_weight_shapes()[rel]
        raise WeightsError(f"{name} is not a weight of {spec.name}")


class CheckpointWeights(WeightSource):
    """A Hugging Face safetensors checkpoint folder, opened lazily with `safe_open`."""

    def __init__(self, folder: Path, spec: ModelSpec, description: str):
        """Map every tensor to its file and check every required name and shape from the files' headers
        (no tensor data is read), so that a missing shard or tensor, a wrong shape or a corrupt file is
        found before anything is written."""
        self.folder, self.spec, self.description = Path(folder), spec, description
        self._file_of: dict[str, Path] = {}
        self._sha256: str | None = None
        index = self.folder / "model.safetensors.index.json"
        files = sorted(self.folder.glob("*.safetensors"))
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._file_of = {str(name): self.folder / str(f) for name, f in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise WeightsError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
        elif files:
            for f in files:
                with _open(f) as st:
                    self._file_of.update({name: f for name in st.keys()})
        else:
            raise WeightsError(f"{self.folder} has no *.safetensors weights")
        self.prefix = self._find_prefix()
        missing = [self.stored_name(n) for n in self.required_names() if self.stored_name(n) not in self._file_of]
        if missing:
            raise WeightsError(f"checkpoint {self.folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
        by_file: dict[Path, list[str]] = {}
        for name in self.required_names():
            by_file.setdefault(self._file_of[self.stored_name(name)], []).append(name)
        for path, names in by_file.items():
            if not path.is_file():
                raise WeightsError(f"checkpoint {self.folder} lacks the shard {path.name} (named in its index)")
            with _open(path) as st:
                present = set(st.keys())
                for name in names:
                    if self.stored_name(name) not in present:
                        raise WeightsError(f"{path.name} lacks {self.stored_name(name)}, which the checkpoint's "
                                           f"index places there")
                    self._check(name, st.get_slice(self.stored_name(name)).get_shape())

    def _find_prefix(self) -> str:
        """The prefix under which this checkpoint stores the text model (the spec's, else a known wrapper's)."""
        candidates = [self.spec.checkpoint_prefix]
        if self.spec.checkpoint_prefix != TEXT_PREFIX:
            candidates += [p for p in WRAPPER_PREFIXES if p not in candidates]
        for prefix in candidates:
            if prefix + EMBEDDING[len(TEXT_PREFIX):] in self._file_of:
                return prefix
        return candidates[0]

    def stored_name(self, name: str) -> str:
        """A canonical tensor name as this checkpoint stores it: `model.` -> the text model's prefix, and
        `lm_head.weight` beside it (`language_model.lm_head.weight` in a hub Gemma-3-4b checkpoint)."""
        if name.startswith(TEXT_PREFIX):
            return self.prefix + name[len(TEXT_PREFIX):]
        return _HEAD_PREFIX.get(self.prefix, "") + name

    def content_sha256(self) -> str:
        """sha256 over the checkpoint's safetensors files that hold the model's tensors: for each file, in
        name order, its name, its byte count, then its bytes (read once, then remembered)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for path in sorted(set(self._file_of.values())):
                h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256

    def required_names(self) -> list[str]:
        names = [EMBEDDING, FINAL_NORM]
        if not self.spec.tie_word_embeddings:
            names.append(LM_HEAD)
        for i in range(self.spec.num_layers):
            names += [LAYER_PREFIX.format(i) + n for n in self.spec.layer_weight_shapes()]
        return names

    def _slice(self, name: str):
        stored = self.stored_name(name)
        try:
            path = self._file_of[stored]
        except KeyError:
            raise WeightsError(f"checkpoint {self.folder} has no tensor {stored}") from None
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # corrupt or unreadable file
            raise WeightsError(f"cannot read {path}: not a valid safetensors file ({_first_line(e)})") from None
        return handle.get_slice(stored)

    def _check(self, name: str, shape: list[int]) -> None:
        want = self.expected_shape(name)
        if tuple(shape) != want:
            raise WeightsError(f"{name} has shape {tuple(shape)} in the checkpoint, the architecture needs {want}")

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name, None, None)

    def rows(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        part = self._slice(name)
        self._check(name, part.get_shape())
        try:
            return part[start:stop].to(torch.float32)
        except Exception as e:  # safetensors raises its own error type for unreadable data
            raise WeightsError(f"cannot read {self.stored_name(name)} from {self._file_of[self.stored_name(name)]}: "
                               f"{_first_line(e)}") from None


class _open:
    """`safe_open` whose failures (missing, truncated, random bytes) are one-line WeightsErrors."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            return self._handle.__enter__()
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for bad files
            raise WeightsError(f"cannot read {self.path}: not a valid safetensors file ({_first_line(e)})") from None

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


class RandomWeights(WeightSource):
    """Seeded initialisation; each tensor (and each 4096-row block of the embedding) has its own seed."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec, self.seed = spec, seed
        self.description = f"random (seed {seed})"

    def _generator(self, key: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.expected_shape(name)
        if name in (EMBEDDING, LM_HEAD):
            return self.rows(name, 0, shape[0])
        if name == FINAL_NORM or name.split(".", 3)[-1] in self.family.norms.values():
            return torch.full(shape, 1.0 - self.family.norm_offset)  # the effective weight (w + offset) is 1
        if name.endswith(".bias"):
            return torch.zeros(shape)
        return torch.randn(shape, generator=self._generator(name)) * INIT_STD

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        vocab, hidden = self.expected_shape(name)
        stop = min(stop, vocab)
        blocks = []
        for b in range(start // _RANDOM_BLOCK_ROWS, (stop - 1) // _RANDOM_BLOCK_ROWS + 1):
            lo = b * _RANDOM_BLOCK_ROWS
            n = min(_RANDOM_BLOCK_ROWS, vocab - lo)
            block = torch.randn(n, hidden, generator=self._generator(f"{name}[{b}]")) * INIT_STD
            blocks.append(block[max(start - lo, 0):stop - lo])
        return torch.cat(blocks)


class DequantizedWeights(WeightSource):
    """`source`'s weights as a quantized bundle computes with them: every projection matrix, the embedding
    and the LM head replaced by (q - z) * s of their codes (`graphs.quant.dequantized`: the same bytes the
    build stores, since quantization is row-independent); norms and biases unchanged."""

    def __init__(self, source: WeightSource, fmt):
        self.source, self.fmt, self.spec = source, fmt, source.spec
        self.description = f"{source.description}, {fmt.scheme} (group size {fmt.group_size}) dequantized"

    def content_sha256(self) -> str | None:
        return self.source.content_sha256()

    def _dequantized(self, name: str, t: torch.Tensor) -> torch.Tensor:
        from graphs import quant

        if name in (EMBEDDING, LM_HEAD) or quant.is_quantized_matrix(name, tuple(t.shape)):
            return quant.dequantized(t, self.fmt)
        return t

    def tensor(self, name: str) -> torch.Tensor:
        return self._dequantized(name, self.source.tensor(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._dequantized(name, self.source.rows(name, start, stop))


def resolve_checkpoint_folder(source: str) -> tuple[Path, str]:
    """A local folder, or a Hugging Face repo id fetched / found in the cache. Returns (folder, description)."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path} is not a checkpoint folder (no config.json)")
        return path, str(path.resolve())
    if source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") != 1:
        raise WeightsError(f"{source} is neither an existing folder nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.json",
                "merges.txt", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"]
    try:
        folder = snapshot_download(source, allow_patterns=patterns)
    except Exception as e:  # offline, not cached, no such repo, gated
        reason = _first_line(e)
        if len(reason) > 160:  # whole words only
            reason = reason[:160].rsplit(" ", 1)[0] + " …"
        raise WeightsError(
            f"cannot get weights for {source} from the Hugging Face Hub or its cache ({reason}); "
            f"pass --weights PATH to a local checkpoint folder, or --weights random") from None
    return Path(folder), f"hf://{source}"


def read_hf_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {folder / 'config.json'}: {e}") from None


def open_weights(source: str, spec: ModelSpec, seed: int = 0) -> WeightSource:
    """`random`, a local checkpoint folder or a Hugging Face repo id -> a lazy WeightSource for `spec`."""
    if source == "random":
        return RandomWeights(spec, seed)
    folder, description = resolve_checkpoint_folder(source)
    config = read_hf_config(folder)
    _check_config_matches(config, spec, folder)
    return CheckpointWeights(folder, spec, description)


# ModelSpec field -> its config.json key (for messages in the checkpoint's own terms)
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "rope_local_theta": "rope_local_base_freq"}
# ModelSpec fields that do not change the math (or are checked elsewhere: positions, by build)
_NOT_COMPARED = ("name", "hf_repo", "model_type", "max_position_embeddings", "checkpoint_prefix")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _check_config_matches(config: dict, spec: ModelSpec, folder: Path) -> None:
    """The checkpoint's config.json must describe `spec`'s architecture: the same family and every field
    that shapes the math (sizes, head_dim, norms' eps, RoPE, windows, tying), nested text configs included."""
    from exporter.registry import UnsupportedModel, spec_from_hf_config
    from graphs.family import family_of_model_type

    if not isinstance(config, dict):
        raise WeightsError(f"{folder / 'config.json'} is not a JSON object")
    fam = family_of_model_type(config.get("model_type"))
    if fam is not None and fam.name != spec.family:
        raise WeightsError(f"checkpoint {folder} is a {fam.name} model (model_type {config.get('model_type')!r}), "
                           f"but {spec.name} is {spec.family}")
    try:
        other = spec_from_hf_config(config, spec.name, None).to_dict()
    except UnsupportedModel:  # an incomplete config.json: compare the sizes it does give (the tensors' shapes
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config  # are checked
        other = {key: text[_HF_KEYS.get(key, key)] for key in _SIZES if _HF_KEYS.get(key, key) in text}  # anyway)
    mine = spec.to_dict()
    for key, theirs in other.items():
        if key not in _NOT_COMPARED and theirs != mine[key]:
            raise WeightsError(f"checkpoint {folder} has {_HF_KEYS.get(key, key)}={theirs}, "
                               f"but {spec.name} needs {mine[key]}")
