#!/usr/bin/env python
"""Benchmark the WKV-7 recurrence: this project's CUDA kernel, its chunked PyTorch path, and (if installed)
flash-linear-attention's ``chunk_rwkv7``, forward and forward+backward, with the initial state in and the final
state out, side by side in one run.

Prints a table (median of CUDA-event timings after warm-up) with the memory-traffic and arithmetic floors for
the size, and writes JSON with ``--json PATH``. Needs a CUDA GPU.

    python scripts/bench_wkv.py                       # B=8 T=4096 H=32 N=64 bf16
    python scripts/bench_wkv.py --json bench.json --iters 50
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--seq", "-T", type=int, default=4096)
    p.add_argument("--heads", "-H", type=int, default=32)
    p.add_argument("--head-size", "-N", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed runs; the median is reported (default 20)")
    p.add_argument("--impl", action="append", choices=["cuda", "torch", "fla"],
                   help="implementations to run (repeatable; default: all that are available)")
    p.add_argument("--no-state", action="store_true", help="run without an initial state (as the public kernels train)")
    p.add_argument("--bandwidth", type=float, default=3.0, help="memory bandwidth for the floor, TB/s (default 3.0)")
    p.add_argument("--fp32-tflops", type=float, default=60.0,
                   help="fp32 CUDA-core throughput for the arithmetic floor, TFLOP/s (default 60; H100 SXM is ~67)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def make_inputs(B, T, H, N, dtype, with_state, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    r, k, v = (torch.randn(B, T, H, N, **kw) for _ in range(3))
    w = -torch.exp(-0.5 - torch.rand(B, T, H, N, **kw) * 4.0)          # the model's range, decays 0.55..0.99
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, **kw), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, **kw)
    xs = [x.to(dtype).contiguous() for x in (r, w, k, v, a, b)]
    s0 = torch.randn(B, H, N, N, **kw) * 0.1 if with_state else None
    return xs, s0


def floors(B, T, H, N, elem_bytes, bandwidth_tbs, tflops):
    """Lower bounds in ms. Bytes: forward reads r,w,k,v,a,b and writes o; the backward also reads dy and the six
    inputs again and writes six gradients; states in/out in fp32. Arithmetic, per state element and step: forward
    sa (1 FMA), state update (1 mul + 2 FMA), output (1 FMA) = 9 flop; backward, the least the chain rule needs with
    the state at hand: dS += dy r^T, dv, dsa, dk, db, dr, da, dw (8 FMA) + dS update (1 mul + 1 FMA) = 19 flop,
    plus recomputing S_{t-1} (5 flop) since no GPU holds every step's state."""
    n = B * T * H * N
    state = B * H * N * N * 4
    fwd_bytes = 7 * n * elem_bytes + 2 * state
    fb_bytes = fwd_bytes + 14 * n * elem_bytes + 3 * state
    elems = B * T * H * N * N
    fwd_flop = 9 * elems
    fb_flop = fwd_flop + (19 + 5) * elems
    bw = bandwidth_tbs * 1e12
    fl = tflops * 1e12
    return {"bytes_fwd_ms": fwd_bytes / bw * 1e3, "bytes_fwdbwd_ms": fb_bytes / bw * 1e3,
            "flops_fwd_ms": fwd_flop / fl * 1e3, "flops_fwdbwd_ms": fb_flop / fl * 1e3}


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def impl_cuda():
    from rwkv_peft.ops import wkv7_cuda
    ok, why = wkv7_cuda.is_available()
    if not ok:
        return None, why
    return (lambda r, w, k, v, a, b, s0: wkv7_cuda.wkv7_cuda(r, w, k, v, a, b, s0)), why


def impl_torch():
    from rwkv_peft.ops.wkv7 import wkv7_chunked
    return (lambda r, w, k, v, a, b, s0: wkv7_chunked(r, w, k, v, a, b, s0, chunk_size=16)), "wkv7_chunked, chunk 16"


def impl_fla():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # optional benchmark-only dependency
        return None, f"flash-linear-attention not importable ({type(e).__name__}: {e})"
    params = inspect.signature(chunk_rwkv7).parameters

    def run(r, w, k, v, a, b, s0):
        # fla keeps the state as [B, H, K, V] (key-major); ours is [B, H, V, K]. Both use the log decay w and
        # S_t = S_{t-1} (diag(exp w) + a b^T) + v k^T in our layout, i.e. h_t = (diag(exp w) + b a^T) h + k v^T in its.
        kw = dict(r=r, k=k, v=v, a=a, b=b, scale=1.0, output_final_state=True,
                  initial_state=None if s0 is None else s0.transpose(-1, -2).contiguous())
        if "log_w" in params:   # newer signature: w is the raw parameter, log_w the log decay
            kw["log_w"] = w
        else:                   # older signature: w is the log decay
            kw["w"] = w
        o, sT = chunk_rwkv7(**kw)
        return o, (None if sT is None else sT.transpose(-1, -2))

    return run, "fla.ops.rwkv7.chunk_rwkv7"


def bench_one(name, fn, xs, s0, args):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    s0_leaf = None if s0 is None else s0.detach().clone().requires_grad_()
    do = torch.randn_like(xs[0])
    dsT = None if s0 is None else torch.randn_like(s0)

    def fwd():
        with torch.no_grad():
            fn(*xs, s0)

    def fwd_bwd():
        o, sT = fn(*leaves, s0_leaf)
        loss = (o * do).sum()
        if dsT is not None and sT is not None:
            loss = loss + (sT * dsT).sum()
        loss.backward()
        for t in leaves + ([s0_leaf] if s0_leaf is not None else []):
            t.grad = None

    torch.cuda.reset_peak_memory_stats()
    f_med, f_min = timed(fwd, args.warmup, args.iters)
    fb_med, fb_min = timed(fwd_bwd, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"impl": name, "fwd_ms": f_med, "fwd_min_ms": f_min, "fwdbwd_ms": fb_med, "fwdbwd_min_ms": fb_min,
            "peak_gib": peak}


def agreement(fn_a, fn_b, xs, s0):
    with torch.no_grad():
        oa, sa = fn_a(*xs, s0)
        ob, sb = fn_b(*xs, s0)
    d = float((oa.float() - ob.float()).abs().max() / ob.float().abs().max())
    return d


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_wkv.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.",
              file=sys.stderr)
        return 2
    B, T, H, N = args.batch, args.seq, args.heads, args.head_size
    dtype = DTYPES[args.dtype]
    xs, s0 = make_inputs(B, T, H, N, dtype, not args.no_state)
    wanted = args.impl or ["cuda", "torch", "fla"]
    makers = {"cuda": impl_cuda, "torch": impl_torch, "fla": impl_fla}
    results, notes, fns = [], {}, {}
    for name in wanted:
        fn, note = makers[name]()
        notes[name] = note
        if fn is None:
            print(f"[skip] {name}: {note}")
            continue
        fns[name] = fn
        try:
            results.append(bench_one(name, fn, xs, s0, args))
        except torch.cuda.OutOfMemoryError as e:
            print(f"[skip] {name}: out of memory ({e})")
            torch.cuda.empty_cache()
    check = {}
    if "cuda" in fns:
        for other in ("torch", "fla"):
            if other in fns:
                try:
                    check[f"cuda_vs_{other}_rel_max_diff_o"] = agreement(fns["cuda"], fns[other], xs, s0)
                except Exception as e:  # informative only
                    check[f"cuda_vs_{other}_rel_max_diff_o"] = f"failed: {e}"

    fl = floors(B, T, H, N, torch.tensor([], dtype=dtype).element_size(), args.bandwidth, args.fp32_tflops)
    props = torch.cuda.get_device_properties(0)
    print(f"\nWKV-7  B={B} T={T} H={H} N={N} {args.dtype}  initial state: {'no' if args.no_state else 'yes'}  "
          f"device: {props.name}  torch {torch.__version__}")
    print(f"{'impl':<8}{'forward ms':>12}{'fwd+bwd ms':>12}{'peak GiB':>10}")
    for r in results:
        print(f"{r['impl']:<8}{r['fwd_ms']:>12.3f}{r['fwdbwd_ms']:>12.3f}{r['peak_gib']:>10.2f}")
    print(f"{'floor: bytes @ %.1f TB/s' % args.bandwidth:<32}{fl['bytes_fwd_ms']:>8.3f}{fl['bytes_fwdbwd_ms']:>12.3f}")
    print(f"{'floor: fp32 flops @ %.0f TF' % args.fp32_tflops:<32}{fl['flops_fwd_ms']:>8.3f}{fl['flops_fwdbwd_ms']:>12.3f}")
    for k, v in check.items():
        print(f"{k}: {v}")
    out = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": props.name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
           "shape": {"B": B, "T": T, "H": H, "N": N, "dtype": args.dtype, "initial_state": not args.no_state},
           "warmup": args.warmup, "iters": args.iters, "results": results, "floors": fl, "notes": notes,
           "agreement": check}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
