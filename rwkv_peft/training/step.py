"""One optimizer step: forward and backward of each micro-batch, never holding ``[B, T, V]`` logits.

The step's loss is the mean cross-entropy over its trained tokens: each micro-batch's summed token loss is
divided by the token count of the whole step, counted on the CPU (no host sync). The model computes the loss
``loss_chunk_size`` positions at a time (``return_logits=False``), recomputing each chunk's logits in the
backward.

Several processes: DDP averages the gradients. Only the step's last backward synchronizes; every other forward
and backward runs under ``no_sync``, and DDP's all-reduce then carries the gradients accumulated before it, in
chunk mode too. Right padding needs no mask: padding carries no loss, and a pad only changes the state after a
row's last real token, which nothing reads. FSDP2: ``no_sync`` holds back the reduce-scatter the same way.
DeepSpeed: only the step's last backward is a gradient-accumulation boundary (where DeepSpeed clips and steps).
Under both, every forward is a collective, so ``lockstep`` keeps the targets on the device: the loss then calls
the head on every loss chunk, trained tokens or not, the same number of times on every process (the loop pads
the batches to a common length, see ``batches.same_length``).

Long-context chunk mode runs each row ``chunk_len`` tokens at a time, carrying the RWKV state from chunk to
chunk. The gradient flows through the carried state within a window of ``grad_chunks`` chunks; then the
window's loss is back-propagated, its graph freed and the state detached (truncated back-propagation through
time). ``grad_chunks: 1`` keeps the memory of one chunk. ``recompute: true`` instead carries the gradient
through the whole row at the memory of one chunk (:func:`recomputed_row_loss`). A trained initial state (state tuning) is read before a
row's first token, so it learns from the row's first window only; every later window adds a zero that reaches
it, so that each backward (the synchronizing one included) reaches every trained parameter. FSDP2 needs no such
zero (it reduces the gradients accumulated so far whatever the last backward reached; outside the forward its
parameters are sharded DTensors that a plain loss cannot touch), and state tuning alone is refused there.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import EXIT_FAILED, RWKVPeftError
from ..data.packing import IGNORE, chunk_spans
from ..models.common import shift_targets
from ..tuners.state_tuning import trained_initial_states
from .memory import release_freed_memory

Span = Tuple[int, int]


class TrainingError(RWKVPeftError, RuntimeError):
    """The run started and failed (exit code 1)."""
    exit_code = EXIT_FAILED


class TrainingDiverged(TrainingError):
    """A non-finite loss: the message names the step, the micro-batch and its rows."""


def windows(length: int, chunk_len: int, grad_chunks: int, chunked: bool) -> List[List[Span]]:
    """The token spans of a row, grouped into back-propagation windows: ``[[(0, T)]]`` outside chunk mode."""
    if not chunked:
        return [[(0, length)]]
    spans = chunk_spans(length, chunk_len)
    return [spans[i:i + grad_chunks] for i in range(0, len(spans), grad_chunks)]


def trained_tokens(batch) -> int:
    """How many positions of ``batch`` carry a loss (counted on the CPU)."""
    return int((shift_targets(batch["labels"]) != IGNORE).sum())


def micro_batch_loss(acc, model, batch, denom: float, lc, chunked: bool, sync: bool,
                     loss_chunk_size: Optional[int] = None, lockstep: bool = False) -> torch.Tensor:
    """Forward and backward of one micro-batch (loss / ``denom``); returns its summed token loss, detached.

    ``sync``: this micro-batch ends the step, so its last backward all-reduces the gradients.
    """
    ids = batch["input_ids"].to(acc.device, non_blocking=True)              # [B, T]
    pos = batch.get("position_ids")                                         # [B, T] packed with resets, or None
    pos = pos.to(acc.device, non_blocking=True) if pos is not None else None
    targets = shift_targets(batch["labels"])                                # [B, T] on the CPU (or the device)
    if lockstep:
        targets = targets.to(acc.device, non_blocking=True)
    if chunked and getattr(lc, "recompute", False):
        return recomputed_row_loss(acc, model, ids, targets, denom, lc.chunk_len, sync, loss_chunk_size, pos)
    wins = windows(ids.shape[1], lc.chunk_len, lc.grad_chunks, chunked)
    starts = trained_initial_states(model) if len(wins) > 1 and not lockstep else []  # FSDP2: see the doc
    total, state = None, None
    for w, window in enumerate(wins):
        last_window = sync and w == len(wins) - 1
        loss = None
        for c, (s, e) in enumerate(window):
            # DDP prepares its all-reduce in the forward right before the backward that syncs
            with _sync_if(acc, model, last_window and c == len(window) - 1):
                out = model(input_ids=ids[:, s:e], state=state, use_cache=chunked, shift_labels=targets[:, s:e],
                            num_items_in_batch=1, return_logits=False, loss_chunk_size=loss_chunk_size,
                            **positions(pos, s, e))
            loss = out.loss if loss is None else loss + out.loss
            state = out.state if chunked else None
        with _sync_if(acc, model, last_window):
            acc.backward(loss / denom if w == 0 or not starts else loss / denom + untouched(starts))
        total = loss.detach() if total is None else total + loss.detach()
        if state is not None:
            state = [tuple(t.detach() for t in layer) for layer in state]
    return total


def recomputed_row_loss(acc, model, ids, targets, denom: float, chunk_len: int, sync: bool,
                        loss_chunk_size: Optional[int] = None, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Chunk mode with the gradient through the whole row at the memory of one chunk (``long_context.recompute``).

    A forward without a graph keeps only the state at each chunk's start. Then, from the last chunk back, each
    chunk runs again from its saved state with a graph and is back-propagated with its loss plus
    ``<state it handed on, gradient the later chunks sent back>``; the gradient that reaches its starting state
    goes to the chunk before. The gradients equal one pass over the row (up to rounding) for about 1.3x the
    compute. The first chunk, from the initial (learned) state, runs last: its backward is the one DDP syncs.
    ids, targets, pos (position ids of packed rows, or None): [B, T]; returns the row's summed token loss, detached.
    """
    spans = chunk_spans(ids.shape[1], chunk_len)
    saved = [None]                                                          # the state at each chunk's start
    with torch.no_grad():
        for s, e in spans[:-1]:
            out = model(input_ids=ids[:, s:e], state=saved[-1], use_cache=True, logits_to_keep=1, **positions(pos, s, e))
            saved.append([tuple(t.detach().clone() for t in layer) for layer in out.state])  # not views of x
            release_freed_memory(ids.device)
    scaler = getattr(acc, "scaler", None)  # fp16: the gradients that come back are scaled already
    total, sent = None, None
    for i in reversed(range(len(spans))):
        (s, e), last = spans[i], sync and i == 0
        state = None if i == 0 else [tuple(t.clone().requires_grad_(True) for t in layer) for layer in saved[i]]
        with _sync_if(acc, model, last):
            out = model(input_ids=ids[:, s:e], state=state, use_cache=True, shift_labels=targets[:, s:e],
                        num_items_in_batch=1, return_logits=False, loss_chunk_size=loss_chunk_size,
                        **positions(pos, s, e))
            objective = out.loss / denom
            if sent is not None:
                unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
                objective = objective + sum((t * g).sum() * unscale for t, g in zip(_flat(out.state), sent)
                                            if g is not None and t.requires_grad)
            acc.backward(objective)
        release_freed_memory(ids.device)  # the CPU's resident memory stays that of one chunk
        sent = None if state is None else [t.grad for t in _flat(state)]
        total = out.loss.detach() if total is None else total + out.loss.detach()
    return total


def positions(pos: Optional[torch.Tensor], s: int, e: int) -> dict:
    """The ``position_ids`` of tokens ``s:e`` as model kwargs (packed rows with resets), or nothing."""
    return {} if pos is None else {"position_ids": pos[:, s:e]}


def _flat(state) -> List[torch.Tensor]:
    return [t for layer in state for t in layer]


def untouched(params) -> torch.Tensor:
    """A zero that reaches ``params`` (their gradient is unchanged; DDP sees them take part)."""
    return sum(p.sum() for p in params) * 0.0


def _sync_if(acc, model, sync: bool):
    if acc.distributed_type == "DEEPSPEED":
        acc.sync_gradients = sync  # a gradient-accumulation boundary: where DeepSpeed clips and steps
    return contextlib.nullcontext() if sync else acc.no_sync(model)


def forward_backward(acc, model, batches: Sequence[dict], lc, chunked: bool, loss_chunk_size: Optional[int] = None,
                     lockstep: bool = False):
    """All micro-batches of one step. Returns (summed token loss per micro-batch [n] on the device, tokens)."""
    tokens = sum(trained_tokens(b) for b in batches)
    denom = float(max(tokens, 1))
    losses = [micro_batch_loss(acc, model, b, denom, lc, chunked, sync=j == len(batches) - 1,
                               loss_chunk_size=loss_chunk_size, lockstep=lockstep) for j, b in enumerate(batches)]
    return torch.stack(losses), tokens


def check_finite(losses: List[float], step: int, where) -> None:
    """Stop at a non-finite micro-batch loss; ``where(j)`` describes micro-batch ``j`` (epoch, batch, rows)."""
    for j, value in enumerate(losses):
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss is {value} at step {step}, {where(j)}: the run stops (lower "
                                   f"train.lr, check the data, or resume from the last checkpoint)")
