// RWKV-7 WKV recurrence: forward and backward CUDA kernels (rwkv_peft).
//
// Per head, state S[i][j] (i = value row, j = key column), d = exp(w) (w <= 0 is the log decay):
//
//     sa_t = S_{t-1} a_t
//     S_t  = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t
//
// Three kernels (see docs/kernels.md; tests/ops/wkv7_cuda_emulation.py emulates exactly this algorithm):
//
//   fwd_kernel        one thread per state row i (rows never interact). Inputs are staged into shared memory
//                     CK steps at a time with cp.async (double-buffered), so the step loop has no barrier.
//                     Saves sa_t (fp32) and, at the start of each chunk of CK steps, the state transposed
//                     (ckpt[b][h][c][j][i]) for the backward.
//   bwd_state_kernel  one thread per row i of the state gradient G, reverse sweep (G's rows are independent too):
//                     Ĝ = G + dy_t r_t^T ; dv_t = Ĝ k_t ; dsa_t = Ĝ b_t ; G = Ĝ diag(d_t) + dsa_t a_t^T.
//                     Writes dv, dsa (fp32) and the initial-state gradient.
//   bwd_param_kernel  with sa and dsa known, S and G evolve element by element; a block owns N/NCB columns of one
//                     head (NCB = 1 where shared memory allows, 4 on GPUs with 99 KiB per block), a thread
//                     owns RPT rows of one column j (NG = N/RPT threads per column, adjacent lanes) and carries
//                     its piece of G backwards through the sequence. Per chunk (last first): reload the
//                     checkpoint, recompute sub-checkpoints every SK steps (shared memory), then per sub-chunk
//                     (last first) recompute the states before each step and walk them backwards, summing
//                     dr, dw, dk, da, db over the thread's rows and then over the NG lanes with shuffles.
//
// Nothing divides by a decay, so any w <= 0 (decays near 0 included) is fine. State and accumulation are fp32.
// The .cpp side checks shapes, dtypes, contiguity and 16-byte alignment before calling the launchers below.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace rwkv_peft_wkv7 {

constexpr int CK = 16;   // forward checkpoint interval (steps); also the staging chunk of every kernel
constexpr int SK = 4;    // sub-chunk length in bwd_param_kernel
constexpr int RPT = 16;  // rows per thread in bwd_param_kernel
constexpr int RB = 32;   // rows per block in fwd_kernel / bwd_state_kernel (one warp)

// ------------------------------------------------------------------------------------------------ helpers

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most one committed group is still in flight (i.e. every group but the newest has landed).
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Copy `rows` rows of `row_elems` elements (global row stride `gstride` elements) into shared memory rows of
// stride `sstride` elements, in 16-byte pieces spread over `nthreads` threads. Needs 16-byte aligned rows.
template <typename E>
__device__ __forceinline__ void stage_rows(E* sdst, int sstride, const E* gsrc, int64_t gstride,
                                           int rows, int row_elems, int tid, int nthreads) {
    constexpr int EPP = 16 / sizeof(E);  // elements per 16-byte piece
    const int ppr = row_elems / EPP;
    const int total = rows * ppr;
    for (int p = tid; p < total; p += nthreads) {
        const int rr = p / ppr;
        const int cc = (p - rr * ppr) * EPP;
        cp_async_16(sdst + rr * sstride + cc, gsrc + rr * gstride + cc);
    }
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float get(const float4& v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

// ------------------------------------------------------------------------------------------------ forward

// Shared memory: two raw staging buffers (input dtype) + one fp32 buffer.
// raw buffer: r, w, k, a, b as [CK][N] each, then v as [CK][RB] (only this block's rows).
// fp32 buffer: r, d = exp(w), k, a, b as [CK][N] each, then v as [CK][RB].
template <typename T, int N>
struct FwdLayout {
    static constexpr int raw_elems = 5 * CK * N + CK * RB;  // per raw buffer (and in the fp32 buffer)
    static constexpr size_t total = 2 * static_cast<size_t>(raw_elems) * sizeof(T) + static_cast<size_t>(raw_elems) * sizeof(float);
};

template <typename T, int N>
__global__ void __launch_bounds__(RB)
fwd_kernel(const int Tlen, const int H,
           const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k,
           const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
           const float* __restrict__ s0, const int64_t s0_bstride,
           T* __restrict__ y, float* __restrict__ sT,
           float* __restrict__ sa_out, float* __restrict__ ckpt) {
    static_assert(N % RB == 0 && N % 4 == 0, "N must be a multiple of RB");
    constexpr int NRG = N / RB;
    constexpr int RAW = FwdLayout<T, N>::raw_elems;
    extern __shared__ __align__(16) unsigned char smem[];
    T* raw0 = reinterpret_cast<T*>(smem);
    T* raw1 = raw0 + RAW;
    float* F = reinterpret_cast<float*>(raw1 + RAW);
    const float* Fr = F;
    const float* Fd = F + 1 * CK * N;
    const float* Fk = F + 2 * CK * N;
    const float* Fa = F + 3 * CK * N;
    const float* Fb = F + 4 * CK * N;
    const float* Fv = F + 5 * CK * N;

    const int tid = threadIdx.x;
    const int bh = blockIdx.x / NRG;
    const int i0 = (blockIdx.x % NRG) * RB;
    const int bb = bh / H, hh = bh % H;
    const int i = i0 + tid;
    const int nC = (Tlen + CK - 1) / CK;
    const int64_t tstride = static_cast<int64_t>(H) * N;
    const int64_t base = (static_cast<int64_t>(bb) * Tlen * H + hh) * N;  // element [bb, 0, hh, 0]

    auto issue = [&](int c, T* dst) {
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        const int64_t off = base + t0 * tstride;
        stage_rows(dst + 0 * CK * N, N, r + off, tstride, L, N, tid, RB);
        stage_rows(dst + 1 * CK * N, N, w + off, tstride, L, N, tid, RB);
        stage_rows(dst + 2 * CK * N, N, k + off, tstride, L, N, tid, RB);
        stage_rows(dst + 3 * CK * N, N, a + off, tstride, L, N, tid, RB);
        stage_rows(dst + 4 * CK * N, N, b + off, tstride, L, N, tid, RB);
        stage_rows(dst + 5 * CK * N, RB, v + off + i0, tstride, L, RB, tid, RB);
    };

    float S[N];
    if (s0 != nullptr) {
        const float* src = s0 + bb * s0_bstride + (static_cast<int64_t>(hh) * N + i) * N;
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 q = ld4(src + j);
            S[j] = q.x; S[j + 1] = q.y; S[j + 2] = q.z; S[j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) S[j] = 0.f;
    }

    issue(0, raw0);
    cp_async_commit();
    if (nC > 1) issue(1, raw1);
    cp_async_commit();

    for (int c = 0; c < nC; ++c) {
        T* buf = (c & 1) ? raw1 : raw0;
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        cp_async_wait_one();  // chunk c has landed (only chunk c+1 may still be in flight)
        __syncthreads();
        for (int e = tid; e < 5 * CK * N; e += RB) {
            if ((e / N) % CK < L) {
                const float x = to_float(buf[e]);
                F[e] = (e / (CK * N) == 1) ? expf(x) : x;  // the w rows become decays d = exp(w)
            }
        }
        for (int e = tid; e < CK * RB; e += RB)
            if (e / RB < L) F[5 * CK * N + e] = to_float(buf[5 * CK * N + e]);
        __syncthreads();
        if (c + 2 < nC) issue(c + 2, buf);  // buf is free again
        cp_async_commit();                  // (an empty group keeps the wait count uniform)

        if (ckpt != nullptr) {  // state before step t0, stored [j][i]: coalesced over the rows of the warp
            float* dst = ckpt + (static_cast<int64_t>(bh) * nC + c) * N * N + i;
#pragma unroll
            for (int j = 0; j < N; ++j) dst[static_cast<int64_t>(j) * N] = S[j];
        }

        for (int tt = 0; tt < L; ++tt) {
            const float* ar = Fa + tt * N;
            float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
#pragma unroll
            for (int j = 0; j < N; j += 4) {
                const float4 a4 = ld4(ar + j);
                p0 = fmaf(S[j], a4.x, p0);
                p1 = fmaf(S[j + 1], a4.y, p1);
                p2 = fmaf(S[j + 2], a4.z, p2);
                p3 = fmaf(S[j + 3], a4.w, p3);
            }
            const float sa = (p0 + p1) + (p2 + p3);
            const float vi = Fv[tt * RB + tid];
            float y0 = 0.f, y1 = 0.f, y2 = 0.f, y3 = 0.f;
#pragma unroll
            for (int j = 0; j < N; j += 4) {
                const float4 d4 = ld4(Fd + tt * N + j), b4 = ld4(Fb + tt * N + j);
                const float4 k4 = ld4(Fk + tt * N + j), r4 = ld4(Fr + tt * N + j);
                S[j]     = fmaf(S[j],     d4.x, fmaf(sa, b4.x, vi * k4.x));
                S[j + 1] = fmaf(S[j + 1], d4.y, fmaf(sa, b4.y, vi * k4.y));
                S[j + 2] = fmaf(S[j + 2], d4.z, fmaf(sa, b4.z, vi * k4.z));
                S[j + 3] = fmaf(S[j + 3], d4.w, fmaf(sa, b4.w, vi * k4.w));
                y0 = fmaf(S[j], r4.x, y0);
                y1 = fmaf(S[j + 1], r4.y, y1);
                y2 = fmaf(S[j + 2], r4.z, y2);
                y3 = fmaf(S[j + 3], r4.w, y3);
            }
            const int64_t o = base + (t0 + tt) * tstride + i;
            y[o] = from_float<T>((y0 + y1) + (y2 + y3));
            if (sa_out != nullptr) sa_out[o] = sa;
        }
    }

    float* dst = sT + (static_cast<int64_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
}

// ------------------------------------------------------------------------------------------------ backward 1: G

// Same staging as the forward, with dy in place of v.
template <typename T, int N>
__global__ void __launch_bounds__(RB)
bwd_state_kernel(const int Tlen, const int H,
                 const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k,
                 const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
                 const float* __restrict__ dsT,
                 T* __restrict__ dv, float* __restrict__ dsa, float* __restrict__ ds0) {
    static_assert(N % RB == 0 && N % 4 == 0, "N must be a multiple of RB");
    constexpr int NRG = N / RB;
    constexpr int RAW = FwdLayout<T, N>::raw_elems;
    extern __shared__ __align__(16) unsigned char smem[];
    T* raw0 = reinterpret_cast<T*>(smem);
    T* raw1 = raw0 + RAW;
    float* F = reinterpret_cast<float*>(raw1 + RAW);
    const float* Fr = F;
    const float* Fd = F + 1 * CK * N;
    const float* Fk = F + 2 * CK * N;
    const float* Fa = F + 3 * CK * N;
    const float* Fb = F + 4 * CK * N;
    const float* Fdy = F + 5 * CK * N;

    const int tid = threadIdx.x;
    const int bh = blockIdx.x / NRG;
    const int i0 = (blockIdx.x % NRG) * RB;
    const int bb = bh / H, hh = bh % H;
    const int i = i0 + tid;
    const int nC = (Tlen + CK - 1) / CK;
    const int64_t tstride = static_cast<int64_t>(H) * N;
    const int64_t base = (static_cast<int64_t>(bb) * Tlen * H + hh) * N;

    auto issue = [&](int c, T* dst) {
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        const int64_t off = base + t0 * tstride;
        stage_rows(dst + 0 * CK * N, N, r + off, tstride, L, N, tid, RB);
        stage_rows(dst + 1 * CK * N, N, w + off, tstride, L, N, tid, RB);
        stage_rows(dst + 2 * CK * N, N, k + off, tstride, L, N, tid, RB);
        stage_rows(dst + 3 * CK * N, N, a + off, tstride, L, N, tid, RB);
        stage_rows(dst + 4 * CK * N, N, b + off, tstride, L, N, tid, RB);
        stage_rows(dst + 5 * CK * N, RB, dy + off + i0, tstride, L, RB, tid, RB);
    };

    float G[N];
    if (dsT != nullptr) {
        const float* src = dsT + (static_cast<int64_t>(bh) * N + i) * N;
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 q = ld4(src + j);
            G[j] = q.x; G[j + 1] = q.y; G[j + 2] = q.z; G[j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) G[j] = 0.f;
    }

    // chunks are processed last first: the kk-th processed chunk is c = nC - 1 - kk
    issue(nC - 1, raw0);
    cp_async_commit();
    if (nC > 1) issue(nC - 2, raw1);
    cp_async_commit();

    for (int kk = 0; kk < nC; ++kk) {
        const int c = nC - 1 - kk;
        T* buf = (kk & 1) ? raw1 : raw0;
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        cp_async_wait_one();
        __syncthreads();
        for (int e = tid; e < 5 * CK * N; e += RB) {
            if ((e / N) % CK < L) {
                const float x = to_float(buf[e]);
                F[e] = (e / (CK * N) == 1) ? expf(x) : x;
            }
        }
        for (int e = tid; e < CK * RB; e += RB)
            if (e / RB < L) F[5 * CK * N + e] = to_float(buf[5 * CK * N + e]);
        __syncthreads();
        if (kk + 2 < nC) issue(nC - 3 - kk, buf);
        cp_async_commit();

        for (int tt = L - 1; tt >= 0; --tt) {
            const float dyi = Fdy[tt * RB + tid];
            float v0 = 0.f, v1 = 0.f, v2 = 0.f, v3 = 0.f;  // dv partials
            float s0p = 0.f, s1p = 0.f, s2p = 0.f, s3p = 0.f;  // dsa partials
#pragma unroll
            for (int j = 0; j < N; j += 4) {
                const float4 r4 = ld4(Fr + tt * N + j), k4 = ld4(Fk + tt * N + j), b4 = ld4(Fb + tt * N + j);
                G[j]     = fmaf(dyi, r4.x, G[j]);
                G[j + 1] = fmaf(dyi, r4.y, G[j + 1]);
                G[j + 2] = fmaf(dyi, r4.z, G[j + 2]);
                G[j + 3] = fmaf(dyi, r4.w, G[j + 3]);
                v0 = fmaf(G[j], k4.x, v0);
                v1 = fmaf(G[j + 1], k4.y, v1);
                v2 = fmaf(G[j + 2], k4.z, v2);
                v3 = fmaf(G[j + 3], k4.w, v3);
                s0p = fmaf(G[j], b4.x, s0p);
                s1p = fmaf(G[j + 1], b4.y, s1p);
                s2p = fmaf(G[j + 2], b4.z, s2p);
                s3p = fmaf(G[j + 3], b4.w, s3p);
            }
            const float dvi = (v0 + v1) + (v2 + v3);
            const float dsai = (s0p + s1p) + (s2p + s3p);
#pragma unroll
            for (int j = 0; j < N; j += 4) {
                const float4 d4 = ld4(Fd + tt * N + j), a4 = ld4(Fa + tt * N + j);
                G[j]     = fmaf(G[j],     d4.x, dsai * a4.x);
                G[j + 1] = fmaf(G[j + 1], d4.y, dsai * a4.y);
                G[j + 2] = fmaf(G[j + 2], d4.z, dsai * a4.z);
                G[j + 3] = fmaf(G[j + 3], d4.w, dsai * a4.w);
            }
            const int64_t o = base + (t0 + tt) * tstride + i;
            dv[o] = from_float<T>(dvi);
            dsa[o] = dsai;
        }
    }

    float* dst = ds0 + (static_cast<int64_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(G[j], G[j + 1], G[j + 2], G[j + 3]);
}

// ------------------------------------------------------------------------------------------------ backward 2

// Shared memory layout of bwd_param_kernel (a block owns NC = N / NCB columns j0 .. j0 + NC - 1 of one head; with
// sa and dsa given, the elements of different columns never meet, so the NCB blocks of a head are independent):
//   hist  fp32, NSLOT slots of the block's NC columns of the state, thread-private pieces: slot s, float4 group g,
//         thread tid at float4 index (s * G4 + g) * NT + tid. Slots 0..NSUB-1: sub-checkpoints;
//         NSUB..NSUB+SK-2: the states before steps 1..SK-1 of the current sub-chunk.
//   raw   two buffers: r, w, k, a, b as [CK][NC] (the block's columns), v, dy as [CK][N] (input dtype), then
//         sa, dsa as [CK][N] (fp32)
//   F     fp32: r, d = exp(w), k, a, b as [CK][NC], v, dy as [CK][N]
//   QR    fp32 [2][CK]: Q_t = sa_t . dy_t, R_t = v_t . dy_t (every block of the head computes them)
template <typename T, int N, int NCB>
struct ParamLayout {
    static constexpr int NC = N / NCB;      // columns per block
    static constexpr int NG = N / RPT;      // threads per column
    static constexpr int NT = NC * NG;      // threads per block
    static constexpr int G4 = RPT / 4;      // float4 groups per thread
    static constexpr int NSUB = CK / SK;
    static constexpr int NSLOT = NSUB + SK - 1;
    static constexpr int COL = 5 * CK * NC;  // elements of the column inputs in raw / F; the row inputs follow
    static constexpr int ELEMS = COL + 2 * CK * N;
    static constexpr size_t hist_bytes = static_cast<size_t>(NSLOT) * NC * N * sizeof(float);
    static constexpr size_t raw_t_bytes = static_cast<size_t>(ELEMS) * sizeof(T);
    static constexpr size_t raw_bytes = raw_t_bytes + static_cast<size_t>(2) * CK * N * sizeof(float);
    static constexpr size_t f_bytes = static_cast<size_t>(ELEMS) * sizeof(float);
    static constexpr size_t qr_bytes = static_cast<size_t>(2) * CK * sizeof(float);
    static constexpr size_t total = hist_bytes + 2 * raw_bytes + f_bytes + qr_bytes;
    static_assert(raw_t_bytes % 16 == 0 && (NC * sizeof(T)) % 16 == 0, "16-byte staging");
};

template <typename T, int N, int NCB>
__global__ void __launch_bounds__(ParamLayout<T, N, NCB>::NT, 1)
bwd_param_kernel(const int Tlen, const int H,
                 const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k,
                 const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
                 const T* __restrict__ dy, const float* __restrict__ sa, const float* __restrict__ dsa,
                 const float* __restrict__ ckpt, const float* __restrict__ dsT,
                 T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk,
                 T* __restrict__ da, T* __restrict__ db) {
    using Lay = ParamLayout<T, N, NCB>;
    constexpr int NC = Lay::NC, NG = Lay::NG, NT = Lay::NT, G4 = Lay::G4, NSUB = Lay::NSUB, COL = Lay::COL;
    static_assert(N % RPT == 0 && RPT % 4 == 0, "N must be a multiple of RPT");
    static_assert(NT % 32 == 0 && 32 % NG == 0, "a column's lanes must sit in one warp");
    static_assert((2 * CK) % (NT / 8) == 0, "every 8-lane group must do the same number of Q/R dot products");

    extern __shared__ __align__(16) unsigned char smem[];
    float4* hist = reinterpret_cast<float4*>(smem);
    unsigned char* raw_base = smem + Lay::hist_bytes;  // raw buffer x at raw_base + x * raw_bytes
    float* F = reinterpret_cast<float*>(raw_base + 2 * Lay::raw_bytes);
    float* QR = F + Lay::ELEMS;
    const float* Fr = F;                      // the column inputs: [CK][NC], local column j
    const float* Fd = F + 1 * CK * NC;
    const float* Fk = F + 2 * CK * NC;
    const float* Fa = F + 3 * CK * NC;
    const float* Fb = F + 4 * CK * NC;
    const float* Fv = F + COL;                // the row inputs: [CK][N]
    const float* Fdy = F + COL + CK * N;

    const int tid = threadIdx.x;
    const int q = tid % NG;   // which of the column's NG threads
    const int j = tid / NG;   // my column within the block; the head's column is j0 + j
    const int bh = blockIdx.x / NCB;
    const int j0 = (blockIdx.x % NCB) * NC;
    const int bb = bh / H, hh = bh % H;
    const int nC = (Tlen + CK - 1) / CK;
    const int64_t tstride = static_cast<int64_t>(H) * N;
    const int64_t base = (static_cast<int64_t>(bb) * Tlen * H + hh) * N;

    // my rows: float4 group g covers rows 4*(q + NG*g) .. +3
    auto row0 = [&](int g) { return 4 * (q + NG * g); };

    auto issue = [&](int c, unsigned char* dst) {
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        const int64_t off = base + t0 * tstride;
        T* dt = reinterpret_cast<T*>(dst);
        float* df = reinterpret_cast<float*>(dst + Lay::raw_t_bytes);
        stage_rows(dt + 0 * CK * NC, NC, r + off + j0, tstride, L, NC, tid, NT);
        stage_rows(dt + 1 * CK * NC, NC, w + off + j0, tstride, L, NC, tid, NT);
        stage_rows(dt + 2 * CK * NC, NC, k + off + j0, tstride, L, NC, tid, NT);
        stage_rows(dt + 3 * CK * NC, NC, a + off + j0, tstride, L, NC, tid, NT);
        stage_rows(dt + 4 * CK * NC, NC, b + off + j0, tstride, L, NC, tid, NT);
        stage_rows(dt + COL, N, v + off, tstride, L, N, tid, NT);
        stage_rows(dt + COL + CK * N, N, dy + off, tstride, L, N, tid, NT);
        stage_rows(df + 0 * CK * N, N, sa + off, tstride, L, N, tid, NT);
        stage_rows(df + 1 * CK * N, N, dsa + off, tstride, L, N, tid, NT);
    };

    float G[RPT];
    if (dsT != nullptr) {
        const float* src = dsT + static_cast<int64_t>(bh) * N * N + j0 + j;
#pragma unroll
        for (int g = 0; g < G4; ++g)
#pragma unroll
            for (int e = 0; e < 4; ++e) G[4 * g + e] = src[static_cast<int64_t>(row0(g) + e) * N];
    } else {
#pragma unroll
        for (int x = 0; x < RPT; ++x) G[x] = 0.f;
    }

    issue(nC - 1, raw_base);
    cp_async_commit();

    for (int kk = 0; kk < nC; ++kk) {
        const int c = nC - 1 - kk;
        const int t0 = c * CK;
        const int L = min(CK, Tlen - t0);
        const unsigned char* cur = raw_base + (kk & 1) * Lay::raw_bytes;
        if (kk + 1 < nC)  // into the other buffer, released by the barrier at the end of iteration kk-1
            issue(nC - 2 - kk, raw_base + ((kk + 1) & 1) * Lay::raw_bytes);
        cp_async_commit();

        // the chunk's checkpoint, my column and rows (ckpt is stored [j][i])
        float S[RPT];
        {
            const float* src = ckpt + ((static_cast<int64_t>(bh) * nC + c) * N + j0 + j) * N;
#pragma unroll
            for (int g = 0; g < G4; ++g) {
                const float4 x = ld4(src + row0(g));
                S[4 * g] = x.x; S[4 * g + 1] = x.y; S[4 * g + 2] = x.z; S[4 * g + 3] = x.w;
            }
        }

        cp_async_wait_one();  // chunk kk has landed
        __syncthreads();
        {
            const T* rt = reinterpret_cast<const T*>(cur);
            for (int e = tid; e < Lay::ELEMS; e += NT) {
                const int step = e < COL ? (e / NC) % CK : ((e - COL) / N) % CK;
                if (step < L) {
                    const float x = to_float(rt[e]);
                    F[e] = (e >= CK * NC && e < 2 * CK * NC) ? expf(x) : x;  // d = exp(w)
                }
            }
        }
        const float* Ssa = reinterpret_cast<const float*>(cur + Lay::raw_t_bytes);
        const float* Sdsa = Ssa + CK * N;
        __syncthreads();
        {   // Q_t and R_t: 2*CK dot products of length N, 8 lanes each
            const int lane8 = tid & 7;
            for (int dI = tid >> 3; dI < 2 * CK; dI += NT / 8) {
                const int tl = dI % CK;
                const float* x2 = (dI < CK) ? Ssa : Fv;
                float acc = 0.f;
                if (tl < L)
                    for (int ii = lane8; ii < N; ii += 8) acc = fmaf(Fdy[tl * N + ii], x2[tl * N + ii], acc);
                acc += __shfl_xor_sync(0xffffffffu, acc, 4);
                acc += __shfl_xor_sync(0xffffffffu, acc, 2);
                acc += __shfl_xor_sync(0xffffffffu, acc, 1);
                if (lane8 == 0) QR[dI] = acc;
            }
        }
        __syncthreads();

        // one step of the state recurrence on my elements, with the saved sa: S_{tl-1} -> S_tl
        auto advance = [&](int tl) {
            const float dj = Fd[tl * NC + j], bj = Fb[tl * NC + j], kj = Fk[tl * NC + j];
#pragma unroll
            for (int g = 0; g < G4; ++g) {
                const float4 s4 = ld4(Ssa + tl * N + row0(g)), v4 = ld4(Fv + tl * N + row0(g));
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    S[4 * g + e] = fmaf(S[4 * g + e], dj, fmaf(get(s4, e), bj, get(v4, e) * kj));
            }
        };
        auto store = [&](int slot) {
#pragma unroll
            for (int g = 0; g < G4; ++g)
                hist[(slot * G4 + g) * NT + tid] = make_float4(S[4 * g], S[4 * g + 1], S[4 * g + 2], S[4 * g + 3]);
        };

        // pass 1: sub-checkpoints (states before steps u*SK), thread-private, so no barrier is needed
        const int nsub = (L + SK - 1) / SK;
        store(0);
        for (int u = 1; u < nsub; ++u) {
            for (int m = 0; m < SK; ++m) advance((u - 1) * SK + m);
            store(u);
        }

        // pass 2: sub-chunks last first
        for (int u = nsub - 1; u >= 0; --u) {
            const int mlen = min(SK, L - u * SK);
#pragma unroll
            for (int g = 0; g < G4; ++g) {
                const float4 x = hist[(u * G4 + g) * NT + tid];
                S[4 * g] = x.x; S[4 * g + 1] = x.y; S[4 * g + 2] = x.z; S[4 * g + 3] = x.w;
            }
            for (int m = 1; m < mlen; ++m) {
                advance(u * SK + m - 1);
                store(NSUB + m - 1);
            }
            for (int m = mlen - 1; m >= 0; --m) {
                const int tl = u * SK + m;
                const int slot = (m == 0) ? u : NSUB + m - 1;   // S_{t-1}
                const float rj = Fr[tl * NC + j], dj = Fd[tl * NC + j], kj = Fk[tl * NC + j];
                const float aj = Fa[tl * NC + j], bj = Fb[tl * NC + j];
                float P = 0.f, DD = 0.f, DB = 0.f, DK = 0.f, DA = 0.f;
#pragma unroll
                for (int g = 0; g < G4; ++g) {
                    const int i4 = tl * N + row0(g);
                    const float4 dy4 = ld4(Fdy + i4), sa4 = ld4(Ssa + i4), v4 = ld4(Fv + i4), ds4 = ld4(Sdsa + i4);
                    const float4 sp4 = hist[(slot * G4 + g) * NT + tid];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float dyi = get(dy4, e), sp = get(sp4, e), dsai = get(ds4, e);
                        const float gg = fmaf(dyi, rj, G[4 * g + e]);      // Ĝ = G + dy r^T
                        P = fmaf(dyi, sp, P);                              // (S_{t-1}^T dy)_j
                        DD = fmaf(gg, sp, DD);                             // sum_i Ĝ S_{t-1}
                        DB = fmaf(gg, get(sa4, e), DB);                    // (Ĝ^T sa)_j
                        DK = fmaf(gg, get(v4, e), DK);                     // (Ĝ^T v)_j
                        DA = fmaf(dsai, sp, DA);                           // (S_{t-1}^T dsa)_j
                        G[4 * g + e] = fmaf(gg, dj, dsai * aj);            // G_{t-1} = Ĝ d + dsa a^T
                    }
                }
#pragma unroll
                for (int off = 1; off < NG; off <<= 1) {
                    P += __shfl_xor_sync(0xffffffffu, P, off);
                    DD += __shfl_xor_sync(0xffffffffu, DD, off);
                    DB += __shfl_xor_sync(0xffffffffu, DB, off);
                    DK += __shfl_xor_sync(0xffffffffu, DK, off);
                    DA += __shfl_xor_sync(0xffffffffu, DA, off);
                }
                const int64_t o = base + (t0 + tl) * tstride + j0 + j;
                // S_t^T dy = d * (S_{t-1}^T dy) + b (sa.dy) + k (v.dy)
                const float drj = fmaf(dj, P, fmaf(bj, QR[tl], kj * QR[CK + tl]));
                if (0 % NG == q) dr[o] = from_float<T>(drj);
                if (1 % NG == q) dw[o] = from_float<T>(DD * dj);
                if (2 % NG == q) dk[o] = from_float<T>(DK);
                if (3 % NG == q) da[o] = from_float<T>(DA);
                if (4 % NG == q) db[o] = from_float<T>(DB);
            }
        }
        __syncthreads();  // every thread is done with this chunk's raw buffer, F and QR
    }
}

// ------------------------------------------------------------------------------------------------ launchers

template <typename Kern>
static cudaError_t set_smem(Kern kern, size_t bytes) {
    return cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int N>
static cudaError_t fwd_t(int B, int Tlen, int H, const void* r, const void* w, const void* k, const void* v,
                         const void* a, const void* b, const float* s0, int64_t s0_bstride, void* y, float* sT,
                         float* sa, float* ckpt, cudaStream_t stream) {
    const size_t smem = FwdLayout<T, N>::total;
    auto kern = fwd_kernel<T, N>;
    cudaError_t err = set_smem(kern, smem);
    if (err != cudaSuccess) return err;
    kern<<<B * H * (N / RB), RB, smem, stream>>>(
        Tlen, H, static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b), s0, s0_bstride,
        static_cast<T*>(y), sT, sa, ckpt);
    return cudaGetLastError();
}

// NCB_SMALL: the column split for GPUs whose blocks cannot hold a whole head's history (N = 64: 99 KiB cards).
// With N = 32 every layout is small enough unsplit (and NT must stay a multiple of 32).
constexpr int NCB_SMALL = 4;

static int smem_optin() {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return optin;
}

static size_t param_bytes(size_t elem, int N, int ncb) {
    if (N == 64 && elem == 2) return ncb == 1 ? ParamLayout<__nv_bfloat16, 64, 1>::total : ParamLayout<__nv_bfloat16, 64, NCB_SMALL>::total;
    if (N == 64) return ncb == 1 ? ParamLayout<float, 64, 1>::total : ParamLayout<float, 64, NCB_SMALL>::total;
    return elem == 2 ? ParamLayout<__nv_bfloat16, 32, 1>::total : ParamLayout<float, 32, 1>::total;
}

// The column split bwd_param_kernel runs with: 1 where a whole head fits in a block's shared memory.
static int param_ncb(size_t elem, int N, int optin) {
    return (N != 64 || param_bytes(elem, N, 1) <= static_cast<size_t>(optin)) ? 1 : NCB_SMALL;
}

template <typename T, int N, int NCB>
static cudaError_t param_t(int B, int Tlen, int H, const T* rt, const T* wt, const T* kt, const T* vt, const T* at,
                           const T* bt, const T* dyt, const float* sa, const float* dsa, const float* ckpt,
                           const float* dsT, void* dr, void* dw, void* dk, void* da, void* db, cudaStream_t stream) {
    using Lay = ParamLayout<T, N, NCB>;
    auto k2 = bwd_param_kernel<T, N, NCB>;
    cudaError_t err = set_smem(k2, Lay::total);
    if (err != cudaSuccess) return err;
    k2<<<B * H * NCB, Lay::NT, Lay::total, stream>>>(Tlen, H, rt, wt, kt, vt, at, bt, dyt, sa, dsa, ckpt, dsT,
                                                     static_cast<T*>(dr), static_cast<T*>(dw), static_cast<T*>(dk),
                                                     static_cast<T*>(da), static_cast<T*>(db));
    return cudaGetLastError();
}

template <typename T, int N>
static cudaError_t bwd_t(int B, int Tlen, int H, const void* r, const void* w, const void* k, const void* v,
                         const void* a, const void* b, const void* dy, const float* dsT, const float* sa,
                         const float* ckpt, float* dsa, void* dr, void* dw, void* dk, void* dv, void* da,
                         void* db, float* ds0, int split_asked, cudaStream_t stream) {
    const T* rt = static_cast<const T*>(r);
    const T* wt = static_cast<const T*>(w);
    const T* kt = static_cast<const T*>(k);
    const T* vt = static_cast<const T*>(v);
    const T* at = static_cast<const T*>(a);
    const T* bt = static_cast<const T*>(b);
    const T* dyt = static_cast<const T*>(dy);

    const size_t smem1 = FwdLayout<T, N>::total;
    auto k1 = bwd_state_kernel<T, N>;
    cudaError_t err = set_smem(k1, smem1);
    if (err != cudaSuccess) return err;
    k1<<<B * H * (N / RB), RB, smem1, stream>>>(Tlen, H, rt, wt, kt, at, bt, dyt, dsT, static_cast<T*>(dv), dsa, ds0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    constexpr int split = N == 64 ? NCB_SMALL : 1;
    const int chosen = split_asked ? split_asked : param_ncb(sizeof(T), N, smem_optin());
    if (split == 1 || chosen == 1)
        return param_t<T, N, 1>(B, Tlen, H, rt, wt, kt, vt, at, bt, dyt, sa, dsa, ckpt, dsT, dr, dw, dk, da, db, stream);
    return param_t<T, N, split>(B, Tlen, H, rt, wt, kt, vt, at, bt, dyt, sa, dsa, ckpt, dsT, dr, dw, dk, da, db, stream);
}

// dtype: 0 = float32, 1 = bfloat16. Returns cudaErrorInvalidValue for an unsupported (dtype, N).
cudaError_t wkv7_forward_launch(int dtype, int B, int Tlen, int H, int N, const void* r, const void* w,
                                const void* k, const void* v, const void* a, const void* b, const float* s0,
                                int64_t s0_bstride, void* y, float* sT, float* sa, float* ckpt,
                                cudaStream_t stream) {
#define RWKV_WKV7_FWD(TYPE, NN) \
    return fwd_t<TYPE, NN>(B, Tlen, H, r, w, k, v, a, b, s0, s0_bstride, y, sT, sa, ckpt, stream)
    if (dtype == 0 && N == 64) RWKV_WKV7_FWD(float, 64);
    if (dtype == 1 && N == 64) RWKV_WKV7_FWD(__nv_bfloat16, 64);
    if (dtype == 0 && N == 32) RWKV_WKV7_FWD(float, 32);
    if (dtype == 1 && N == 32) RWKV_WKV7_FWD(__nv_bfloat16, 32);
#undef RWKV_WKV7_FWD
    return cudaErrorInvalidValue;
}

cudaError_t wkv7_backward_launch(int dtype, int B, int Tlen, int H, int N, const void* r, const void* w,
                                 const void* k, const void* v, const void* a, const void* b, const void* dy,
                                 const float* dsT, const float* sa, const float* ckpt, float* dsa, void* dr,
                                 void* dw, void* dk, void* dv, void* da, void* db, float* ds0, int split,
                                 cudaStream_t stream) {
#define RWKV_WKV7_BWD(TYPE, NN) \
    return bwd_t<TYPE, NN>(B, Tlen, H, r, w, k, v, a, b, dy, dsT, sa, ckpt, dsa, dr, dw, dk, dv, da, db, ds0, split, \
                           stream)
    if (dtype == 0 && N == 64) RWKV_WKV7_BWD(float, 64);
    if (dtype == 1 && N == 64) RWKV_WKV7_BWD(__nv_bfloat16, 64);
    if (dtype == 0 && N == 32) RWKV_WKV7_BWD(float, 32);
    if (dtype == 1 && N == 32) RWKV_WKV7_BWD(__nv_bfloat16, 32);
#undef RWKV_WKV7_BWD
    return cudaErrorInvalidValue;
}

// which: 0 forward / backward-1; 1 backward-2 unsplit; 2 backward-2 as split on small GPUs (the least it needs)
size_t wkv7_smem_bytes(int dtype, int N, int which) {
    const size_t elem = dtype ? 2 : 4;
    if (N != 64 && N != 32) return 0;
    if (which == 0) return N == 64 ? (dtype ? FwdLayout<__nv_bfloat16, 64>::total : FwdLayout<float, 64>::total)
                                   : (dtype ? FwdLayout<__nv_bfloat16, 32>::total : FwdLayout<float, 32>::total);
    return param_bytes(elem, N, which == 1 ? 1 : (N == 64 ? NCB_SMALL : 1));
}

}  // namespace rwkv_peft_wkv7
