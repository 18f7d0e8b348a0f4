"""The RWKV-6 "Finch" WKV recurrence: a plain reference, a chunked form, and the dispatch.

Per head, with the state ``S`` laid out ``[key, value]`` (the official package's v6 layout, ``S[h, key, value]``):

    o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t                      o: [N]
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T                         S: [N, N]

``w`` is the log of the per-channel (key) decay, ``w <= 0``; in the model ``w = -exp(time_decay + lora(x))``.
``u`` (``time_faaaa``, shaped ``[H, N]``) is the bonus of the current token.

Every function here takes ``r, w, k, v`` shaped ``[B, T, H, N]``, ``u`` shaped ``[H, N]`` and an optional initial
state ``[B, H, N, N]`` (or ``[H, N, N]`` shared by the batch), and returns ``(o [B, T, H, N], final_state
[B, H, N, N])``. The state is fp32 (fp64 for fp64 inputs); ``o`` has the dtype of ``r``. All of them are
differentiable with respect to every input, the initial state included.

Paths:
- ``wkv6_recurrent``: one step at a time; slow, obviously right; the oracle for the others.
- ``wkv6_chunked``: the same sums regrouped in chunks; the fast path on CPU;
- flash-linear-attention's ``chunk_rwkv6`` (``rwkv_peft.ops.fla``) on a GPU when fla imports.
``wkv6`` chooses between them; ``RWKV_PEFT_KERNEL=torch|fla|auto`` is read at call time. There is no RWKV-6 CUDA
kernel of ours: ``cuda`` forced raises a RuntimeError; ``auto`` on a GPU takes fla's kernel, else PyTorch.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .wkv7 import KERNEL_ENV, MAX_CHUNK_LOG_DECAY, _BACKENDS, _initial_state, _run_in_blocks, _state_dtype, fla_or_torch

Tensor = torch.Tensor


def _check_inputs(r, w, k, v, u) -> Tuple[int, int, int, int]:
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N]; got shape {tuple(r.shape)}")
    for name, x in zip("wkv", (w, k, v)):
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(r.shape)} like r")
    B, T, H, N = r.shape
    if tuple(u.shape) != (H, N):
        raise ValueError(f"u has shape {tuple(u.shape)}; expected {(H, N)}")
    return B, T, H, N


def wkv6_recurrent(r, w, k, v, u, initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time, in fp32 (fp64 for fp64 inputs)."""
    B, T, H, N = _check_inputs(r, w, k, v, u)
    in_dtype, dt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)                         # [B, H, Nk, Nv]
    r, w, k, v = (x.to(dt) for x in (r, w, k, v))
    u = u.to(dt)[None, :, :, None]                                        # [1, H, Nk, 1]
    decay = torch.exp(w)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                    # k_t v_t^T  [B, H, Nk, Nv]
        outs.append((r[:, t, :, :, None] * (S + u * kv)).sum(dim=-2))     # (S + u kv)^T r  [B, H, Nv]
        S = decay[:, t, :, :, None] * S + kv
    o = torch.stack(outs, dim=1) if outs else r.new_zeros(B, 0, H, N, dtype=dt)
    return o.to(in_dtype), S


def wkv6_chunked(r, w, k, v, u, initial_state: Optional[Tensor] = None,
                 chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The recurrence regrouped in chunks of ``chunk_size`` tokens.

    With ``g_t = w_0 + ... + w_t`` the cumulative log-decay inside a chunk (positions 0..L-1), token ``t`` reads
    the chunk's incoming state decayed by ``exp(g_{t-1})`` and each earlier token ``s < t`` of the chunk through
    ``exp(g_{t-1} - g_s) <= 1``; the bonus term is the diagonal. While no chunk decays by more than
    ``exp(-60)`` that factor is a product of two factors inside fp32's range (one matmul); otherwise
    ``_intra_chunk_scores`` forms it from sums of ``w`` that are each <= 0, so no decay however close to 0
    overflows or loses the size-1 terms to rounding. Only the chunk-to-chunk state update runs sequentially.
    Long sequences run ``BLOCK_TOKENS`` tokens at a time with the state carried (``wkv7._run_in_blocks``):
    forward and backward cost linear in T.
    """
    B, T, H, N = _check_inputs(r, w, k, v, u)
    in_dtype, dt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)
    o, S = _run_in_blocks(_wkv6_block, [x.to(dt) for x in (r, w, k, v)], S, chunk_size, u.to(dt))
    return o.to(in_dtype), S


def _wkv6_block(r, w, k, v, S, chunk_size: int, u) -> Tuple[Tensor, Tensor]:
    """``wkv6_chunked`` on one block of inputs ``[B, T, H, N]`` (already in the state's dtype) from state ``S``."""
    B, T, H, N = r.shape
    dt = r.dtype
    L = chunk_size
    pad = (-T) % L
    xs = [r, w, k, v]
    if pad:  # zero inputs with zero log-decay leave the state untouched
        xs = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    n = (T + pad) // L
    r, w, k, v = (x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4) for x in xs)  # [B, H, n, L, N]

    # Prefix and suffix sums of w are each summed directly, not taken as differences of two large sums: a
    # factor of size 1 keeps its precision and its gradient is not swamped by cancelling terms, however small
    # the decays (only the fast path's product exp(g_prev) * exp(-g) is a difference, bounded by 60).
    g = torch.cumsum(w, dim=3)                                           # log G_t = w_0 + ... + w_t
    w_prev = torch.nn.functional.pad(w, (0, 0, 1, 0))[..., :L, :]        # w_{t-1} at row t (0 at t = 0)
    g_prev = torch.cumsum(w_prev, dim=3)                                 # log G_{t-1} = w_0 + ... + w_{t-1}
    w_next = torch.nn.functional.pad(w, (0, 0, 0, 1))[..., 1:, :]        # w_{s+1} at row s (0 at s = L - 1)
    g_after = torch.cumsum(w_next.flip(3), dim=3).flip(3)                # w_{s+1} + ... + w_{L-1}: s to chunk end
    if bool(g[..., -1, :].min() > -MAX_CHUNK_LOG_DECAY):
        strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # s < t
        # exp(g_prev_t - g_s) = exp(g_prev_t) * exp(-g_s): one matmul; both factors stay inside fp32's range
        A = ((r * torch.exp(g_prev)) @ (k * torch.exp(-g)).transpose(-1, -2)).masked_fill(~strict, 0.0)
    else:  # decays so small that exp(-g) would overflow: every factor <= 1, summed over its own segment of w
        A = _intra_chunk_scores(r, k, w, sub=next(d for d in (4, 2, 1) if L % d == 0))
    bonus = (r * u.to(dt)[:, None, None, :] * k).sum(-1, keepdim=True) * v  # (r_t . u k_t) v_t
    O_loc = A @ v + bonus                                                # [B, H, n, L, Nv]
    r_dec = r * torch.exp(g_prev)                                        # reads of the incoming state
    g_last = g[..., -1:, :]                                              # [B, H, n, 1, N]
    k_end = k * torch.exp(g_after)                                       # writes decayed to the chunk end
    d_end = torch.exp(g_last).transpose(-1, -2)                          # [B, H, n, Nk, 1]

    # Cut every per-chunk tensor into its n chunks once (views): the backward of one ``unbind`` stacks the n
    # chunk gradients into one tensor, where indexing ``x[:, :, i]`` in the loop would give every chunk's
    # backward a zero-filled gradient the size of the whole sequence (O(T) per chunk, O(T^2) in all).
    outs = []
    for r_dec_i, O_loc_i, d_end_i, k_end_i, v_i in zip(*(x.unbind(2) for x in (r_dec, O_loc, d_end, k_end, v))):
        outs.append(r_dec_i @ S + O_loc_i)                               # [B, H, L, Nv]
        S = d_end_i * S + k_end_i.transpose(-1, -2) @ v_i
    o = torch.stack(outs, dim=2)                                         # [B, H, n, L, N]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]
    return o, S


def _segment_sums(x: Tensor) -> Tensor:
    """x: [..., K, N]. Returns ``S[..., t, s, :] = x_{s+1} + ... + x_{t-1}`` for s < t (each summed directly,
    so ``S[t, t-1] = 0`` exactly) and -inf for s >= t: ``[..., K, K, N]``."""
    K = x.shape[-2]
    x_prev = torch.nn.functional.pad(x, (0, 0, 1, 0))[..., :K, :]               # x_{t-1} at row t
    after = torch.ones(K, K, dtype=torch.bool, device=x.device).tril(-2)       # t - 1 > s
    seg = torch.cumsum(x_prev.unsqueeze(-2) * after[:, :, None], dim=-3)
    strict = torch.ones(K, K, dtype=torch.bool, device=x.device).tril(-1)
    return seg.masked_fill(~strict[:, :, None], float("-inf"))


def _intra_chunk_scores(r: Tensor, k: Tensor, w: Tensor, sub: int) -> Tensor:
    """``A[..., t, s] = sum_c r_tc k_sc exp(w_{s+1,c} + ... + w_{t-1,c})`` for s < t, else 0; r, k, w: [..., L, N].

    Safe for any decay: the chunk is cut into blocks of ``sub`` tokens; for t in block b after s in block a the
    exponent splits into three sums of w, each <= 0 and each summed directly (t back to b's start, s forward
    to a's end, the whole blocks between), so no factor overflows, one underflows only where the product is
    even smaller, and a factor near 1 keeps its precision. Pairs inside one block take their own exponent
    (a ``[sub, sub, N]`` tensor per block). About five times the cost of the fast path's single matmul.
    """
    *lead, L, N = r.shape
    m, l = L // sub, sub
    rb, kb, wb = (x.reshape(*lead, m, l, N) for x in (r, k, w))
    pad = torch.nn.functional.pad
    P = torch.cumsum(pad(wb, (0, 0, 1, 0))[..., :l, :], dim=-2)                    # w_{start(b)} .. w_{t-1}
    Q = torch.cumsum(pad(wb, (0, 0, 0, 1))[..., 1:, :].flip(-2), dim=-2).flip(-2)  # w_{s+1} .. w_{end(a)}
    M = _segment_sums(wb.sum(-2))                                                  # blocks between [.., m(b), m(a), N]
    left = (rb * torch.exp(P)).unsqueeze(-3) * torch.exp(M).unsqueeze(-2)          # [..., m(b), m(a), l, N]
    right = (kb * torch.exp(Q)).unsqueeze(-4)                                      # [..., 1, m(a), l, N]
    X = left @ right.transpose(-1, -2)                                             # [..., m(b), m(a), l(i), l(j)]
    inside = (rb.unsqueeze(-2) * kb.unsqueeze(-3) * torch.exp(_segment_sums(wb))).sum(-1)  # [..., m, l, l]
    X = X + torch.eye(m, dtype=X.dtype, device=X.device)[:, :, None, None] * inside.unsqueeze(-3)
    return X.transpose(-3, -2).reshape(*lead, L, L)


def select_backend(device: torch.device, backend: Optional[str] = None) -> Tuple[str, str]:
    """Which path ``wkv6`` takes on ``device`` and why: ``(name, reason)``."""
    choice = (backend or os.environ.get(KERNEL_ENV) or "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a WKV backend; expected one of {_BACKENDS}")
    if choice == "cuda":
        raise RuntimeError(f"{KERNEL_ENV}=cuda was requested but this package has no RWKV-6 CUDA kernel yet; "
                           f"use {KERNEL_ENV}=torch or auto (the PyTorch chunked form)")
    if choice == "torch":
        return "torch", f"forced by {KERNEL_ENV}=torch" if backend is None else "forced by backend='torch'"
    if device.type != "cuda":
        if choice == "fla":
            raise RuntimeError(f"{KERNEL_ENV}=fla was requested but the tensors are on {device}")
        return "torch", f"tensors on {device.type}"
    return fla_or_torch(choice, "no RWKV-6 CUDA kernel of ours", "rwkv6")


def takes_cu_seqlens(device: torch.device) -> bool:
    """Whether ``wkv6`` on ``device`` runs packed samples itself (``cu_seqlens``: the fla path)."""
    try:
        return select_backend(device)[0] == "fla"
    except RuntimeError:
        return False


def wkv6(r, w, k, v, u, initial_state: Optional[Tensor] = None,
         backend: Optional[str] = None, chunk_size: int = 16,
         cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The WKV-6 recurrence on the path ``select_backend`` picks (see the module docstring); ``cu_seqlens`` as
    ``wkv7`` takes it (the fla path only)."""
    name, _ = select_backend(r.device, backend)
    if cu_seqlens is not None and name != "fla":
        raise ValueError(f"cu_seqlens runs on the fla path only (this call takes the {name} path)")
    if name == "fla":
        from .fla import wkv6_fla
        return wkv6_fla(r, w, k, v, u, initial_state, cu_seqlens=cu_seqlens)
    if r.shape[1] == 1:  # one token (generation): the recurrence is the cheapest form
        return wkv6_recurrent(r, w, k, v, u, initial_state)
    return wkv6_chunked(r, w, k, v, u, initial_state, chunk_size=chunk_size)
