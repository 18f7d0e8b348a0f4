"""Reader for the binidx format of pre-tokenized corpora (Megatron's ``MMapIndexedDataset``, used by RWKV).

``PREFIX.idx`` (little endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
              8 uint16 - RWKV corpora use 8)
    uint64    n       number of sequences
    uint64    m       number of entries in doc_idx
    int32[n]  sizes     tokens per sequence
    int64[n]  pointers  byte offset of each sequence in PREFIX.bin
    int64[m]  doc_idx   sequence index where each document starts (plus a final n)

``PREFIX.bin`` holds the tokens back to back. Both files are memory-mapped, so a corpus of any size opens
instantly.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from . import DataError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}


def binidx_prefix(path: Union[str, os.PathLike]) -> Path:
    """``x``, ``x.bin`` or ``x.idx`` -> the prefix ``x``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


def is_binidx(path: Union[str, os.PathLike]) -> bool:
    prefix = binidx_prefix(path)
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()


class BinIdx:
    """Sequences of a binidx corpus: ``len(x)``, ``x[i]`` (a numpy array of token ids), ``x.tokens`` (all)."""

    def __init__(self, path: Union[str, os.PathLike]):
        prefix = binidx_prefix(path)
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (a binidx corpus is a .idx and a .bin file with one prefix)")
        raw = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        head = 9 + 8 + 1 + 8 + 8
        if len(raw) < head or bytes(raw[:9]) != MAGIC:
            raise DataError(f"{self.idx_path}: not a binidx index (expected the header {MAGIC!r})")
        version, = struct.unpack("<Q", bytes(raw[9:17]))
        if version != 1:
            raise DataError(f"{self.idx_path}: binidx version {version} is not supported (only 1)")
        code = int(raw[17])
        if code not in DTYPES:
            raise DataError(f"{self.idx_path}: unknown token dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        n, m = struct.unpack("<QQ", bytes(raw[18:34]))
        need = head + 4 * n + 8 * n + 8 * m
        if len(raw) < need:
            raise DataError(f"{self.idx_path}: truncated ({len(raw)} bytes; the header announces {n} sequences "
                            f"and {m} document entries, {need} bytes)")
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=head)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=head + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=m, offset=head + 12 * n)
        size = self.bin_path.stat().st_size
        total = int(self.sizes.astype(np.int64).sum())
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if end > size:
            raise DataError(f"{self.bin_path}: {size} bytes, but the index points up to byte {end} "
                            f"({total} tokens of {self.dtype})")
        self.tokens = (np.memmap(self.bin_path, mode="r", dtype=self.dtype, shape=(size // self.dtype.itemsize,))
                       if size else np.zeros(0, dtype=self.dtype))
        self.num_tokens = total

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        i %= len(self)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.sizes[i])])

    def documents(self) -> List[np.ndarray]:
        """Each document's tokens (documents may span several sequences)."""
        bounds = list(self.doc_idx) if len(self.doc_idx) else [0, len(self)]
        return [np.concatenate([self[j] for j in range(int(a), int(b))]) if b > a else np.zeros(0, self.dtype)
                for a, b in zip(bounds[:-1], bounds[1:])]


class BinIdxRows:
    """The corpus as one token stream cut into rows of ``row_len`` tokens (loss on every token), as RWKV
    pre-training does. Sequences follow one another as written (their end-of-text tokens included)."""

    def __init__(self, corpus: BinIdx, row_len: int):
        if corpus.dtype.kind == "f":
            raise DataError(f"{corpus.bin_path}: holds {corpus.dtype} values, not token ids")
        self.corpus, self.row_len = corpus, row_len
        first = int(corpus.pointers[0]) // corpus.dtype.itemsize if len(corpus) else 0
        self.start = first
        self.n = corpus.num_tokens // row_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        ids = self.corpus.tokens[self.start + i * self.row_len: self.start + (i + 1) * self.row_len]
        ids = [int(t) for t in ids]
        return {"input_ids": ids, "labels": list(ids)}
