"""Rows for the model: packing short samples, batching with padding, shifted targets, long-context chunks.

Packing puts consecutive samples into one row of at most ``max_length`` tokens (a sample is never split; each
ends with the end-of-text token). RWKV carries its state through a row, so a packed sample starts from the
state the previous one left - the way RWKV models are pre-trained, with end-of-text marking the boundary.

Long samples are cut to ``max_length`` when they are tokenized. In ``long_context.mode: chunk`` a row of up to
``max_length`` tokens is run ``chunk_len`` tokens at a time with the state carried between the chunks
(:func:`chunk_spans`); the loop takes the loss on targets shifted once for the whole row
(:func:`shifted_targets`), so chunking gives the same loss as one pass.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

import torch

from ..models.common import shift_targets as shifted_targets  # noqa: F401 (one definition)

IGNORE = -100


def pack_samples(ids_list: Sequence[Sequence[int]], labels_list: Sequence[Sequence[int]], max_length: int
                 ) -> Tuple[List[List[int]], List[List[int]]]:
    """Greedy, order-preserving packing of samples into rows of at most ``max_length`` tokens."""
    rows_ids, rows_labels, cur_ids, cur_labels = [], [], [], []
    for ids, labels in zip(ids_list, labels_list):
        ids, labels = list(ids)[:max_length], list(labels)[:max_length]
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            rows_ids.append(cur_ids)
            rows_labels.append(cur_labels)
            cur_ids, cur_labels = [], []
        cur_ids += ids
        cur_labels += labels
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_labels.append(cur_labels)
    return rows_ids, rows_labels


def pack_dataset(ds, max_length: int, num_proc=None):
    """Pack a tokenized ``datasets.Dataset`` (columns input_ids, labels); cached like any datasets map."""
    def fn(batch):
        ids, labels = pack_samples(batch["input_ids"], batch["labels"], max_length)
        return {"input_ids": ids, "labels": labels}

    fp = hashlib.sha256(f"{ds._fingerprint}-pack-{max_length}".encode()).hexdigest()[:32]
    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, new_fingerprint=fp,
                  desc="packing")


def collate(rows: Sequence[Dict[str, Sequence[int]]], pad_id: int = 0, pad_to_multiple: int = 1
            ) -> Dict[str, torch.Tensor]:
    """Right-pad rows into ``input_ids``, ``labels`` (IGNORE on padding) and ``attention_mask`` tensors."""
    T = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def chunk_spans(length: int, chunk_len: int) -> List[Tuple[int, int]]:
    """``[(0, c), (c, 2c), ...]`` covering ``length`` tokens."""
    return [(s, min(s + chunk_len, length)) for s in range(0, length, chunk_len)]
