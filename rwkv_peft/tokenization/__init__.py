"""The RWKV World tokenizer as a transformers tokenizer (see docs/tokenizer.md)."""

from .tokenization_rwkv_world import (
    DEFAULT_VOCAB_FILE,
    EOS_TOKEN,
    VOCAB_SIZE,
    GreedyByteEncoder,
    RWKVWorldTokenizer,
    WorldStreamDecoder,
    load_world_vocab,
)

__all__ = [
    "RWKVWorldTokenizer",
    "WorldStreamDecoder",
    "GreedyByteEncoder",
    "load_world_vocab",
    "DEFAULT_VOCAB_FILE",
    "EOS_TOKEN",
    "VOCAB_SIZE",
]
