"""The RWKV-7 WKV recurrence ("generalized delta rule"): a plain reference, a chunked form, and the dispatch.

Per head, with the state ``S`` laid out ``[value, key]`` (the official package's v7 layout):

    S_t = S_{t-1} @ (diag(exp(w_t)) + a_t b_t^T) + v_t k_t^T        S: [N, N]
    o_t = S_t @ r_t                                                  o: [N]

``w`` is the log of the per-channel decay (``w <= 0``); in the model ``a = -kk`` and ``b = kk * a_gate``.

Every function here takes ``r, w, k, v, a, b`` shaped ``[B, T, H, N]`` and an optional initial state
``[B, H, N, N]`` (or ``[H, N, N]`` shared by the batch), and returns ``(o [B, T, H, N], final_state
[B, H, N, N])``. The state is always fp32 (fp64 when the inputs are fp64); ``o`` has the dtype of ``r``.
All of them are differentiable with respect to every input, the initial state included.

Paths:
- ``wkv7_recurrent``: one step at a time; slow, obviously right; the oracle for the others.
- ``wkv7_chunked``: the same sums regrouped in chunks (a WY-style form); the fast path on CPU.
- the CUDA kernel (``rwkv_peft.ops.wkv7_cuda``) where it is available;
- flash-linear-attention's Triton kernel (``rwkv_peft.ops.fla``) on a GPU where ours is not and fla imports.
``wkv7`` chooses between them; ``RWKV_PEFT_KERNEL=torch|cuda|fla|auto`` (read at call time) forces a path.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

KERNEL_ENV = "RWKV_PEFT_KERNEL"
_BACKENDS = ("auto", "torch", "cuda", "fla")
MAX_CHUNK_LOG_DECAY = 60.0  # above this total log-decay in a chunk the chunked form switches to pairwise exponents
BLOCK_TOKENS = 1024  # the chunked forms run blocks of about this many tokens at a time (``_run_in_blocks``)


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _initial_state(s0: Optional[Tensor], B: int, H: int, N: int, like: Tensor) -> Tensor:
    dtype = _state_dtype(like)
    if s0 is None:
        return torch.zeros(B, H, N, N, dtype=dtype, device=like.device)
    if tuple(s0.shape) == (H, N, N):  # shared by the batch (state tuning); its gradient sums over the batch
        s0 = s0.unsqueeze(0).expand(B, H, N, N)
    if tuple(s0.shape) != (B, H, N, N):
        raise ValueError(f"initial_state has shape {tuple(s0.shape)}; expected {(B, H, N, N)} or {(H, N, N)}")
    return s0.to(dtype)


def _check_inputs(r, w, k, v, a, b) -> Tuple[int, int, int, int]:
    shape = r.shape
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N]; got shape {tuple(shape)}")
    for name, x in zip("wkvab", (w, k, v, a, b)):
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} like r")
    return tuple(shape)  # type: ignore[return-value]


def wkv7_recurrent(r, w, k, v, a, b, initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time, in fp32 (fp64 for fp64 inputs)."""
    B, T, H, N = _check_inputs(r, w, k, v, a, b)
    in_dtype, dt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)                      # [B, H, Nv, Nk]
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    decay = torch.exp(w)
    outs = []
    for t in range(T):
        at, bt, kt = a[:, t, :, :, None], b[:, t, :, None, :], k[:, t, :, None, :]   # [B,H,N,1] / [B,H,1,N]
        S = S * decay[:, t, :, None, :] + (S @ at) @ bt + v[:, t, :, :, None] @ kt   # S diag(d) + (S a) b^T + v k^T
        outs.append((S @ r[:, t, :, :, None]).squeeze(-1))                           # S r   [B, H, Nv]
    o = torch.stack(outs, dim=1) if outs else r.new_zeros(B, 0, H, N, dtype=dt)
    return o.to(in_dtype), S


def _wkv7_step(r, w, k, v, a, b, initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``wkv7_recurrent`` for T = 1 (decoding), minus the loop and its checks. The two matrix-vector products
    per head (``S a``, ``S r``) are broadcast products summed over the key axis and the rank-one writes are
    ``addcmul``s: on a CPU that is a third of the time of the batched matmuls on [B, H, 64, 64] (overhead-bound),
    and no less accurate (same fp32; each sum is over N = 64 terms)."""
    B, _, H, N = r.shape
    in_dtype, dt = r.dtype, _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)                                     # [B, H, Nv, Nk]
    r, w, k, v, a, b = r[:, 0].to(dt), w[:, 0].to(dt), k[:, 0].to(dt), v[:, 0].to(dt), a[:, 0].to(dt), b[:, 0].to(dt)
    u = (S * a.unsqueeze(-2)).sum(-1, keepdim=True)                                    # S a  [B, H, Nv, 1]
    S = torch.addcmul(S * torch.exp(w).unsqueeze(-2), u, b.unsqueeze(-2))             # S diag(d) + (S a) b^T
    S = torch.addcmul(S, v.unsqueeze(-1), k.unsqueeze(-2))                             # + v k^T
    o = (S * r.unsqueeze(-2)).sum(-1)                                                  # S r  [B, H, Nv]
    return o.view(B, 1, H, N).to(in_dtype), S


def wkv7_chunked(r, w, k, v, a, b, initial_state: Optional[Tensor] = None,
                 chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The recurrence regrouped in chunks of ``chunk_size`` tokens.

    Within a chunk write ``u_t = S_{t-1} a_t``, so ``S_t = S_{t-1} diag(d_t) + u_t b_t^T + v_t k_t^T``: the
    low-rank part becomes a second "value" ``u`` written with key ``b``. With ``G_t`` the cumulative decay
    inside the chunk, every term then carries a factor ``G_t / G_s`` (s <= t), computed as
    ``exp(log G_t - log G_s) <= 1`` so nothing overflows however small the decays are. The ``u`` of a chunk
    solve a unit lower-triangular system; only the chunk-to-chunk state update runs sequentially. Long
    sequences run ``BLOCK_TOKENS`` tokens at a time with the state carried (``_run_in_blocks``): forward and
    backward cost linear in T.
    """
    B, T, H, N = _check_inputs(r, w, k, v, a, b)
    in_dtype = r.dtype
    dt = _state_dtype(r)
    S = _initial_state(initial_state, B, H, N, r)
    xs = [x.to(dt) for x in (r, w, k, v, a, b)]
    o, S = _run_in_blocks(_wkv7_block, xs, S, chunk_size)
    return o.to(in_dtype), S


def _run_in_blocks(block_fn, xs, S: Tensor, chunk_size: int, *extra: Tensor) -> Tuple[Tensor, Tensor]:
    """``block_fn(*block_of_xs, S, chunk_size, *extra) -> (o, S)`` over the sequence inputs ``xs`` ``[B, T, H, N]``
    cut into blocks of whole chunks, ``BLOCK_TOKENS`` tokens each (rounded down to whole chunks), the state
    carried from block to block; returns the blocks' outputs joined along T and the final state.

    Cost linear in T, forward and backward, with the temporaries of one block at a time (they stay small however
    long T is). Each input is cut by one ``split``: its backward joins the
    blocks' gradients once, where slicing block by block would give every block's backward a zero-filled
    gradient the size of the whole sequence. (Checkpointing each block halved the memory kept for the backward
    but cost 25-40% more time on the CPU; not done.)
    """
    T = xs[0].shape[1]
    block = max(1, BLOCK_TOKENS // chunk_size) * chunk_size
    if T <= block:
        return block_fn(*xs, S, chunk_size, *extra)
    outs = []
    for part in zip(*(x.split(block, dim=1) for x in xs)):
        o, S = block_fn(*part, S, chunk_size, *extra)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def _wkv7_block(r, w, k, v, a, b, S, chunk_size: int) -> Tuple[Tensor, Tensor]:
    """``wkv7_chunked`` on one block of inputs ``[B, T, H, N]`` (already in the state's dtype) from state ``S``."""
    B, T, H, N = r.shape
    L = chunk_size
    pad = (-T) % L
    xs = [r, w, k, v, a, b]
    if pad:  # zero inputs with zero log-decay leave the state untouched
        xs = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    n = (T + pad) // L
    # [B, T, H, N] -> [B, H, n, L, N]
    r, w, k, v, a, b = (x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4) for x in xs)

    g = torch.cumsum(w, dim=3)                                          # log G_t (inclusive)  [B,H,n,L,N]
    g_prev = g - w                                                      # log G_{t-1}
    tri_strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # s < t
    tri_incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()      # s <= t

    if bool(g[..., -1, :].min() > -MAX_CHUNK_LOG_DECAY):
        # exp(gx_t - g_s) = exp(gx_t) * exp(-g_s): plain matmuls; both factors stay inside fp32's range
        e_neg = torch.exp(-g)

        def pair(x, gx, y, mask):  # sum_c x[t,c] y[s,c] exp(gx[t,c] - g[s,c]) for (t, s) in mask -> [B,H,n,L,L]
            return ((x * torch.exp(gx)) @ (y * e_neg).transpose(-1, -2)).masked_fill(~mask, 0.0)
    else:
        # decays so small that exp(-g) would overflow: take the exponent of each difference (<= 0) instead
        def pair(x, gx, y, mask):
            diff = gx.unsqueeze(-2) - g.unsqueeze(-3)                     # [B,H,n,L(t),L(s),N]
            diff = diff.masked_fill(~mask[:, :, None], float("-inf"))
            return torch.einsum("...tc,...sc,...tsc->...ts", x, y, torch.exp(diff))

    A_ab = pair(a, g_prev, b, tri_strict)                               # u_s -> u_t
    A_ak = pair(a, g_prev, k, tri_strict)                               # v_s -> u_t
    Q_b = pair(r, g, b, tri_incl)                                       # u_s -> o_t
    Q_k = pair(r, g, k, tri_incl)                                       # v_s -> o_t

    inv = _unit_lower_inverse(A_ab)                                     # (I - A_ab)^-1
    a_dec = a * torch.exp(g_prev)                                       # S_0 -> u_t   [B,H,n,L,N]
    r_dec = r * torch.exp(g)                                            # S_0 -> o_t
    W = inv @ a_dec                                                     # u = W S0^T + U_loc
    U_loc = inv @ (A_ak @ v)
    O_loc = Q_k @ v                                                     # [B,H,n,L,Nv]
    g_last = g[..., -1:, :]                                             # log G_L  [B,H,n,1,N]
    b_end = b * torch.exp(g_last - g)                                   # written keys decayed to chunk end
    k_end = k * torch.exp(g_last - g)
    d_end = torch.exp(g_last.squeeze(-2))                               # [B,H,n,N]

    # Cut every per-chunk tensor into its n chunks once (views): the backward of one ``unbind`` stacks the n
    # chunk gradients into one tensor, where indexing ``x[:, :, i]`` in the loop would give every chunk's
    # backward a zero-filled gradient the size of the whole sequence (O(T) per chunk, O(T^2) in all).
    chunks = zip(*(x.unbind(2) for x in (W, U_loc, r_dec, Q_b, O_loc, d_end.unsqueeze(-2), b_end, v, k_end)))
    outs = []
    for W_i, U_loc_i, r_dec_i, Q_b_i, O_loc_i, d_end_i, b_end_i, v_i, k_end_i in chunks:
        U = W_i @ S.transpose(-1, -2) + U_loc_i                         # [B,H,L,Nv]
        outs.append(r_dec_i @ S.transpose(-1, -2) + Q_b_i @ U + O_loc_i)
        S = S * d_end_i + U.transpose(-1, -2) @ b_end_i + v_i.transpose(-1, -2) @ k_end_i
    o = torch.stack(outs, dim=2)                                        # [B,H,n,L,N]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]
    return o, S


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """(I - A)^-1 for strictly lower-triangular A [..., L, L]: (I + A)(I + A^2)(I + A^4)... (A^L = 0).

    log2(L) small batched matmuls; much faster on CPU than a batched triangular solve.
    """
    L = A.shape[-1]
    inv = torch.eye(L, dtype=A.dtype, device=A.device) + A
    power, span = A, 2
    while span < L:
        power = power @ power
        inv = inv + inv @ power
        span *= 2
    return inv


def _requested_backend(backend: Optional[str]) -> str:
    choice = (backend or os.environ.get(KERNEL_ENV) or "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a WKV backend; expected one of {_BACKENDS}")
    return choice


def select_backend(device: torch.device, backend: Optional[str] = None) -> Tuple[str, str]:
    """Which path ``wkv7`` takes on ``device`` and why: ``(name, reason)``."""
    choice = _requested_backend(backend)
    if choice == "torch":
        return "torch", f"forced by {KERNEL_ENV}=torch" if backend is None else "forced by backend='torch'"
    if device.type != "cuda":
        if choice in ("cuda", "fla"):
            raise RuntimeError(f"{KERNEL_ENV}={choice} was requested but the tensors are on {device}")
        return "torch", f"tensors on {device.type}"
    reason = "our CUDA kernel not tried (forced fla)"
    if choice != "fla":
        try:
            from . import wkv7_cuda
            ok, reason = wkv7_cuda.is_available()
        except ImportError as e:  # the CUDA path has not been installed with this package
            ok, reason = False, f"CUDA kernel module missing ({e})"
        if ok:
            return "cuda", reason
        if choice == "cuda":
            raise RuntimeError(f"{KERNEL_ENV}=cuda was requested but the kernel cannot be used: {reason}")
    return fla_or_torch(choice, reason)


def fla_or_torch(choice: str, reason: str, version: str = "rwkv7") -> Tuple[str, str]:
    """fla's kernel when it imports (on a GPU), else the PyTorch form; ``reason``: why our kernel is not used."""
    from . import fla
    ok, why = fla.available(version)
    if ok:
        return "fla", f"{why} ({reason})"
    if choice == "fla":
        raise RuntimeError(f"{KERNEL_ENV}=fla was requested but {why}")
    return "torch", f"{reason}; {why}"


def takes_cu_seqlens(device: torch.device) -> bool:
    """Whether ``wkv7`` on ``device`` runs packed samples itself (``cu_seqlens``: the fla path)."""
    try:
        return select_backend(device)[0] == "fla"
    except RuntimeError:
        return False


def wkv7(r, w, k, v, a, b, initial_state: Optional[Tensor] = None,
         backend: Optional[str] = None, chunk_size: int = 16,
         cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The WKV-7 recurrence on the fastest path available (see the module docstring). ``cu_seqlens`` (batch 1,
    one initial state per sample): packed samples, on the path that takes them (``takes_cu_seqlens``)."""
    name, _ = select_backend(r.device, backend)
    if cu_seqlens is not None:
        if name != "fla":
            raise ValueError(f"cu_seqlens runs on the fla path only (this call takes the {name} path); the models "
                             f"run packed samples on the others by gathering them (models/rows.py)")
        from .fla import wkv7_fla
        return wkv7_fla(r, w, k, v, a, b, initial_state, cu_seqlens=cu_seqlens)
    if name == "cuda":
        from . import wkv7_cuda
        return wkv7_cuda.wkv7_cuda(r, w, k, v, a, b, initial_state)
    if name == "fla":
        from .fla import wkv7_fla
        return wkv7_fla(r, w, k, v, a, b, initial_state)
    if r.shape[1] == 1:  # one token (generation): one step of the recurrence, nothing else
        return _wkv7_step(r, w, k, v, a, b, initial_state)
    return wkv7_chunked(r, w, k, v, a, b, initial_state, chunk_size=chunk_size)
