"""runtime_harness.data: each format parses into exact (input_ids, labels) rows, assistant-only labels,
padding is exact under causal attention, and bad data names the file and the line.

Expected ids are written by hand: the test tokenizer (helpers.make_chat_tokenizer) maps a byte to its value
and the special tokens <|endoftext|>, <|im_start|>, <|im_end|> to 256, 257, 258."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import make_chat_tokenizer
from runtime_harness.data import (IGNORE, DataError, HFCodec, batch_rows, chat_example, eval_batches, hold_out,
                                  load_dataset)

VOCAB, SEQ = 320, 64
PAD, START, END = 256, 257, 258


def by_hand(text: str) -> list[int]:
    """The test tokenizer, independently: special tokens by id, every other byte as itself."""
    ids = []
    for piece in re.split(r"(<\|endoftext\|>|<\|im_start\|>|<\|im_end\|>)", text):
        special = {"<|endoftext|>": PAD, "<|im_start|>": START, "<|im_end|>": END}
        ids += [special[piece]] if piece in special else list(piece.encode("utf-8"))
    return ids


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    make_chat_tokenizer(folder)
    return HFCodec(AutoTokenizer.from_pretrained(str(folder)))  # as the bundle loads it


def _jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo é"}, {"role": "user", "content": "more?"},
                {"role": "assistant", "content": "ok!"}]


def test_chat_labels_only_assistant_turns(codec):
    prompt1 = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    answer1 = "yo é<|im_end|>\n"
    prompt2 = "<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n"
    answer2 = "ok!<|im_end|>\n"
    ids, labels = chat_example(CONVERSATION, codec)
    assert ids == by_hand(prompt1 + answer1 + prompt2 + answer2)
    assert labels == ([IGNORE] * len(by_hand(prompt1)) + by_hand(answer1)
                      + [IGNORE] * len(by_hand(prompt2)) + by_hand(answer2))


def test_prefix_rule_equals_transformers_generation_mask(codec, tmp_path):
    """On a template that marks assistant text with {% generation %}, transformers' own
    return_assistant_tokens_mask gives the same labels as the prefix-diff rule on the unmarked template."""
    from transformers import AutoTokenizer

    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
              "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n"
              "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    make_chat_tokenizer(tmp_path, chat_template=marked)
    with_tags = HFCodec(AutoTokenizer.from_pretrained(str(tmp_path)))
    assert with_tags.tok.apply_chat_template(CONVERSATION, tokenize=False) == \
        codec.tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert chat_example(CONVERSATION, with_tags) == chat_example(CONVERSATION, codec)


def test_every_format_parses_and_pads(codec, tmp_path):
    chat = load_dataset(_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION[1:3]}]), codec, SEQ, VOCAB)
    pc = load_dataset(_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]), codec, SEQ, VOCAB)
    tokens = load_dataset(_jsonl(tmp_path / "t.jsonl", [{"input_ids": [5, 6, 7]},
                                                        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]),
                          codec, 4, VOCAB)
    (tmp_path / "x.txt").write_text("abcdefghij")
    text = load_dataset(tmp_path / "x.txt", codec, 4, VOCAB)
    assert [d.format for d in (chat, pc, tokens, text)] == ["chat", "prompt-completion", "tokens", "text"]

    n = len(by_hand("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo é<|im_end|>\n"))
    assert chat.ids.shape == (1, SEQ) and (chat.ids[0, n:] == PAD).all() and (chat.labels[0, n:] == IGNORE).all()
    assert pc.ids[0, :6].tolist() == [*b"2+2=", ord("4"), END] and (pc.ids[0, 6:] == PAD).all()
    assert pc.labels[0, :6].tolist() == [IGNORE] * 4 + [ord("4"), END] and (pc.labels[0, 6:] == IGNORE).all()
    assert tokens.ids.tolist() == [[5, 6, 7, PAD]] * 2
    assert tokens.labels.tolist() == [[5, 6, 7, IGNORE], [IGNORE, 6, 7, IGNORE]]
    # text: windows of seq_len as before, the last partial one padded
    assert text.ids.tolist() == [list(b"abcd"), list(b"efgh"), [*b"ij", PAD, PAD]]
    assert text.labels.tolist() == [list(b"abcd"), list(b"efgh"), [*b"ij", IGNORE, IGNORE]]
    # --format overrides detection: a JSONL file read as plain text
    as_text = load_dataset(tmp_path / "t.jsonl", codec, 4, VOCAB, fmt="text")
    assert as_text.format == "text" and as_text.ids[0].tolist() == list(b'{"in')


def test_long_examples_are_truncated_and_counted(codec, tmp_path):
    ds = load_dataset(_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab", "completion": "c" * 20},
                                                     {"prompt": "ab", "completion": "c"}]), codec, 8, VOCAB)
    assert ds.truncated == 1
    assert ds.ids[0].tolist() == list(b"abcccccc") and ds.labels[0].tolist() == [IGNORE] * 2 + list(b"cccccc")


def test_right_padding_is_exact_under_causal_attention(tiny_checkpoint):
    """The model's loss on a padded row equals its loss on the unpadded one."""
    import transformers

    from runtime_harness.reference import loss_only

    model = transformers.Qwen2ForCausalLM.from_pretrained(str(tiny_checkpoint)).eval()
    ids = np.arange(40, 50, dtype=np.int64)[None]
    labels = ids.copy()
    labels[0, :4] = IGNORE
    padded_ids = np.concatenate([ids, np.full((1, 6), PAD)], axis=1)
    padded_labels = np.concatenate([labels, np.full((1, 6), IGNORE)], axis=1)
    assert abs(loss_only(model, padded_ids, padded_labels) - loss_only(model, ids, labels)) <= 1e-6


def test_order_split_and_eval_batches(codec, tmp_path):
    ds = load_dataset(_jsonl(tmp_path / "t.jsonl", [{"input_ids": [i, i + 1, i + 2]} for i in range(10)]),
                      codec, 4, VOCAB)
    epoch = [batch_rows(10, 2, seed=3, step=k).tolist() for k in range(5)]
    assert sorted(sum(epoch, [])) == list(range(10))  # one epoch visits every row once
    assert [batch_rows(10, 2, 3, k).tolist() for k in range(5)] == epoch  # a function of (seed, step)
    second = [batch_rows(10, 2, 3, k).tolist() for k in range(5, 10)]
    assert sorted(sum(second, [])) == list(range(10)) and second != epoch  # each epoch reshuffled
    train, held = hold_out(ds, 0.3, seed=0, batch=2)
    assert len(train) == 7 and len(held) == 3
    assert sorted(train.ids[:, 0].tolist() + held.ids[:, 0].tolist()) == list(range(10))
    batches = eval_batches(held, 2)
    assert [b[0].shape for b in batches] == [(2, 4), (2, 4)] and [b[2] for b in batches] == [4, 2]
    assert (batches[1][1][1] == IGNORE).all()  # the filler row counts nothing


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("records, line, message", [
    ([CHAT_OK, '{"messages": [', CHAT_OK], 2, "malformed JSON"),
    (['{"messages": [}'], 1, "malformed JSON"),
    ([CHAT_OK, {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}], 2, "needs a `role`"),
    ([CHAT_OK, {"messages": [{"role": "user"}]}], 2, "needs a `role` and a `content`"),
    ([CHAT_OK, {"messages": [{"role": "narrator", "content": "x"}]}], 2, "unknown role 'narrator'"),
    ([CHAT_OK, CHAT_OK, {"messages": [{"role": "user", "content": "hi"}]}], 3, "no assistant turn"),
    ([CHAT_OK, {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}], 2,
     "every label is masked after truncation to 64 tokens"),
    ([CHAT_OK, {"prompt": "a", "completion": "b"}], 2, "no `messages`"),
    ([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], 1, "every label is masked"),
    ([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 999, 3]}], 2, "token id 999 is outside the model's vocabulary"),
    ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 1, "`labels` has 2 entries"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], 2, "needs string `prompt` and `completion`"),
    ([CHAT_OK, "[1, 2]"], 2, "expected a JSON object"),
])
def test_bad_data_names_the_file_and_line(codec, tmp_path, records, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as e:
        load_dataset(path, codec, SEQ, VOCAB)
    assert str(e.value).startswith(f"{path}, line {line}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_messages_without_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    make_chat_tokenizer(tmp_path / "tok", chat_template=None)
    no_template = HFCodec(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    path = _jsonl(tmp_path / "c.jsonl", [CHAT_OK])
    with pytest.raises(DataError, match=r"c\.jsonl, line 1: .*its tokenizer has no chat template"):
        load_dataset(path, no_template, SEQ, VOCAB)


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template that renders earlier assistant turns differently (as reasoning-stripping templates do)
    has no prefix-consistent assistant spans: refused with the line, not silently mislabelled."""
    from transformers import AutoTokenizer

    rewriting = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
                 "{{ m['content'][:1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    make_chat_tokenizer(tmp_path / "tok", chat_template=rewriting)
    codec = HFCodec(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    path = _jsonl(tmp_path / "c.jsonl", [CHAT_OK, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"line 2: the chat template does not render"):
        load_dataset(path, codec, SEQ, VOCAB)


def test_detection_errors(codec, tmp_path):
    (tmp_path / "e.txt").write_text("\n\n")
    (tmp_path / "o.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "b.txt").write_bytes(b"ok \xff\xfe")
    for name, message in (("e.txt", "e.txt: the file is empty"), ("o.jsonl", "o.jsonl, line 1: a JSON record without"),
                          ("b.txt", "b.txt: not UTF-8 text (byte 3)")):
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset(tmp_path / name, codec, SEQ, VOCAB)


def test_the_readme_example_builds_the_harness_rows(codec, tmp_path):
    """The README's app-team snippet, run on the test tokenizer, gives the rows `train` trains on."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Training data for app teams", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    folder = tmp_path / "tok"
    codec.tok.save_pretrained(str(folder))
    scope = {}
    exec(snippet.replace('"bundle/tokenizer"', repr(str(folder))), scope)
    messages = scope["messages"]
    ds = load_dataset(_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), codec, SEQ, VOCAB)
    assert scope["input_ids"] == ds.ids[0].tolist() and scope["labels"] == ds.labels[0].tolist()
    assert sum(l != IGNORE for l in scope["labels"]) == len(by_hand("Hello!<|im_end|>\n"))
