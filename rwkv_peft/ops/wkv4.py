"""The RWKV-4 WKV recurrence: a plain reference, a chunked form, and the dispatch.

Per channel (RWKV-4 has no heads; every one of the ``A`` attention channels is its own scalar recurrence):

    wkv_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t})
    a_t   = e^{w} a_{t-1} + e^{k_t} v_t          b_t = e^{w} b_{t-1} + e^{k_t}

``w`` is the log decay, ``w = -exp(time_decay)`` (the official package stores exactly this at load, in fp32),
``u`` is ``time_first`` used as it is. ``a`` and ``b`` overflow quickly (``k`` sits in an exponent), so, as the
official package does, they are kept as ``a = aa * e^{pp}``, ``b = bb * e^{pp}`` with ``pp`` the running maximum
of the exponents: the state is the three vectors ``(aa, bb, pp)``, an empty state ``(0, 0, -1e30)``. The update
of the official ``att_seq`` / ``att_one``, step for step:

    p = max(pp, u + k);     wkv = (e^{pp-p} aa + e^{u+k-p} v) / (e^{pp-p} bb + e^{u+k-p})
    p' = max(w + pp, k);    aa = e^{w+pp-p'} aa + e^{k-p'} v;   bb = e^{w+pp-p'} bb + e^{k-p'};   pp = p'

Contract of every function here:
    w, u           [A]              (log decay <= 0, bonus)
    k, v           [B, T, A]
    initial_state  None (empty), [B, 3, A] or [3, A] shared by the batch: (aa, bb, pp) stacked on dim 1;
                   ``pp`` finite (the empty state uses -1e30, as the package)
    mask           None, or [B, T] (1 / True = real token): a padded token neither decays nor writes the state
                   (its k is -inf and its decay 0) and its output is the state's current read-out (0 if empty)
    returns        (wkv [B, T, A] in k's dtype, final_state [B, 3, A])
The state is computed in fp32 (fp64 for fp64 inputs). Gradients flow through autograd to every input, the
initial state included (through the maxima as well: ``pp`` is an output of the op).

Paths:
- ``wkv4_recurrent``: one token at a time, exactly the official update; O(T) sequential steps.
- ``wkv4_chunked``: the same sums regrouped in chunks of L tokens. Inside a chunk every pair (t, s <= t) gets its
  exponent ``k_s + (number of decaying tokens strictly between s and t) * w`` (``u + k_t`` on the diagonal),
  shifted by the row's maximum before ``exp`` -- the official max trick per output, so any range of ``k`` and
  ``w`` is safe (nothing is split into two factors that could overflow). The counts are integers, so the decay
  exponents are exact multiples of ``w``. Only the chunk-to-chunk state update (T / L steps) is sequential. Its
  intra-chunk tensors are ``[B, T/L, L, L, A]``: L times the activations of one pass (memory is the price of
  the parallelism; pick ``chunk_size`` accordingly). Default 8: on 1 CPU thread (B=2, T=1024, A=256, fp32)
  forward + backward took 0.28 s against 0.59 s for the recurrence (chunks of 16: 0.43 s, 32: 1.09 s).
``wkv4`` chooses between them; ``RWKV_PEFT_KERNEL=torch|cuda|auto`` is read at call time. There is no RWKV-4
CUDA kernel in this package: ``cuda`` forced raises a RuntimeError, ``auto`` takes the PyTorch path.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .wkv7 import KERNEL_ENV, _BACKENDS

Tensor = torch.Tensor

EMPTY_PP = -1e30  # the exponent of an empty state, as the official package starts it


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(w, u, k, v, mask) -> Tuple[int, int, int]:
    if k.dim() != 3:
        raise ValueError(f"k must be [B, T, A]; got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected {tuple(k.shape)} like k")
    B, T, A = k.shape
    for name, x in (("w", w), ("u", u)):
        if tuple(x.shape) != (A,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {(A,)}")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {(B, T)}")
    return B, T, A


def empty_state(batch: int, channels: int, dtype=torch.float32, device=None) -> Tensor:
    """The state a sequence starts from: ``aa = bb = 0``, ``pp = -1e30`` (``[B, 3, A]``)."""
    s = torch.zeros(batch, 3, channels, dtype=dtype, device=device)
    s[:, 2] = EMPTY_PP
    return s


def _initial_state(s0: Optional[Tensor], B: int, A: int, like: Tensor) -> Tensor:
    dtype = _state_dtype(like)
    if s0 is None:
        return empty_state(B, A, dtype, like.device)
    if tuple(s0.shape) == (3, A):
        s0 = s0.unsqueeze(0).expand(B, 3, A)
    if tuple(s0.shape) != (B, 3, A):
        raise ValueError(f"initial_state has shape {tuple(s0.shape)}; expected {(B, 3, A)} or {(3, A)} "
                         f"((aa, bb, pp) stacked on dim 1)")
    return s0.to(dtype)


def _masked(k: Tensor, mask: Optional[Tensor]) -> Tensor:
    """k with padded tokens at -inf: e^k = 0, they write nothing."""
    return k if mask is None else torch.where(mask.bool()[..., None], k, float("-inf"))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den = 0 only for a padded token read from an empty state (num = 0 then): 0, not NaN."""
    return num / torch.where(den == 0, torch.ones_like(den), den)


def wkv4_recurrent(w, u, k, v, initial_state: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Reference: the official update one token at a time (O(T) sequential steps), in fp32 (fp64 for fp64)."""
    B, T, A = _check_inputs(w, u, k, v, mask)
    in_dtype, sdt = k.dtype, _state_dtype(k)
    aa, bb, pp = _initial_state(initial_state, B, A, k).unbind(1)
    w, u, v = w.to(sdt), u.to(sdt), v.to(sdt)
    k = _masked(k.to(sdt), mask)
    ws = [w] * T if mask is None else [w * m[:, None] for m in mask.to(sdt).unbind(1)]  # no decay on padding
    outs = []
    for kt, vt, wt in zip(k.unbind(1), v.unbind(1), ws):  # split once, not sliced per step
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        outs.append(_safe_div(e1 * aa + e2 * vt, e1 * bb + e2))
        ww = wt + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    o = torch.stack(outs, dim=1) if outs else k.new_zeros(B, 0, A)
    return o.to(in_dtype), torch.stack([aa, bb, pp], dim=1)


def _chunk_terms(k: Tensor, v: Tensor, w: Tensor, u: Tensor, m: Optional[Tensor]):
    """Everything of a run of equal-length chunks that does not need the incoming state.

    k, v: [B, n, L, A] (k already -inf on padding); w, u: [A]; m: [B, n, L] (1 = real token) or None.
    Returns, per chunk:
      num, den, top   [B, n, L, A]  the chunk's own read-out at each t: sum_s e^{x_ts - top_t} (v_s | 1)
      dec_in          [B|1, n, L, A] the decay exponent from the chunk's start to t's read-out (count * w)
      a, b, z         [B, n, A]     the chunk's own writes at its end, as (aa, bb, pp)
      dec_all         [B|1, n, A]   the decay exponent over the whole chunk
    """
    L = k.shape[2]
    if m is None:
        c = torch.arange(1, L + 1, dtype=k.dtype, device=k.device).expand(1, 1, L)   # decaying tokens up to t
        c_prev = c - 1                                                              # ... up to t - 1
    else:
        c = torch.cumsum(m, dim=-1)
        c_prev = c - m
    c, c_prev = c[..., None], c_prev[..., None]                                       # [B|1, n, L, 1]
    # pair (t, s < t): k_s + (c_{t-1} - c_s) w   (integer counts: exact multiples of w)
    x = k[:, :, None] + (c_prev[:, :, :, None] - c[:, :, None]) * w                  # [B, n, L(t), L(s), A]
    eye = torch.eye(L, dtype=torch.bool, device=k.device)[:, :, None]
    lower = torch.ones(L, L, dtype=torch.bool, device=k.device).tril(-1)[:, :, None]
    x = torch.where(eye, (u + k)[:, :, :, None], torch.where(lower, x, float("-inf")))
    top = x.amax(dim=3).clamp_min(torch.finfo(x.dtype).min).detach()                 # the shift cancels
    e = torch.exp(x - top[:, :, :, None])
    num = (e * v[:, :, None]).sum(3)
    den = e.sum(3)
    # the chunk's writes at its end: s gets k_s + (c_{L-1} - c_s) w; pp is their maximum (an output: no detach)
    y = k + (c[:, :, -1:] - c) * w                                                   # [B, n, L, A]
    z = y.amax(dim=2).clamp_min(torch.finfo(y.dtype).min)
    f = torch.exp(y - z[:, :, None])
    return num, den, top, c_prev * w, (f * v).sum(2), f.sum(2), z, c[:, :, -1] * w


def wkv4_chunked(w, u, k, v, initial_state: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                 chunk_size: int = 8) -> Tuple[Tensor, Tensor]:
    """The recurrence regrouped in chunks of ``chunk_size`` tokens (the last one may be shorter; see the module
    docstring). Equal to ``wkv4_recurrent`` up to rounding, in values and gradients."""
    B, T, A = _check_inputs(w, u, k, v, mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    in_dtype, sdt = k.dtype, _state_dtype(k)
    aa, bb, pp = _initial_state(initial_state, B, A, k).unbind(1)
    if T == 0:
        return k.new_zeros(B, 0, A), torch.stack([aa, bb, pp], dim=1)
    w, u, v = w.to(sdt), u.to(sdt), v.to(sdt)
    k = _masked(k.to(sdt), mask)
    m = None if mask is None else mask.to(sdt)
    L = min(chunk_size, T)
    T_main = T // L * L
    runs = [(0, T_main, L)] + ([(T_main, T, T - T_main)] if T_main < T else [])

    chunks: List[tuple] = []
    for start, stop, length in runs:
        n = (stop - start) // length
        split = lambda x: x[:, start:stop].reshape(x.shape[0], n, length, *x.shape[2:])  # noqa: E731
        terms = _chunk_terms(split(k), split(v), w, u, None if m is None else split(m))
        # the decay terms of a dense run are the same for every chunk: [1, 1, ...], shared
        per_chunk = [t.unbind(1) if t.shape[1] == n else [t[:, 0]] * n for t in terms]
        chunks += list(zip(*per_chunk))

    outs = []
    for num, den, top, dec_in, a, b, z, dec_all in chunks:  # the only sequential part: T / L steps
        s = pp[:, None] + dec_in                                   # the incoming state's exponent at each t
        ref = torch.maximum(top, s).detach()                       # the shift cancels
        e_loc, e_st = torch.exp(top - ref), torch.exp(s - ref)
        outs.append(_safe_div(e_loc * num + e_st * aa[:, None], e_loc * den + e_st * bb[:, None]))
        carried = pp + dec_all
        new = torch.maximum(carried, z)
        e_old, e_new = torch.exp(carried - new), torch.exp(z - new)
        aa, bb, pp = e_old * aa + e_new * a, e_old * bb + e_new * b, new
    o = torch.cat(outs, dim=1)
    return o.to(in_dtype), torch.stack([aa, bb, pp], dim=1)


def select_backend(device: torch.device, backend: Optional[str] = None) -> Tuple[str, str]:
    """Which path ``wkv4`` takes on ``device`` and why: ``(name, reason)``."""
    choice = (backend or os.environ.get(KERNEL_ENV) or "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a WKV backend; expected one of {_BACKENDS}")
    if choice == "cuda":
        raise RuntimeError(f"{KERNEL_ENV}=cuda was requested but this package has no RWKV-4 CUDA kernel; "
                           f"use {KERNEL_ENV}=torch or auto (the PyTorch chunked form)")
    if choice == "torch":
        return "torch", f"forced by {KERNEL_ENV}=torch" if backend is None else "forced by backend='torch'"
    return "torch", "no RWKV-4 CUDA kernel" if device.type == "cuda" else f"tensors on {device.type}"


def wkv4(w, u, k, v, initial_state: Optional[Tensor] = None, mask: Optional[Tensor] = None,
         backend: Optional[str] = None, chunk_size: int = 8) -> Tuple[Tensor, Tensor]:
    """The WKV-4 recurrence on the path ``select_backend`` picks (see the module docstring)."""
    select_backend(k.device, backend)
    if k.shape[1] == 1:  # one token (generation): the recurrence is the cheapest form
        return wkv4_recurrent(w, u, k, v, initial_state, mask)
    return wkv4_chunked(w, u, k, v, initial_state, mask, chunk_size=chunk_size)
