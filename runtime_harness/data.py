"""Training data as an app feeds it: rows of `batch.input_ids` and `batch.labels`, seq_len tokens each.

Formats (detected from the content, or named with `train --format`):

    text               plain UTF-8 text, tokenized whole and cut into windows of seq_len tokens
                       (a last partial window is padded); labels = input ids
    chat               JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line, rendered
                       with the checkpoint's own chat template; labels = ids on assistant tokens only
    prompt-completion  JSONL, one {"prompt": str, "completion": str} per line:
                       ids = enc(prompt) + enc(completion) + [eos]; labels -100 on the prompt's tokens
    tokens             JSONL, one {"input_ids": [...], "labels": [...]?} per line (labels default to the ids)

Assistant tokens of a conversation (`chat_example`). The template renders text; a token counts in the
loss when it begins inside an assistant span of that text:

    full      = render(messages)
    start_k   = len(render(messages[:k], add_generation_prompt=True))   for each assistant message k
    end_k     = len(render(messages[:k + 1]))
    span_k    = [start_k, end_k)  -- the assistant's content and the template's end of turn
                                     (e.g. "<|im_end|>\\n" in ChatML), never the "<|im_start|>assistant\\n"
    labels[t] = ids[t] if offset_start(t) lies in some span_k else -100

Every rendered prefix must be a prefix of `full` (a template that rewrites earlier turns, e.g. one that
drops earlier reasoning, is refused). A template that marks assistant text with `{% generation %}` is
used through transformers' own `return_assistant_tokens_mask` instead.

Lengths: a row shorter than seq_len is right-padded with the pad id (the tokenizer's pad, else its eos,
else 0) and labels -100. Under causal attention this is exact: real position t attends only to
positions <= t, so padding after the last real token changes no real position's activations, and its
labels (-100) are not counted in the loss mean. A longer row is truncated to seq_len (and counted).

The loss head shifts the labels (position t predicts labels[t + 1]), so labels[0] is never counted; an
example with no counted label (labels[1:] all -100, after truncation) is bad data.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2.exceptions import TemplateError

from runtime_harness.runner import BundleError

IGNORE = -100
FORMATS = ("text", "chat", "prompt-completion", "tokens")
ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES = (".jsonl", ".json")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(BundleError):
    """Bad training data; the message names the file and the line."""

    def __init__(self, path: Path, line: int | None, reason: str):
        super().__init__(f"{path}{'' if line is None else f', line {line}'}: {reason}")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    line: int | None  # 1-based line of the JSONL record (None for text windows)


@dataclass
class Dataset:
    """Rows of one file, padded to seq_len: ids and labels (N, S) int64, lines (N,) (0 for text)."""
    path: Path
    format: str
    ids: np.ndarray
    labels: np.ndarray
    lines: np.ndarray
    truncated: int
    pad_id: int
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset(self.path, self.format, self.ids[index], self.labels[index], self.lines[index],
                       self.truncated, self.pad_id, self.sha256)


# -- tokenizers ------------------------------------------------------------------------------------

class ByteCodec:
    """UTF-8 bytes as token ids, for a bundle without a tokenizer (tiny test models)."""
    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


class HFCodec:
    """The bundle's Hugging Face tokenizer (`bundle/tokenizer/`, the checkpoint's own files)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        template = tokenizer.chat_template  # a dict of named templates: apply_chat_template uses "default"
        self.chat_template = template.get("default") if isinstance(template, dict) else template

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])


def load_codec(bundle: Path, manifest: dict):
    """The bundle's tokenizer, or UTF-8 bytes when it has none (which needs a vocabulary of >= 256)."""
    if manifest.get("tokenizer"):
        from transformers import AutoTokenizer

        folder = Path(bundle) / manifest["tokenizer"]
        try:
            return HFCodec(AutoTokenizer.from_pretrained(str(folder)))
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0][:160]}") from None
    vocab = manifest["model"]["architecture"]["vocab_size"]
    if vocab < 256:
        raise BundleError(f"the bundle has no tokenizer and its vocabulary ({vocab}) is too small for bytes")
    return ByteCodec()


# -- one example per format ------------------------------------------------------------------------

def chat_example(messages: list[dict], codec) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: assistant tokens labelled, everything else -100 (see module doc)."""
    tok = codec.tok
    if _GENERATION_TAG.search(codec.chat_template or ""):
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        return ids, [i if m else IGNORE for i, m in zip(ids, enc["assistant_masks"])]
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tok.apply_chat_template(messages[:k + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render this conversation's beginnings as prefixes of "
                             "the whole (it rewrites earlier turns), so assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    try:
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError("the tokenizer gives no character offsets (not a fast tokenizer), so assistant "
                         "tokens cannot be located") from None
    ids = list(enc["input_ids"])
    labels = [i if any(a <= start < b for a, b in spans) else IGNORE
              for i, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def prompt_completion_example(prompt: str, completion: str, codec) -> tuple[list[int], list[int]]:
    """ids = enc(prompt) + enc(completion, no special tokens) + [eos]; the prompt's labels are -100."""
    p = codec.encode(prompt, special=True)
    c = codec.encode(completion, special=False) + ([] if codec.eos_token_id is None else [codec.eos_token_id])
    return p + c, [IGNORE] * len(p) + c


def _check_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {j} needs a `role` and a `content`")
        if m["role"] not in ROLES:
            raise ValueError(f"message {j} has the unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {j}: `content` must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn, so nothing would be learned")
    return messages


def _int_list(value, name: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in value):
        raise ValueError(f"`{name}` must be a non-empty list of integers")
    return value


def _record_example(fmt: str, record: dict, codec) -> tuple[list[int], list[int]]:
    if fmt == "chat":
        if "messages" not in record:
            raise ValueError("no `messages` (the file is chat data)")
        return chat_example(_check_messages(record), codec)
    if fmt == "prompt-completion":
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise ValueError("needs string `prompt` and `completion` fields (the file is prompt-completion data)")
        return prompt_completion_example(record["prompt"], record["completion"], codec)
    ids = _int_list(record.get("input_ids"), "input_ids")
    labels = _int_list(record["labels"], "labels") if "labels" in record else list(ids)
    if len(labels) != len(ids):
        raise ValueError(f"`labels` has {len(labels)} entries, `input_ids` {len(ids)}")
    return ids, labels


# -- files -----------------------------------------------------------------------------------------

def _record_format(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "input_ids" in record:
        return "tokens"
    return None


def detect_format(path: Path, text: str) -> str:
    """`text`, or the JSONL format of the first record (a .jsonl/.json file must be JSONL)."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if path.suffix in JSONL_SUFFIXES:
                raise DataError(path, n, f"malformed JSON ({e.msg}, column {e.colno})") from None
            return "text"
        fmt = _record_format(record)
        if fmt is None and (isinstance(record, dict) or path.suffix in JSONL_SUFFIXES):
            raise DataError(path, n, "a JSON record without `messages`, `prompt`/`completion` or `input_ids` "
                                     "(use --format text for plain text)")
        return fmt or "text"
    raise DataError(path, None, "the file is empty")


def read_text(path: Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(path, None, f"cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text (byte {e.start})") from None


def read_examples(path: Path, text: str, fmt: str, codec, seq_len: int) -> list[Example]:
    """The examples of one file, unpadded; DataError on the first bad record."""
    if fmt == "text":
        ids = codec.encode(text)
        if len(ids) < 2:
            raise DataError(path, None, f"the text has {len(ids)} token(s); training needs at least 2")
        return [Example(ids[a:a + seq_len], ids[a:a + seq_len], None)
                for a in range(0, len(ids), seq_len) if len(ids) - a >= 2]
    if fmt == "chat" and codec.chat_template is None:
        why = "the bundle has no tokenizer" if isinstance(codec, ByteCodec) else "its tokenizer has no chat template"
        raise DataError(path, 1, f"`messages` are rendered with the checkpoint's chat template, but {why} "
                                 "(use prompt-completion or tokens data)")
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, n, f"malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(path, n, f"expected a JSON object, got {type(record).__name__}")
        try:
            ids, labels = _record_example(fmt, record, codec)
        except ValueError as e:
            raise DataError(path, n, str(e)) from None
        except TemplateError as e:  # the template's own checks, e.g. "roles must alternate"
            raise DataError(path, n, f"the chat template refused the conversation: {e}") from None
        examples.append(Example(ids, labels, n))
    if not examples:
        raise DataError(path, None, "no records")
    return examples


def pack(path: Path, fmt: str, examples: list[Example], seq_len: int, vocab: int, pad_id: int) -> Dataset:
    """Truncate to / right-pad up to seq_len (labels -100); check ids and that some label counts."""
    n = len(examples)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    truncated = 0
    for r, ex in enumerate(examples):
        bad = [i for i in ex.ids if not 0 <= i < vocab]
        if bad:
            raise DataError(path, ex.line, f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        bad = [i for i in ex.labels if i != IGNORE and not 0 <= i < vocab]
        if bad:
            raise DataError(path, ex.line, f"label {bad[0]} is neither -100 nor in [0, {vocab})")
        length = min(len(ex.ids), seq_len)
        truncated += len(ex.ids) > seq_len
        ids[r, :length] = ex.ids[:length]
        labels[r, :length] = ex.labels[:length]
        if not (labels[r, 1:] != IGNORE).any():
            after = f" after truncation to {seq_len} tokens" if len(ex.ids) > seq_len else ""
            raise DataError(path, ex.line, f"every label is masked{after} (the loss counts labels[1:]); "
                                           "nothing would be learned")
    lines = np.asarray([ex.line or 0 for ex in examples], dtype=np.int64)
    return Dataset(path, fmt, ids, labels, lines, truncated, pad_id)


def load_dataset(path: Path, codec, seq_len: int, vocab: int, fmt: str | None = None) -> Dataset:
    """Read, detect (unless `fmt`), encode, check and pack one data file."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(path, None, f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    text = read_text(path)
    fmt = fmt or detect_format(path, text)
    pad_id = int(codec.pad_token_id)
    if not 0 <= pad_id < vocab:
        pad_id = 0
    ds = pack(path, fmt, read_examples(path, text, fmt, codec, seq_len), seq_len, vocab, pad_id)
    ds.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return ds


# -- order, held-out split, batches ----------------------------------------------------------------

def batch_rows(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Rows of training step `step` (0-based): each epoch a fresh seeded permutation, cut into batches.

    A function of (seed, step) alone, so a resumed run sees exactly the batches it would have seen."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch:(k + 1) * batch]


def hold_out(ds: Dataset, fraction: float, seed: int, batch: int) -> tuple[Dataset, Dataset]:
    """(train, eval): a seeded random `fraction` of the rows held out for evaluation."""
    if not 0 < fraction < 1:
        raise DataError(ds.path, None, f"--eval-fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, round(fraction * len(ds)))
    if len(ds) - n_eval < batch:
        raise DataError(ds.path, None, f"{len(ds)} examples cannot give {n_eval} for evaluation and still "
                                       f"fill a batch of {batch}")
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(ds))
    return ds.subset(np.sort(order[n_eval:])), ds.subset(np.sort(order[:n_eval]))


def eval_batches(ds: Dataset, batch: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(ids, labels, counted targets) per batch, in order; the last batch is filled with rows whose
    labels are all -100, which add nothing to the loss: the token-weighted mean over the batches is
    exactly the mean over every counted eval token."""
    out = []
    for a in range(0, len(ds), batch):
        ids, labels = ds.ids[a:a + batch], ds.labels[a:a + batch]
        if len(ids) < batch:
            fill = batch - len(ids)
            ids = np.concatenate([ids, np.full((fill, ids.shape[1]), ds.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full((fill, labels.shape[1]), IGNORE, dtype=np.int64)])
        out.append((ids, labels, int((labels[:, 1:] != IGNORE).sum())))
    return out
