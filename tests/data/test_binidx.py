"""The binidx reader, against a small writer of the format written here."""
import struct

import numpy as np
import pytest

from rwkv_peft.data import BinIdx, BinIdxRows, DataError, build_datasets
from rwkv_peft.recipe import DataSection

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}


def write_binidx(prefix, docs, dtype=np.uint16):
    """Megatron MMapIndexedDataset layout: one sequence per document."""
    arrays = [np.asarray(d, dtype=dtype) for d in docs]
    with open(f"{prefix}.bin", "wb") as f:
        for a in arrays:
            f.write(a.tobytes())
    sizes = np.array([len(a) for a in arrays], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize)]).astype(np.int64)
    doc_idx = np.arange(len(arrays) + 1, dtype=np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    return prefix


DOCS = [[5, 6, 7, 0], [9, 9, 0], list(range(100, 130)) + [0], [65000, 65535, 0]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reader(tmp_path, dtype):
    prefix = write_binidx(tmp_path / "corpus", DOCS, dtype)
    c = BinIdx(str(prefix) + ".idx")
    assert len(c) == 4 and c.dtype == np.dtype(dtype) and c.num_tokens == sum(map(len, DOCS))
    for i, d in enumerate(DOCS):
        assert c[i].tolist() == d
    assert c[-1].tolist() == DOCS[-1]
    assert [d.tolist() for d in c.documents()] == DOCS
    with pytest.raises(IndexError):
        c[4]
    rows = BinIdxRows(c, 8)
    stream = [t for d in DOCS for t in d]
    assert len(rows) == len(stream) // 8
    assert rows[1] == {"input_ids": stream[8:16], "labels": stream[8:16]}


def test_bad_files(tmp_path):
    prefix = write_binidx(tmp_path / "c", DOCS)
    raw = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC!" + raw[9:])
    (tmp_path / "bad.bin").write_bytes((tmp_path / "c.bin").read_bytes())
    with pytest.raises(DataError, match="not a binidx index"):
        BinIdx(tmp_path / "bad")
    (tmp_path / "short.idx").write_bytes(raw[:40])
    (tmp_path / "short.bin").write_bytes(b"")
    with pytest.raises(DataError, match="truncated"):
        BinIdx(tmp_path / "short")
    (tmp_path / "cut.idx").write_bytes(raw)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "c.bin").read_bytes()[:10])
    with pytest.raises(DataError, match="the index points up to byte"):
        BinIdx(tmp_path / "cut")
    (tmp_path / "ver.idx").write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    (tmp_path / "ver.bin").write_bytes(b"")
    with pytest.raises(DataError, match="version 2"):
        BinIdx(tmp_path / "ver")
    with pytest.raises(DataError, match="no such file"):
        BinIdx(tmp_path / "absent")
    assert prefix


def test_binidx_as_training_data(tmp_path, tok):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    train, ev = build_datasets(DataSection(train=str(prefix), max_length=8, eval_split=1), tok, log=lambda m: None)
    assert len(train) + len(ev) == sum(map(len, DOCS)) // 8 and len(ev) == 1
    with pytest.raises(DataError, match="set data.format: text"):
        build_datasets(DataSection(train=str(prefix) + ".bin", format="chat", max_length=8), tok)
