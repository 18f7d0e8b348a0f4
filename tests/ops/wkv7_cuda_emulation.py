"""A PyTorch emulation of the exact algorithm of the CUDA WKV-7 kernels in ``kernels/wkv7/wkv7.cu``.

It mirrors the kernels' loop structure -- which thread owns which numbers, what the forward saves, the order
of the sweeps, the checkpoint and sub-checkpoint schedule, the partial sums each thread makes and how they are
combined -- vectorised over what runs in parallel on the GPU (batch, heads, rows or columns). Run in float64 it
checks the *algorithm* of the kernels against autograd of the reference on a machine without a GPU; it cannot
catch indexing or synchronisation bugs of the CUDA code itself (the GPU tests do that).

Notation (per head, state ``S[i, j]``: ``i`` = value row, ``j`` = key column; ``d = exp(w)``):

    sa_t  = S_{t-1} a_t                                   (saved by the forward, fp32)
    S_t   = S_{t-1} * d_t + sa_t b_t^T + v_t k_t^T
    y_t   = S_t r_t

Kernels:
1. ``fwd``        one thread per row ``i`` (rows are independent). Saves ``sa`` and, at the start of every chunk
                  of ``CK`` steps, a checkpoint of the state stored transposed (``[j][i]``).
2. ``bwd_state``  one thread per row of the state gradient ``G`` (also row-independent), reverse sweep:
                  ``Ĝ_t = G_t + dy_t r_t^T``, ``dv_t = Ĝ_t k_t``, ``dsa_t = Ĝ_t b_t``,
                  ``G_{t-1} = Ĝ_t * d_t + dsa_t a_t^T``; writes ``dv``, ``dsa`` (fp32) and ``G_{-1}`` = d(initial state).
3. ``bwd_params`` given ``sa`` and ``dsa``, both ``S`` and ``G`` evolve element by element, so a thread owns a
                  column ``j`` and ``RPT`` rows of it (``NG = N / RPT`` threads per column, adjacent lanes) and
                  carries its piece of ``G`` backwards over the whole sequence. Per chunk (last first) it reloads
                  the checkpoint, recomputes sub-checkpoints every ``SK`` steps, then per sub-chunk (last first)
                  recomputes the ``SK`` states before each step and walks them backwards, making the column sums

                      dr_t = S_t^T dy_t  (as d_t * (S_{t-1}^T dy_t) + b_t (sa_t.dy_t) + k_t (v_t.dy_t))
                      dd_t = sum_i Ĝ_t * S_{t-1},  dw_t = dd_t * d_t
                      db_t = Ĝ_t^T sa_t,  dk_t = Ĝ_t^T v_t,  da_t = S_{t-1}^T dsa_t

                  as per-thread partials over its rows, then summed over the ``NG`` threads of the column.
"""
from __future__ import annotations

import math

import torch

CK = 16   # checkpoint interval of the forward (steps)
SK = 4    # sub-chunk length of bwd_params
RPT = 16  # rows per thread in bwd_params


def rows_of_thread(q: int, N: int) -> torch.Tensor:
    """Rows owned by the thread with column-lane ``q``: float4 groups ``q, q+NG, q+2NG, ...`` (bank-conflict free)."""
    NG = N // RPT
    return torch.tensor([4 * (q + NG * g) + e for g in range(RPT // 4) for e in range(4)])


def _prep(r, w, k, v, a, b):
    x = [t.double() for t in (r, w, k, v, a, b)]
    x[1] = torch.exp(x[1])   # the kernels stage d = exp(w)
    return x


def fwd(r, w, k, v, a, b, s0=None):
    """Kernel 1. Returns y, final state [B,H,N,N] ([i][j]), sa [B,T,H,N], ckpt [B,H,nC,N(j),N(i)]."""
    B, T, H, N = r.shape
    r, d, k, v, a, b = _prep(r, w, k, v, a, b)
    S = torch.zeros(B, H, N, N, dtype=torch.float64)
    if s0 is not None:
        S = S + s0.double()                        # [H,N,N] broadcasts over the batch
    nC = math.ceil(T / CK)
    ckpt = torch.empty(B, H, nC, N, N, dtype=torch.float64)
    sa_all = torch.empty(B, T, H, N, dtype=torch.float64)
    y = torch.empty(B, T, H, N, dtype=torch.float64)
    for c in range(nC):
        ckpt[:, :, c] = S.transpose(-1, -2)        # stored [j][i]
        for t in range(c * CK, min(T, (c + 1) * CK)):
            sa = (S * a[:, t, :, None, :]).sum(-1)                                # thread i: sum_j S[i,j] a[j]
            S = S * d[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
            y[:, t] = (S * r[:, t, :, None, :]).sum(-1)
            sa_all[:, t] = sa
    return y, S, sa_all, ckpt


def bwd_state(r, w, k, v, a, b, dy, dsT=None):
    """Kernel 2. Returns dv, dsa, ds0 (per batch element)."""
    B, T, H, N = r.shape
    r, d, k, v, a, b = _prep(r, w, k, v, a, b)
    dy = dy.double()
    G = torch.zeros(B, H, N, N, dtype=torch.float64) if dsT is None else dsT.double().clone()
    dv = torch.empty(B, T, H, N, dtype=torch.float64)
    dsa = torch.empty(B, T, H, N, dtype=torch.float64)
    nC = math.ceil(T / CK)
    for c in reversed(range(nC)):
        for t in reversed(range(c * CK, min(T, (c + 1) * CK))):
            G = G + dy[:, t, :, :, None] * r[:, t, :, None, :]
            dv[:, t] = (G * k[:, t, :, None, :]).sum(-1)
            dsa[:, t] = (G * b[:, t, :, None, :]).sum(-1)
            G = G * d[:, t, :, None, :] + dsa[:, t][..., None] * a[:, t, :, None, :]
    return dv, dsa, G


def bwd_params(r, w, k, v, a, b, dy, sa, dsa, ckpt, dsT=None):
    """Kernel 3. Returns dr, dw, dk, da, db."""
    B, T, H, N = r.shape
    assert N % RPT == 0, "the emulation follows the kernel: N must be a multiple of RPT"
    NG = N // RPT
    r, d, k, v, a, b = _prep(r, w, k, v, a, b)
    dy, sa, dsa = dy.double(), sa.double(), dsa.double()
    rows = [rows_of_thread(q, N) for q in range(NG)]
    # G in [i][j] layout; thread (j, q) owns G[rows[q], j]
    G = torch.zeros(B, H, N, N, dtype=torch.float64) if dsT is None else dsT.double().clone()
    grads = {n: torch.zeros(B, T, H, N, dtype=torch.float64) for n in ("dr", "dw", "dk", "da", "db")}
    nC = math.ceil(T / CK)

    def step(S, t):  # S_{t-1} -> S_t, element-wise given the saved sa (what passes 1 and 2 do)
        return S * d[:, t, :, None, :] + sa[:, t, :, :, None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]

    for c in reversed(range(nC)):
        t0 = c * CK
        L = min(CK, T - t0)
        Q = (dy * sa).sum(-1)                      # Q_t = sa_t . dy_t   (computed per chunk in shared memory)
        R = (dy * v).sum(-1)                       # R_t = v_t . dy_t
        S = ckpt[:, :, c].transpose(-1, -2).clone()   # back to [i][j]
        nsub = math.ceil(L / SK)
        sub = [S]                                  # pass 1: sub-checkpoints (states before steps t0 + u*SK)
        for u in range(1, nsub):
            for m in range(SK):
                S = step(S, t0 + (u - 1) * SK + m)
            sub.append(S)
        for u in reversed(range(nsub)):            # pass 2, last sub-chunk first
            mlen = min(SK, L - u * SK)
            hist = [sub[u]]
            S = sub[u]
            for m in range(1, mlen):
                S = step(S, t0 + u * SK + m - 1)
                hist.append(S)
            for m in reversed(range(mlen)):
                t = t0 + u * SK + m
                Sp = hist[m]                       # S_{t-1}
                dj, rj, kj, aj, bj = (x[:, t, :, None, :] for x in (d, r, k, a, b))   # column scalars [B,H,1,N]
                part = {n: [] for n in ("P", "DD", "DB", "DK", "DA")}
                for q in range(NG):                # each of the NG threads of a column: its rows only
                    i = rows[q]
                    dyi, sai, vi, dsai = (x[:, t, :, i, None] for x in (dy, sa, v, dsa))   # [B,H,RPT,1]
                    sp = Sp[:, :, i, :]
                    g = G[:, :, i, :] + dyi * rj
                    part["P"].append((dyi * sp).sum(2))
                    part["DD"].append((g * sp).sum(2))
                    part["DB"].append((g * sai).sum(2))
                    part["DK"].append((g * vi).sum(2))
                    part["DA"].append((dsai * sp).sum(2))
                    G[:, :, i, :] = g * dj + dsai * aj
                tot = {n: sum(p) for n, p in part.items()}   # the shuffle reduction over the NG lanes
                dj, bj, kj = dj[:, :, 0], bj[:, :, 0], kj[:, :, 0]
                grads["dr"][:, t] = dj * tot["P"] + bj * Q[:, t, :, None] + kj * R[:, t, :, None]
                grads["dw"][:, t] = tot["DD"] * dj
                grads["db"][:, t] = tot["DB"]
                grads["dk"][:, t] = tot["DK"]
                grads["da"][:, t] = tot["DA"]
    return grads["dr"], grads["dw"], grads["dk"], grads["da"], grads["db"]


def forward_backward(r, w, k, v, a, b, s0, dy, dsT):
    """The whole op as the autograd Function runs it: returns y, sT and the gradients r, w, k, v, a, b, s0."""
    y, sT, sa, ckpt = fwd(r, w, k, v, a, b, s0)
    dv, dsa, ds0 = bwd_state(r, w, k, v, a, b, dy, dsT)
    dr, dw, dk, da, db = bwd_params(r, w, k, v, a, b, dy, sa, dsa, ckpt, dsT)
    if s0 is not None and s0.dim() == 3:
        ds0 = ds0.sum(0)                           # a shared state's gradient is summed over the batch
    return y, sT, (dr, dw, dk, dv, da, db, ds0 if s0 is not None else None)
