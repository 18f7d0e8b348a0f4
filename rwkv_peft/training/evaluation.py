"""Evaluation during (and after) a run: the eval loss, never holding ``[B, T, V]`` logits, and greedy samples."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch

from ..data.packing import IGNORE, chunk_spans
from ..models.common import shift_targets
from .batches import batch_of


@torch.no_grad()
def evaluate_rows(net, rows, batch_size: int, chunk_len: Optional[int] = None, device=None,
                  max_batches: Optional[int] = None, rank: int = 0, world: int = 1, autocast=None,
                  loss_chunk_size: int = 1024):
    """Summed token loss (float64, on ``device``) and token count of ``rows`` (this process's share: every
    ``world``-th row). ``chunk_len`` runs each row in chunks with the state carried, as training does."""
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    idx = list(range(rank, len(rows), world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)][:max_batches or None]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with (autocast() if autocast is not None else contextlib.nullcontext()):
        for b in batches:
            batch = batch_of(rows, b)
            ids, targets = batch["input_ids"].to(device), shift_targets(batch["labels"])  # [B, T]; CPU targets
            state = None
            for s, e in (chunk_spans(ids.shape[1], chunk_len) if chunk_len else [(0, ids.shape[1])]):
                out = net(input_ids=ids[:, s:e], state=state, use_cache=bool(chunk_len),
                          shift_labels=targets[:, s:e], num_items_in_batch=1, return_logits=False,
                          loss_chunk_size=loss_chunk_size)
                state = out.state
                loss_sum += out.loss.double()
            tokens += int((targets != IGNORE).sum())
    net.train(was_training)
    return loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)


def eval_metrics(loss_sum: torch.Tensor, tokens: torch.Tensor) -> Dict[str, float]:
    """Mean token loss, perplexity and token count from (summed loss, tokens)."""
    loss = float(loss_sum / tokens.clamp_min(1))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def print_samples(net, tokenizer, prompts, max_new_tokens: int, at: int, say, logger) -> None:
    """Greedy continuations of the recipe's eval prompts, printed and logged as text at step ``at``."""
    from .generation import greedy
    for p in prompts:
        text = greedy(net, tokenizer, p, max_new_tokens)
        say(f"  [{at}] {p!r} -> {text!r}")
        logger.text("samples", f"**{p}**{text}", at)
