"""A line-by-line transliteration of ``kernels/wkv7/wkv7.cu`` onto flat arrays, vectorised over the threads of a
block (NumPy, float64).

Where ``wkv7_cuda_emulation`` checks the *algorithm*, this checks the CUDA code's *index arithmetic*: global
offsets (``base``, ``tstride``, the checkpoint layout ``[b][h][c][j][i]``), the staging of 16-byte pieces into
the raw buffers, the raw->fp32 conversion offsets, the double-buffer rotation (which chunk is issued into which
buffer when), the shared-memory history slots of ``bwd_param_kernel``, the row mapping ``4*(q + NG*g) + e``,
the Q/R dot products and which lane writes which gradient. Each kernel is a Python function over a grid loop;
per-thread registers are arrays with a leading thread axis. Keep it in step with the .cu file.

What it cannot see: timing (cp.async completion, barriers -- the emulation is sequential), bank conflicts,
and anything the compiler does. The GPU tests and compute-sanitizer cover those.
"""
from __future__ import annotations

import numpy as np

CK, SK, RPT, RB = 16, 4, 16, 32


def _stage_rows(sdst: np.ndarray, soff: int, sstride: int, gsrc: np.ndarray, goff: int, gstride: int,
                rows: int, row_elems: int, epp: int) -> None:
    """stage_rows: every 16-byte piece p -> (rr, cc); emulated as element copies of each piece."""
    ppr = row_elems // epp
    for p in range(rows * ppr):            # the CUDA loop spreads p over threads; all p are copied
        rr = p // ppr
        cc = (p - rr * ppr) * epp
        d = soff + rr * sstride + cc
        s = goff + rr * gstride + cc
        sdst[d:d + epp] = gsrc[s:s + epp]


def fwd_kernel(Tlen, H, B, N, r, w, k, v, a, b, s0, s0_bstride, epp, save=True):
    """Returns flat y, sT, sa_out, ckpt (None when not saving)."""
    NRG = N // RB
    RAW = 5 * CK * N + CK * RB
    nC = (Tlen + CK - 1) // CK
    y = np.full(B * Tlen * H * N, np.nan)
    sT = np.full(B * H * N * N, np.nan)
    sa_out = np.full(B * Tlen * H * N, np.nan) if save else None
    ckpt = np.full(B * H * nC * N * N, np.nan) if save else None
    for block in range(B * H * NRG):
        raw = [np.full(RAW, np.nan), np.full(RAW, np.nan)]   # raw0, raw1
        F = np.full(RAW, np.nan)
        tid = np.arange(RB)
        bh, i0 = block // NRG, (block % NRG) * RB
        bb, hh = bh // H, bh % H
        i = i0 + tid
        tstride = H * N
        base = (bb * Tlen * H + hh) * N

        def issue(c, dst):
            t0 = c * CK
            L = min(CK, Tlen - t0)
            off = base + t0 * tstride
            for arr, src in enumerate((r, w, k, a, b)):
                _stage_rows(dst, arr * CK * N, N, src, off, tstride, L, N, epp)
            _stage_rows(dst, 5 * CK * N, RB, v, off + i0, tstride, L, RB, epp)

        if s0 is not None:
            S = np.stack([s0[bb * s0_bstride + (hh * N + ii) * N + np.arange(N)] for ii in i])
        else:
            S = np.zeros((RB, N))
        issue(0, raw[0])
        if nC > 1:
            issue(1, raw[1])
        for c in range(nC):
            buf = raw[c & 1]
            t0 = c * CK
            L = min(CK, Tlen - t0)
            e = np.arange(5 * CK * N)
            m = (e // N) % CK < L
            x = buf[e[m]]
            F[e[m]] = np.where(e[m] // (CK * N) == 1, np.exp(x), x)
            e = np.arange(CK * RB)
            m = e // RB < L
            F[5 * CK * N + e[m]] = buf[5 * CK * N + e[m]]
            if c + 2 < nC:
                issue(c + 2, buf)
            if save:
                for j in range(N):
                    ckpt[(bh * nC + c) * N * N + i + j * N] = S[:, j]
            Fr, Fd, Fk, Fa, Fb, Fv = (F[n * CK * N:] for n in range(6))
            for tt in range(L):
                sa = S @ Fa[tt * N:tt * N + N]
                vi = Fv[tt * RB + tid]
                S = S * Fd[tt * N:tt * N + N] + sa[:, None] * Fb[tt * N:tt * N + N] + vi[:, None] * Fk[tt * N:tt * N + N]
                o = base + (t0 + tt) * tstride + i
                y[o] = S @ Fr[tt * N:tt * N + N]
                if save:
                    sa_out[o] = sa
        for row, ii in enumerate(i):
            sT[(bh * N + ii) * N + np.arange(N)] = S[row]
    return y, sT, sa_out, ckpt


def bwd_state_kernel(Tlen, H, B, N, r, w, k, a, b, dy, dsT, epp):
    NRG = N // RB
    RAW = 5 * CK * N + CK * RB
    nC = (Tlen + CK - 1) // CK
    dv = np.full(B * Tlen * H * N, np.nan)
    dsa = np.full(B * Tlen * H * N, np.nan)
    ds0 = np.full(B * H * N * N, np.nan)
    for block in range(B * H * NRG):
        raw = [np.full(RAW, np.nan), np.full(RAW, np.nan)]
        F = np.full(RAW, np.nan)
        tid = np.arange(RB)
        bh, i0 = block // NRG, (block % NRG) * RB
        bb, hh = bh // H, bh % H
        i = i0 + tid
        tstride = H * N
        base = (bb * Tlen * H + hh) * N

        def issue(c, dst):
            t0 = c * CK
            L = min(CK, Tlen - t0)
            off = base + t0 * tstride
            for arr, src in enumerate((r, w, k, a, b)):
                _stage_rows(dst, arr * CK * N, N, src, off, tstride, L, N, epp)
            _stage_rows(dst, 5 * CK * N, RB, dy, off + i0, tstride, L, RB, epp)

        if dsT is not None:
            G = np.stack([dsT[(bh * N + ii) * N + np.arange(N)] for ii in i])
        else:
            G = np.zeros((RB, N))
        issue(nC - 1, raw[0])
        if nC > 1:
            issue(nC - 2, raw[1])
        for kk in range(nC):
            c = nC - 1 - kk
            buf = raw[kk & 1]
            t0 = c * CK
            L = min(CK, Tlen - t0)
            e = np.arange(5 * CK * N)
            m = (e // N) % CK < L
            x = buf[e[m]]
            F[e[m]] = np.where(e[m] // (CK * N) == 1, np.exp(x), x)
            e = np.arange(CK * RB)
            m = e // RB < L
            F[5 * CK * N + e[m]] = buf[5 * CK * N + e[m]]
            if kk + 2 < nC:
                issue(nC - 3 - kk, buf)
            Fr, Fd, Fk, Fa, Fb, Fdy = (F[n * CK * N:] for n in range(6))
            for tt in range(L - 1, -1, -1):
                dyi = Fdy[tt * RB + tid]
                G = G + dyi[:, None] * Fr[tt * N:tt * N + N]
                dvi = G @ Fk[tt * N:tt * N + N]
                dsai = G @ Fb[tt * N:tt * N + N]
                G = G * Fd[tt * N:tt * N + N] + dsai[:, None] * Fa[tt * N:tt * N + N]
                o = base + (t0 + tt) * tstride + i
                dv[o] = dvi
                dsa[o] = dsai
        for row, ii in enumerate(i):
            ds0[(bh * N + ii) * N + np.arange(N)] = G[row]
    return dv, dsa, ds0


def bwd_param_kernel(Tlen, H, B, N, r, w, k, v, a, b, dy, sa, dsa, ckpt, dsT, epp, ncb=1):
    """``ncb``: the blocks a head's columns are split over (NCB; 1, or NCB_SMALL on 99 KiB GPUs)."""
    NC = N // ncb
    NG, G4, NSUB = N // RPT, RPT // 4, CK // SK
    NT = NC * NG
    NSLOT = NSUB + SK - 1
    COL = 5 * CK * NC
    ELEMS = COL + 2 * CK * N
    nC = (Tlen + CK - 1) // CK
    out = {n: np.full(B * Tlen * H * N, np.nan) for n in ("dr", "dw", "dk", "da", "db")}
    for block in range(B * H * ncb):
        bh, j0 = block // ncb, (block % ncb) * NC
        hist = np.full((NSLOT * G4 * NT, 4), np.nan)                 # float4 array
        raw_t = [np.full(ELEMS, np.nan) for _ in range(2)]           # the input-dtype part of each raw buffer
        raw_f = [np.full(2 * CK * N, np.nan) for _ in range(2)]      # the fp32 part (sa, dsa)
        F = np.full(ELEMS, np.nan)
        QR = np.full(2 * CK, np.nan)
        tid = np.arange(NT)
        q, j = tid % NG, tid // NG
        bb, hh = bh // H, bh % H
        tstride = H * N
        base = (bb * Tlen * H + hh) * N

        def row0(g):
            return 4 * (q + NG * g)

        def issue(c, x):
            t0 = c * CK
            L = min(CK, Tlen - t0)
            off = base + t0 * tstride
            for arr, src in enumerate((r, w, k, a, b)):
                _stage_rows(raw_t[x], arr * CK * NC, NC, src, off + j0, tstride, L, NC, epp)
            _stage_rows(raw_t[x], COL, N, v, off, tstride, L, N, epp)
            _stage_rows(raw_t[x], COL + CK * N, N, dy, off, tstride, L, N, epp)
            _stage_rows(raw_f[x], 0, N, sa, off, tstride, L, N, 4)
            _stage_rows(raw_f[x], CK * N, N, dsa, off, tstride, L, N, 4)

        G = np.zeros((NT, RPT))
        if dsT is not None:
            for g in range(G4):
                for e in range(4):
                    G[:, 4 * g + e] = dsT[bh * N * N + j0 + j + (row0(g) + e) * N]
        issue(nC - 1, 0)
        for kk in range(nC):
            c = nC - 1 - kk
            t0 = c * CK
            L = min(CK, Tlen - t0)
            cur = kk & 1
            if kk + 1 < nC:
                issue(nC - 2 - kk, (kk + 1) & 1)
            S = np.zeros((NT, RPT))
            src = ((bh * nC + c) * N + j0 + j) * N
            for g in range(G4):
                for e in range(4):
                    S[:, 4 * g + e] = ckpt[src + row0(g) + e]
            e_ = np.arange(ELEMS)
            step = np.where(e_ < COL, (e_ // NC) % CK, ((e_ - COL) // N) % CK)
            m = step < L
            x = raw_t[cur][e_[m]]
            F[e_[m]] = np.where((e_[m] >= CK * NC) & (e_[m] < 2 * CK * NC), np.exp(x), x)
            Ssa, Sdsa = raw_f[cur][:CK * N], raw_f[cur][CK * N:]
            Fr, Fd, Fk, Fa, Fb = (F[n * CK * NC:] for n in range(5))
            Fv, Fdy = F[COL:], F[COL + CK * N:]
            covered = sorted({g8 + m * (NT // 8) for g8 in range(NT // 8) for m in range(2 * CK)
                              if g8 + m * (NT // 8) < 2 * CK})   # dI = (tid >> 3) + m * NT/8
            for dI in covered:
                tl = dI % CK
                x2 = Ssa if dI < CK else Fv
                if tl < L:
                    lanes = np.arange(8)
                    parts = [sum(Fdy[tl * N + ii] * x2[tl * N + ii] for ii in range(ln, N, 8)) for ln in lanes]
                    QR[dI] = sum(parts)
                else:
                    QR[dI] = 0.0

            def advance(tl):
                nonlocal S
                dj, bj, kj = Fd[tl * NC + j], Fb[tl * NC + j], Fk[tl * NC + j]
                for g in range(G4):
                    for e in range(4):
                        s4 = Ssa[tl * N + row0(g) + e]
                        v4 = Fv[tl * N + row0(g) + e]
                        S[:, 4 * g + e] = S[:, 4 * g + e] * dj + (s4 * bj + v4 * kj)

            def store(slot):
                for g in range(G4):
                    hist[(slot * G4 + g) * NT + tid] = S[:, 4 * g:4 * g + 4]

            nsub = (L + SK - 1) // SK
            store(0)
            for u in range(1, nsub):
                for mm in range(SK):
                    advance((u - 1) * SK + mm)
                store(u)
            for u in range(nsub - 1, -1, -1):
                mlen = min(SK, L - u * SK)
                for g in range(G4):
                    S[:, 4 * g:4 * g + 4] = hist[(u * G4 + g) * NT + tid]
                for mm in range(1, mlen):
                    advance(u * SK + mm - 1)
                    store(NSUB + mm - 1)
                for mm in range(mlen - 1, -1, -1):
                    tl = u * SK + mm
                    slot = u if mm == 0 else NSUB + mm - 1
                    rj, dj, kj = Fr[tl * NC + j], Fd[tl * NC + j], Fk[tl * NC + j]
                    aj, bj = Fa[tl * NC + j], Fb[tl * NC + j]
                    P, DD, DB, DK, DA = (np.zeros(NT) for _ in range(5))
                    for g in range(G4):
                        sp4 = hist[(slot * G4 + g) * NT + tid]
                        for e in range(4):
                            i4 = tl * N + row0(g) + e
                            dyi, sai, vi, dsai = Fdy[i4], Ssa[i4], Fv[i4], Sdsa[i4]
                            sp = sp4[:, e]
                            gg = dyi * rj + G[:, 4 * g + e]
                            P = P + dyi * sp
                            DD = DD + gg * sp
                            DB = DB + gg * sai
                            DK = DK + gg * vi
                            DA = DA + dsai * sp
                            G[:, 4 * g + e] = gg * dj + dsai * aj
                    # __shfl_xor_sync over the NG lanes of a column: lanes tid ^ off
                    off = 1
                    while off < NG:
                        P, DD, DB, DK, DA = (x + x[tid ^ off] for x in (P, DD, DB, DK, DA))
                        off <<= 1
                    o = base + (t0 + tl) * tstride + j0 + j
                    drj = dj * P + (bj * QR[tl] + kj * QR[CK + tl])
                    for idx, (name, val) in enumerate((("dr", drj), ("dw", DD * dj), ("dk", DK), ("da", DA),
                                                       ("db", DB))):
                        sel = (idx % NG) == q
                        out[name][o[sel]] = val[sel]
    return out["dr"], out["dw"], out["dk"], out["da"], out["db"]


def forward_backward(r, w, k, v, a, b, s0, dy, dsT, epp=8, ncb=1):
    """Run the three emulated kernels as the .cpp/.py glue does. Tensors in, float64 tensors out.
    ``epp`` = elements per 16-byte piece (8 for bf16 inputs, 4 for fp32); ``ncb`` as in bwd_param_kernel."""
    import torch
    B, T, H, N = r.shape
    flat = [x.double().contiguous().reshape(-1).numpy() for x in (r, w, k, v, a, b)]
    s0f = None if s0 is None else s0.double().contiguous().reshape(-1).numpy()
    s0_bstride = 0 if s0 is None or s0.dim() == 3 else H * N * N
    y, sT, sa, ckpt = fwd_kernel(T, H, B, N, *flat, s0f, s0_bstride, epp)
    dyf = dy.double().contiguous().reshape(-1).numpy()
    dsTf = None if dsT is None else dsT.double().contiguous().reshape(-1).numpy()
    rf, wf, kf, vf, af, bf = flat
    dv, dsa, ds0 = bwd_state_kernel(T, H, B, N, rf, wf, kf, af, bf, dyf, dsTf, epp)
    dr, dw, dk, da, db = bwd_param_kernel(T, H, B, N, rf, wf, kf, vf, af, bf, dyf, sa, dsa, ckpt, dsTf, epp, ncb)
    shp = (B, T, H, N)
    t = lambda x, s=shp: torch.from_numpy(x).reshape(s)
    ds0_t = t(ds0, (B, H, N, N))
    if s0 is not None and s0.dim() == 3:
        ds0_t = ds0_t.sum(0)
    grads = (t(dr), t(dw), t(dk), t(dv), t(da), t(db), ds0_t if s0 is not None else None)
    return t(y), t(sT, (B, H, N, N)), grads
