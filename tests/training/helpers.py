"""Shared helpers for the data/training/recipe tests: a byte-level tokenizer, tiny models, tiny datasets."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.factories import make_blinkdl_v7

VOCAB = 257  # id 0 = end of text, 1..256 = bytes


def byte_symbols():
    """The byte -> printable character table of byte-level BPE (visible bytes stand for themselves)."""
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table, extra = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A byte-level HF tokenizer (``tokenizers`` library): id 0 is <|endoftext|>, bytes map to 1..256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    b2u = byte_symbols()
    assert set(b2u.values()) == set(alphabet)
    vocab = {"<|endoftext|>": 0, **{b2u[b]: b + 1 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model_file(path: Path, layers: int = 2, width: int = 64, head_size: int = 32, seed: int = 0) -> Path:
    torch.save(make_blinkdl_v7(vocab=VOCAB, width=width, layers=layers, head_size=head_size, seed=seed), path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 24):
    topics = ["the sea", "bread", "trains", "owls", "rain", "chess", "maps", "tea"]
    return [{"messages": [{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}."},
                          {"role": "assistant", "content": f"Ahoy! {topics[i % len(topics)].capitalize()} be "
                                                           f"grand, matey, number {i}."}]}
            for i in range(n)]
