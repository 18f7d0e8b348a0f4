"""Rows for the model: packing short samples, batching with padding, shifted targets, long-context chunks.

Packing puts consecutive samples into one row of at most ``max_length`` tokens (a sample is never split; each
ends with the end-of-text token). ``data.pack_state`` says what a packed sample starts from:

- ``reset`` (the default): the initial state, as if it ran alone. The row carries ``position_ids`` restarting
  at 0 at each sample (the Hugging Face convention, ``models/rows.py``), and a sample's first token is no
  target (alone, nothing predicts it), so loss and gradients are the sum over the samples run alone. What fine-
  tuning wants: with state tuning every sample starts from the learned state, as a fresh chat does.
- ``carry``: the state the previous sample left, with end-of-text marking the boundary - the way RWKV models
  are pre-trained; for continued pre-training on documents.

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
PACK_STATES = ("reset", "carry")


def pack_samples(ids_list: Sequence[Sequence[int]], labels_list: Sequence[Sequence[int]], max_length: int,
                 reset: bool = False) -> Tuple[List[List[int]], ...]:
    """Greedy, order-preserving packing of samples into rows of at most ``max_length`` tokens.

    Returns ``(rows_ids, rows_labels)``; with ``reset``, also ``rows_position_ids`` (0 where each sample starts)
    and each sample's first label set to IGNORE.
    """
    rows: List[Tuple[list, list, list]] = []
    cur = ([], [], [])
    for ids, labels in zip(ids_list, labels_list):
        ids, labels = list(ids)[:max_length], list(labels)[:max_length]
        if cur[0] and len(cur[0]) + len(ids) > max_length:
            rows.append(cur)
            cur = ([], [], [])
        if reset and labels:
            labels[0] = IGNORE
        cur[0].extend(ids)
        cur[1].extend(labels)
        cur[2].extend(range(len(ids)))
    if cur[0]:
        rows.append(cur)
    out = ([r[0] for r in rows], [r[1] for r in rows])
    return out + ([r[2] for r in rows],) if reset else out


def pack_dataset(ds, max_length: int, num_proc=None, pack_state: str = "reset"):
    """Pack a tokenized ``datasets.Dataset`` (columns input_ids, labels); cached like any datasets map.
    ``pack_state: reset`` adds a ``position_ids`` column (see the module docstring)."""
    if pack_state not in PACK_STATES:
        raise ValueError(f"pack_state {pack_state!r}: expected one of {', '.join(PACK_STATES)}")
    reset = pack_state == "reset"

    def fn(batch):
        out = pack_samples(batch["input_ids"], batch["labels"], max_length, reset=reset)
        return dict(zip(("input_ids", "labels", "position_ids"), out))

    fp = hashlib.sha256(f"{ds._fingerprint}-pack-{max_length}-{pack_state}".encode()).hexdigest()[:32]
    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, new_fingerprint=fp,
                  desc="packing")


def collate(rows: Sequence[Dict[str, Sequence[int]]], pad_id: int = 0, pad_to_multiple: int = 1
            ) -> Dict[str, torch.Tensor]:
    """Right-pad rows into ``input_ids``, ``labels`` (IGNORE on padding) and ``attention_mask`` tensors, and
    ``position_ids`` where the rows have them (packed with resets; padding counts on, never restarting at 0)."""
    T = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    with_pos = rows[0].get("position_ids") is not None
    pos = torch.arange(1, T + 1).repeat(B, 1) if with_pos else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        mask[i, :n] = 1
        if with_pos:
            pos[i, :n] = torch.as_tensor(list(r["position_ids"]), dtype=torch.long)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if with_pos:
        out["position_ids"] = pos
    return out


def chunk_spans(length: int, chunk_len: int) -> List[Tuple[int, int]]:
    """``[(0, c), (c, 2c), ...]`` covering ``length`` tokens."""
    return [(s, min(s + chunk_len, length)) for s in range(0, length, chunk_len)]
