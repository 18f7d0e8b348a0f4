"""The causal-LM loss without ``[B, T, V]`` logits: a fused head + cross-entropy beside its plain reference.

With a 65,536-token vocabulary the logits of one 2 x 4096 batch are 2 GiB in fp32, more than the model they
come from. Both forms here run the head ``rows`` positions at a time:

* :func:`fused_linear_cross_entropy` (the fast path, a plain ``nn.Linear`` head): each chunk's gradients are
  taken in the forward, from one ``[rows, V]`` fp32 buffer turned into the softmax in place; the backward only
  scales them by the incoming gradient. No logits are kept and none are recomputed.
* :func:`checkpointed_cross_entropy` (any head: LoRA on the head, quantized or sharded weights): each chunk is
  run under activation checkpointing and recomputed in the backward. It is also the reference the fused path is
  tested against.

``rows`` defaults to what keeps a chunk's logits within :data:`LOGIT_BUDGET` elements.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
LOGIT_BUDGET = 1 << 24  # logits elements per chunk (64 MiB in fp32): 256 rows at V = 65,536


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t predicts label t+1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def chunk_rows(vocab_size: int, rows: Optional[int] = None) -> int:
    """Positions per loss chunk: ``rows`` if given, else as many as :data:`LOGIT_BUDGET` allows (at least 16)."""
    return rows if rows is not None else max(16, LOGIT_BUDGET // max(vocab_size, 1))


def _starts(y_host: torch.Tensor, rows: int) -> List[int]:
    """Chunk starts that have a target; every chunk when the targets are on a device (deciding would sync)."""
    starts = list(range(0, y_host.shape[0], rows))
    if y_host.device.type != "cpu":
        return starts
    return [s for s in starts if bool((y_host[s:s + rows] != IGNORE).any())]


def _ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")


def checkpointed_cross_entropy(h: torch.Tensor, head: nn.Module, y_host: torch.Tensor, rows: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(h)`` (h: [N, C]) against ``y_host`` ([N], -100 ignored), ``rows`` at a
    time, each chunk's logits recomputed in the backward. Never less than a zero that reaches every weight."""
    from torch.utils.checkpoint import checkpoint
    y = y_host.to(h.device, non_blocking=True)
    total = None
    for s in _starts(y_host, rows):
        ce = checkpoint(_ce_sum, head, h[s:s + rows], y[s:s + rows], use_reentrant=False)
        total = ce if total is None else total + ce
    if total is None:  # nothing to predict: a zero that still reaches every weight (DDP expects gradients)
        total = checkpoint(_ce_sum, head, h[:1], y[:1], use_reentrant=False)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` with the gradients taken in the forward (see the module doc)."""

    @staticmethod
    def forward(ctx, h, weight, y, starts, rows):
        # h: [N, C]; weight: [V, C]; y: [N] on h's device; starts: chunk starts to compute (the rest has no target)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=total.dtype, device=weight.device) if need_w else None
        for s in starts:
            hc, yc = h[s:s + rows], y[s:s + rows]                               # [n, C], [n]
            logits = F.linear(hc, weight)                                       # [n, V]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
            lse = torch.logsumexp(logits, dim=-1)                               # [n]
            keep = (yc != IGNORE).float()                                       # [n]
            at = yc.clamp_min(0)[:, None]                                       # [n, 1]
            total += ((lse - logits.gather(1, at)[:, 0]) * keep).sum()
            if gh is None and gw is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()                            # softmax, in place
            grad.scatter_add_(1, at, -torch.ones_like(at, dtype=grad.dtype)).mul_(keep[:, None])
            if gh is not None:
                gh[s:s + rows] = grad.to(weight.dtype) @ weight                # [n, C]
            if gw is not None:
                gw += grad.t().to(hc.dtype) @ hc                               # [V, C]
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gh, gw = ctx.saved_tensors
        return (None if gh is None else gh * grad_total.to(gh.dtype),
                None if gw is None else (gw * grad_total).to(ctx.weight_dtype),
                None, None, None)


def fused_head(head: nn.Module) -> bool:
    """Whether ``head`` is a plain bias-free ``nn.Linear`` with whole, unsharded weights (the fused path)."""
    w = getattr(head, "weight", None)
    return (type(head) is nn.Linear and head.bias is None and type(w) in (torch.Tensor, nn.Parameter)
            and not hasattr(w, "ds_id"))  # DeepSpeed ZeRO-3 partitions parameters in place


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y_host: torch.Tensor,
                               rows: int) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` (h: [N, C], weight: [V, C]) against ``y_host`` ([N], -100
    ignored); the gradients of ``h`` and ``weight`` (where they need one) are exact, in fp32 per chunk."""
    y = y_host.to(h.device, non_blocking=True)
    return _LinearCrossEntropy.apply(h, weight, y, _starts(y_host, rows), rows)


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                          chunk_size: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (-100 ignored), in fp32, never holding more
    than ``chunk_size`` rows of logits (default: :func:`chunk_rows`).

    hidden: [B, T, C]; targets: [B, T] aligned with hidden (what each position predicts). Chunks without a
    target are skipped when ``targets`` is on the CPU (deciding it for device targets would sync the host).
    """
    h = hidden.reshape(-1, hidden.shape[-1])                                         # [B*T, C]
    y_host = targets.reshape(-1)
    rows = chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 0, chunk_size)
    if fused_head(head):
        return fused_linear_cross_entropy(h, head.weight, y_host, rows)
    return checkpointed_cross_entropy(h, head, y_host, rows)


def chunked_causal_lm_loss(hidden, head: nn.Module, labels=None, chunk_size: Optional[int] = None,
                           num_items_in_batch=None, shift_labels=None):
    """Mean next-token cross-entropy (transformers' convention: ``labels`` unshifted, or ``shift_labels``
    already aligned), divided by ``num_items_in_batch`` when given (the step's token count under gradient
    accumulation), else by this batch's count. Never holds the ``[B, T, V]`` logits.
    """
    targets = shift_labels if shift_labels is not None else shift_targets(labels)
    total = chunked_cross_entropy(hidden, head, targets, chunk_size)
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    if isinstance(count, torch.Tensor):
        return total / count.to(total.device).clamp_min(1)
    return total / max(count, 1)
