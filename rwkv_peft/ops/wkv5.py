"""The RWKV-5.2 "Eagle" WKV recurrence: a plain reference, a chunked form, and the dispatch.

Per head, with the state ``S`` laid out ``[key, value]`` (the official package's v5 layout, ``S[h, key, value]``):

    o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t                      o: [N]
    S_t = diag(exp(w)) S_{t-1} + k_t v_t^T                           S: [N, N]

``w`` is the log of the per-channel (key) decay, ``w <= 0``. In RWKV-5.2 it does not depend on the data: the
model passes ``w = -exp(time_decay)`` shaped ``[H, N]`` (the official package's ``exp(-exp(time_decay))`` is
``exp(w)``). A per-token ``w`` shaped ``[B, T, H, N]`` is accepted too: the model uses it for padded batches,
where a padded token must not decay the state (``w = 0`` there). ``u`` (``time_faaaa``, ``[H, N]``) is the bonus
of the current token, used as it is (the package does the same for checkpoints that name it ``time_faaaa``).

Contract of every function here:
    r, k, v        [B, T, H, N]
    w              [H, N] (time-invariant, the RWKV-5.2 case) or [B, T, H, N]
    u              [H, N]
    initial_state  None (zeros), [B, H, N, N], or [H, N, N] shared by the batch (its gradient sums over it)
    returns        (o [B, T, H, N] in r's dtype, final_state [B, H, N, N])
The state is computed in fp32 (fp64 for fp64 inputs). Everything is differentiable through autograd with
respect to every input, the initial state included.

Paths:
- ``wkv5_recurrent``: one step at a time; slow, obviously right; the oracle for the others.
- ``wkv5_chunked``: the same sums regrouped in chunks; O(T) in time and memory, forward and backward (the
  per-chunk tensors are split once before the sequential loop, never sliced out of whole-sequence tensors inside
  it). A final partial chunk is handled as a shorter chunk (no padding, so a time-invariant decay never decays
  the state at positions that do not exist).
``wkv5`` chooses between them; ``RWKV_PEFT_KERNEL=torch|cuda|auto`` is read at call time. There is no RWKV-5
CUDA kernel in this package yet: ``cuda`` forced raises a RuntimeError, ``auto`` takes the PyTorch path.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .wkv6 import _intra_chunk_scores
from .wkv7 import KERNEL_ENV, MAX_CHUNK_LOG_DECAY, _BACKENDS, _initial_state, _state_dtype

Tensor = torch.Tensor


def _check_inputs(r, w, k, v, u) -> Tuple[int, int, int, int]:
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N]; got shape {tuple(r.shape)}")
    for name, x in zip("kv", (k, v)):
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(r.shape)} like r")
    B, T, H, N = r.shape
    if tuple(w.shape) not in ((H, N), tuple(r.shape)):
        raise ValueError(f"w has shape {tuple(w.shape)}; expected {(H, N)} (time-invariant) or "
                         f"{tuple(r.shape)} (per token)")
    if tuple(u.shape) != (H, N):
        raise ValueError(f"u has shape {tuple(u.shape)}; expected {(H, N)}")
    return B, T, H, N


def wkv5_recurrent(r, w, k, v, u, initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time, in fp32 (fp64 for fp64 inputs)."""
    B, T, H, N = _check_inputs(r, w, k, v, u)
    in_dtype, sdt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)                         # [B, H, Nk, Nv]
    r, k, v = (x.to(sdt) for x in (r, k, v))
    u = u.to(sdt)[None, :, :, None]                                       # [1, H, Nk, 1]
    decay = torch.exp(w.to(sdt))
    decays = [decay[None, :, :, None]] * T if w.dim() == 2 else [d[..., None] for d in decay.unbind(1)]
    outs = []
    for rt, kt, vt, dt in zip(r.unbind(1), k.unbind(1), v.unbind(1), decays):  # split once, not sliced per step
        kv = kt[..., :, None] * vt[..., None, :]                          # k_t v_t^T  [B, H, Nk, Nv]
        outs.append((rt[..., :, None] * (S + u * kv)).sum(dim=-2))        # (S + u kv)^T r  [B, H, Nv]
        S = dt * S + kv
    o = torch.stack(outs, dim=1) if outs else r.new_zeros(B, 0, H, N)
    return o.to(in_dtype), S


def _chunk_terms(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor):
    """Everything of a run of equal-length chunks that does not need the state.

    r, k, v: [B, H, n, L, N]; w: [H, N] (time-invariant) or [B, H, n, L, N]; u: [H, N].
    Returns (O_loc [B, H, n, L, Nv], r_dec [B, H, n, L, Nk], k_end [B, H, n, L, Nk], d_end [.., n, Nk, 1]):
    the chunk's own contribution to its outputs, the reads of the incoming state, the writes decayed to the
    chunk's end, and the chunk's total decay.
    """
    L = r.shape[-2]
    if w.dim() == 2:  # time-invariant: every sum of w is a multiple of w, formed exactly as one product
        pos = torch.arange(L, dtype=w.dtype, device=w.device)[:, None]  # [L, 1]
        wl = w[:, None, :]                                                # [H, 1, N]
        lift = lambda x: x[None, :, None]  # noqa: E731                   [H, L', N] -> [1, H, 1, L', N]
        g_prev, g = lift(pos * wl), lift((pos + 1) * wl)                  # t w, (t + 1) w
        g_after, g_last = lift((L - 1 - pos) * wl), lift(L * wl)          # (L - 1 - s) w, L w
        w_full = lambda: lift(wl.expand(-1, L, -1)).expand_as(r)  # noqa: E731
    else:  # per token: prefix and suffix sums, each summed directly (as in wkv6_chunked)
        pad = torch.nn.functional.pad
        g = torch.cumsum(w, dim=-2)                                       # w_0 + ... + w_t
        g_prev = torch.cumsum(pad(w, (0, 0, 1, 0))[..., :L, :], dim=-2)   # w_0 + ... + w_{t-1}
        g_after = torch.cumsum(pad(w, (0, 0, 0, 1))[..., 1:, :].flip(-2), dim=-2).flip(-2)  # w_{s+1} .. w_{L-1}
        g_last = g[..., -1:, :]
        w_full = lambda: w  # noqa: E731
    if bool(g_last.min() > -MAX_CHUNK_LOG_DECAY):
        strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # s < t
        # exp(g_prev_t - g_s) = exp(g_prev_t) * exp(-g_s): one matmul; both factors stay inside fp32's range
        A = ((r * torch.exp(g_prev)) @ (k * torch.exp(-g)).transpose(-1, -2)).masked_fill(~strict, 0.0)
    else:  # decays so small that exp(-g) would overflow: every factor <= 1, summed over its own segment of w
        A = _intra_chunk_scores(r, k, w_full().contiguous(), sub=next(d for d in (4, 2, 1) if L % d == 0))
    bonus = (r * u[:, None, None, :] * k).sum(-1, keepdim=True) * v      # (r_t . u k_t) v_t
    return A @ v + bonus, r * torch.exp(g_prev), k * torch.exp(g_after), torch.exp(g_last).transpose(-1, -2)


def wkv5_chunked(r, w, k, v, u, initial_state: Optional[Tensor] = None,
                 chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The recurrence regrouped in chunks of ``chunk_size`` tokens (the last one may be shorter).

    Inside a chunk (positions 0..L-1) token ``t`` reads the incoming state decayed by ``exp(g_{t-1})`` and each
    earlier token ``s < t`` of the chunk through ``exp(g_{t-1} - g_s) <= 1``, with ``g_t = w_0 + ... + w_t``
    (``(t + 1) w`` for a time-invariant decay); the bonus is the diagonal. While no chunk decays by more than
    ``exp(-60)`` that factor is a product of two factors inside fp32's range (one matmul); otherwise the
    pairwise form of ``wkv6._intra_chunk_scores`` is used, where every factor is <= 1. Only the chunk-to-chunk
    state update runs sequentially, over tensors split into chunks once before the loop.
    """
    B, T, H, N = _check_inputs(r, w, k, v, u)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    in_dtype, sdt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S
    r, k, v, u = (x.to(sdt) for x in (r, k, v, u))
    w = w.to(sdt)
    invariant = w.dim() == 2
    L = min(chunk_size, T)
    T_main = T // L * L

    def chunks(x: Tensor, start: int, stop: int, length: int) -> Tensor:  # [B, T, H, N] -> [B, H, n, L, N]
        return x[:, start:stop].reshape(B, (stop - start) // length, length, H, N).permute(0, 3, 1, 2, 4)

    # (start, stop, chunk length): the full chunks, then the shorter last one if there is one
    runs = [(0, T_main, L)] + ([(T_main, T, T - T_main)] if T_main < T else [])
    reads: List[Tensor] = []
    locs: List[Tensor] = []
    writes: List[Tensor] = []
    vals: List[Tensor] = []
    decays: List[Tensor] = []
    for start, stop, length in runs:
        rc, kc, vc = (chunks(x, start, stop, length) for x in (r, k, v))
        wc = w if invariant else chunks(w, start, stop, length)
        O_loc, r_dec, k_end, d_end = _chunk_terms(rc, kc, vc, wc, u)
        n = rc.shape[2]
        reads += r_dec.unbind(2)
        locs += O_loc.unbind(2)
        writes += [x.transpose(-1, -2) for x in k_end.unbind(2)]
        vals += vc.unbind(2)
        decays += [d_end[:, :, 0]] * n if invariant else list(d_end.unbind(2))

    outs = []
    for r_dec, O_loc, k_end_t, vc, d_end in zip(reads, locs, writes, vals, decays):
        outs.append(r_dec @ S + O_loc)                                   # [B, H, L, Nv]
        S = d_end * S + k_end_t @ vc
    o = torch.cat(outs, dim=2).permute(0, 2, 1, 3)                       # [B, T, H, N]
    return o.to(in_dtype), S


def select_backend(device: torch.device, backend: Optional[str] = None) -> Tuple[str, str]:
    """Which path ``wkv5`` takes on ``device`` and why: ``(name, reason)``."""
    choice = (backend or os.environ.get(KERNEL_ENV) or "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a WKV backend; expected one of {_BACKENDS}")
    if choice == "cuda":
        raise RuntimeError(f"{KERNEL_ENV}=cuda was requested but this package has no RWKV-5 CUDA kernel yet; "
                           f"use {KERNEL_ENV}=torch or auto (the PyTorch chunked form)")
    if choice == "torch":
        return "torch", f"forced by {KERNEL_ENV}=torch" if backend is None else "forced by backend='torch'"
    return "torch", "no RWKV-5 CUDA kernel yet" if device.type == "cuda" else f"tensors on {device.type}"


def wkv5(r, w, k, v, u, initial_state: Optional[Tensor] = None,
         backend: Optional[str] = None, chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The WKV-5 recurrence on the path ``select_backend`` picks (see the module docstring)."""
    select_backend(r.device, backend)
    if r.shape[1] == 1:  # one token (generation): the recurrence is the cheapest form
        return wkv5_recurrent(r, w, k, v, u, initial_state)
    return wkv5_chunked(r, w, k, v, u, initial_state, chunk_size=chunk_size)
