"""Evaluation during (and after) a run: the eval loss, never holding ``[B, T, V]`` logits, and greedy samples."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch

from ..data.packing import IGNORE, chunk_spans
from ..models.common import shift_targets
from .batches import batch_of
from .step import positions


@torch.no_grad()
def evaluate_rows(net, rows, batch_size: int, chunk_len: Optional[int] = None, device=None,
                  max_batches: Optional[int] = None, rank: int = 0, world: int = 1, autocast=None,
                  loss_chunk_size: Optional[int] = None, same_length: Optional[Callable] = None):
    """Summed token loss (float64, on ``device``) and token count of ``rows`` (this process's share: every
    ``world``-th row). ``chunk_len`` runs each row in chunks with the state carried, as training does.

    ``same_length`` (FSDP2, DeepSpeed: ``batches.same_length`` bound to the accelerator): every process runs as
    many batches as the largest share, of the same shape (a short share is filled with rows that carry no loss).
    """
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with (autocast() if autocast is not None else contextlib.nullcontext()):
        for b in shares(len(rows), batch_size, rank, world, max_batches, equal=same_length is not None):
            batch = batch_of(rows, [max(i, 0) for i in b])
            batch["labels"][torch.tensor(b) < 0] = IGNORE
            if same_length is not None:
                batch = same_length([batch])[0]
            ids, targets = batch["input_ids"].to(device), shift_targets(batch["labels"])  # [B, T]; CPU targets
            tokens += int((targets != IGNORE).sum())
            if same_length is not None:  # the head runs on every loss chunk, as on every other process
                targets = targets.to(device)
            state, pos = None, batch.get("position_ids")
            pos = pos.to(device) if pos is not None else None
            for s, e in (chunk_spans(ids.shape[1], chunk_len) if chunk_len else [(0, ids.shape[1])]):
                out = net(input_ids=ids[:, s:e], state=state, use_cache=bool(chunk_len),
                          shift_labels=targets[:, s:e], num_items_in_batch=1, return_logits=False,
                          loss_chunk_size=loss_chunk_size, **positions(pos, s, e))
                state = out.state
                loss_sum += out.loss.double()
    net.train(was_training)
    return loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)


def shares(n_rows: int, batch_size: int, rank: int, world: int, max_batches: Optional[int] = None,
           equal: bool = False) -> List[List[int]]:
    """This process's eval batches (row indices): every ``world``-th row. ``equal``: as many rows as the
    largest share, ``-1`` standing for a row that carries no loss."""
    idx = list(range(rank, n_rows, world))
    if equal:
        idx += [-1] * (-(-n_rows // world) - len(idx))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)][:max_batches or None]


def eval_metrics(loss_sum: torch.Tensor, tokens: torch.Tensor) -> Dict[str, float]:
    """Mean token loss, perplexity and token count from (summed loss, tokens)."""
    loss = float(loss_sum / tokens.clamp_min(1))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def print_samples(net, tokenizer, prompts, max_new_tokens: int, at: int, say, logger, agree=None) -> None:
    """Greedy continuations of the recipe's eval prompts, printed and logged as text at step ``at``.
    ``agree``: see ``generation.greedy`` (every process generates in step under FSDP2 / DeepSpeed)."""
    from .generation import greedy
    for p in prompts:
        text = greedy(net, tokenizer, p, max_new_tokens, agree=agree)
        say(f"  [{at}] {p!r} -> {text!r}")
        logger.text("samples", f"**{p}**{text}", at)
