"""The order of the training data: micro-batches across epochs for one process, addressable by index.

Epoch ``e`` shuffles the rows with seed ``train.seed + e``, each process takes every ``world``-th row of that
order, and the stream runs across epochs. The data position is therefore just ``step * grad_accum``
micro-batches, which is what makes resume exact.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from ..data import DataError
from ..data.packing import IGNORE, collate


class Stream:
    """Micro-batches across epochs for one process; ``indices(micro)`` are the rows of micro-batch ``micro``."""

    def __init__(self, n_rows: int, batch_size: int, rank: int, world: int, seed: int):
        self.per_rank = n_rows // world
        if self.per_rank == 0:
            raise DataError(f"{n_rows} training row(s) cannot feed {world} processes")
        self.n, self.bs, self.rank, self.world, self.seed = n_rows, batch_size, rank, world, seed
        self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order, self._epoch = perm[self.rank::self.world][: self.per_rank], epoch
        return self._order

    def locate(self, micro: int):
        """(epoch, batch index within the epoch) of micro-batch ``micro``."""
        return divmod(micro, self.batches_per_epoch)

    def indices(self, micro: int) -> List[int]:
        epoch, b = self.locate(micro)
        return self.order(epoch)[b * self.bs: (b + 1) * self.bs]


def rows(ds, idx: List[int]) -> List[dict]:
    """Rows ``idx`` of a ``datasets.Dataset`` (one columnar read) or of a list."""
    if hasattr(ds, "select") and hasattr(ds, "column_names"):
        cols = ds[idx]
        names = [n for n in ("input_ids", "labels", "position_ids") if n in cols]
        return [dict(zip(names, values)) for values in zip(*(cols[n] for n in names))]
    return [ds[i] for i in idx]


def batch_of(ds, idx: List[int]) -> Dict[str, torch.Tensor]:
    """The collated (right-padded) batch of rows ``idx``: input_ids, labels, attention_mask [B, T] on the CPU."""
    return collate(rows(ds, idx))


def pad_batch(batch: Dict[str, torch.Tensor], length: int) -> Dict[str, torch.Tensor]:
    """``batch`` right-padded to ``length`` tokens (padding carries no loss and changes no real token)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": 0, "labels": IGNORE, "attention_mask": 0, "position_ids": 1}  # padding starts nothing
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def same_length(acc, batches: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    """``batches`` padded so that batch ``j`` is as long on every process (one all-reduce): under FSDP2 or
    DeepSpeed each forward is a collective, and the number of chunks (and loss chunks) follows the length."""
    import torch.distributed as dist
    lengths = torch.tensor([b["input_ids"].shape[1] for b in batches], device=acc.device)
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
    return [pad_batch(b, int(n)) for b, n in zip(batches, lengths.tolist())]
