#!/usr/bin/env python
"""Cost per token of the PyTorch WKV forms (RWKV-7 ``wkv7_chunked``, RWKV-6 ``wkv6_chunked``) on the CPU against T.

For each version and sequence length T the op runs alone (B=1, H=4, N=64, fp32 by default; random inputs in the
model's range, an initial state in, the final state out) in two fresh processes: one times the forward (under
``torch.no_grad``), the other the forward+backward (loss = sum(o * do) + sum(S_T * dS), gradients of every input and
the initial state). Each process reads its RSS after building the inputs (baseline) and its RSS high-water mark
(VmHWM; ru_maxrss where /proc is missing) at the end, so the table's memory is the op's own peak in that mode.
Before timing, one untimed warm-up run on the first min(T, 1024) tokens. Prints a table (median of --repeats
timed runs): wall-clock tokens/s, forward+backward relative to the smallest T, forward+backward tokens per
second of the process's CPU time (steadier than the wall clock on a shared machine; with one thread the two
agree on an idle one), and the memory over baseline per 1k tokens; writes JSON with --json. An O(T) op keeps
the ratio near 1 and the memory per 1k tokens flat as T grows.

    python scripts/bench_wkv_cpu.py                                  # T = 1k, 4k, 16k, 64k; v7 and v6
    python scripts/bench_wkv_cpu.py --T 1024,4096 --versions v7 --repeats 3 --json wkv_cpu.json
    python scripts/bench_wkv_cpu.py --ops-dir /tmp/old_ops           # an older copy of wkv7.py + wkv6.py
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_memory_cpu import peak_rss_bytes, rss_bytes  # noqa: E402  (one reader of the process's memory)

VERSIONS = ("v7", "v6")
MODES = ("fwd", "fwdbwd")
WARMUP_TOKENS = 1024


# ---- one case (child process) -------------------------------------------------------------------------------------

def load_ops(version: str, ops_dir: str | None):
    """The chunked op of ``version``: from rwkv_peft.ops, or from wkv7.py / wkv6.py in ``ops_dir`` (an older copy;
    loaded as a package so that wkv6.py's ``from .wkv7 import ...`` resolves to the copy beside it)."""
    name = {"v7": "wkv7", "v6": "wkv6"}[version]
    if ops_dir is None:
        mod = importlib.import_module(f"rwkv_peft.ops.{name}")
    else:
        pkg = types.ModuleType("_bench_wkv_ops")
        pkg.__path__ = [str(Path(ops_dir).resolve())]
        sys.modules["_bench_wkv_ops"] = pkg
        mod = importlib.import_module(f"_bench_wkv_ops.{name}")
    return getattr(mod, f"{name}_chunked")


def make_inputs(version: str, B: int, T: int, H: int, N: int, dtype, seed: int = 0):
    """The op's inputs (without the initial state) and an initial state, in the model's ranges."""
    import torch
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    if version == "v7":
        w = -torch.exp(-0.5 - torch.rand(B, T, H, N, generator=g) * 4.0)      # decays 0.55..0.99
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g)]
    else:
        w = -torch.exp(torch.rand(B, T, H, N, generator=g) * 4.0 - 3.0)         # w = -exp(z), z in [-3, 1]
        xs = [r, w, k, v, torch.randn(H, N, generator=g) * 0.5]
    s0 = torch.randn(B, H, N, N, generator=g) * 0.1
    return [x.to(dtype) for x in xs], s0


def run_case(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fn = load_ops(args.version, args.ops_dir)
    B, T, H, N = args.batch, int(args.T), args.heads, args.head_size
    xs, s0 = make_inputs(args.version, B, T, H, N, dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, N, generator=g).to(dtype)
    dS = torch.randn(B, H, N, N, generator=g)
    baseline = rss_bytes()

    def cut(t):  # the first t tokens of the sequence inputs
        return [x[:, :t] if x.dim() == 4 else x for x in xs], do[:, :t]

    def once(inputs, d_o):
        if args.mode == "fwd":
            with torch.no_grad():
                fn(*inputs, initial_state=s0, chunk_size=args.chunk_size)
            return
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        s = s0.clone().requires_grad_()
        o, S = fn(*leaves, initial_state=s, chunk_size=args.chunk_size)
        ((o * d_o).sum() + (S * dS).sum()).backward()

    t0 = time.perf_counter()
    once(*cut(min(T, WARMUP_TOKENS)))
    warmup_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        once(xs, do)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med, cpu_med = statistics.median(times), statistics.median(cpu)
    return {"version": args.version, "mode": args.mode, "T": T, "batch": B, "heads": H, "head_size": N,
            "dtype": args.dtype, "chunk_size": args.chunk_size, "threads": args.threads, "times_s": times,
            "median_s": med, "tokens_per_s": B * T / med, "cpu_s": cpu, "cpu_median_s": cpu_med,
            "tokens_per_cpu_s": B * T / cpu_med, "warmup_s": warmup_s, "baseline_rss": baseline,
            "peak_rss": peak_rss_bytes(), "peak_over_baseline": peak_rss_bytes() - baseline}


def run_in_subprocess(args, version: str, mode: str, T: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--version", version, "--mode", mode,
           "--T", str(T), "--batch", str(args.batch), "--heads", str(args.heads), "--head-size", str(args.head_size),
           "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    cmd += ["--ops-dir", args.ops_dir] if args.ops_dir else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"version": version, "mode": mode, "T": T, "error": f"timed out after {args.timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
        return {"version": version, "mode": mode, "T": T, "error": err[:300]}
    return json.loads(line[len("RESULT "):])


# ---- driver -------------------------------------------------------------------------------------------------------

HEADER = (f"{'op':>3} {'T':>6} {'fwd tok/s':>10} {'fwd MB':>7} {'fwd+bwd tok/s':>13} {'x smallest T':>12} "
          f"{'tok/CPU-s':>9} {'fwd+bwd MB':>10} {'MB/1k tok':>9}")


def combine(version: str, T: int, fwd: dict, fb: dict, first_fb: dict | None) -> dict:
    return {"version": version, "T": T, "fwd": fwd, "fwdbwd": fb,
            "fwdbwd_vs_smallest_T": (fb["tokens_per_s"] / first_fb["tokens_per_s"]
                                     if first_fb and "error" not in fb and "error" not in first_fb else None)}


def _mb(b) -> str:
    return f"{b / 1e6:.0f}"


def format_row(row: dict) -> str:
    f, fb = row["fwd"], row["fwdbwd"]
    fwd_rate = f"{f['tokens_per_s']:,.0f}" if "error" not in f else "error"
    fwd_mem = _mb(f["peak_over_baseline"]) if "error" not in f else ""
    if "error" in fb:
        return f"{row['version']:>3} {row['T']:>6} {fwd_rate:>10} {fwd_mem:>7}  fwd+bwd ERROR: {fb['error']}"
    ratio = f"{row['fwdbwd_vs_smallest_T']:.2f}" if row["fwdbwd_vs_smallest_T"] is not None else ""
    per_k = fb["peak_over_baseline"] / (fb["T"] * fb["batch"] / 1000)
    return (f"{row['version']:>3} {row['T']:>6} {fwd_rate:>10} {fwd_mem:>7} {fb['tokens_per_s']:>13,.0f} {ratio:>12} "
            f"{fb['tokens_per_cpu_s']:>9,.0f} {_mb(fb['peak_over_baseline']):>10} {per_k / 1e6:>9.2f}")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="1024,4096,16384,65536",
                   help="sequence lengths, comma-separated (default 1024,4096,16384,65536)")
    p.add_argument("--versions", default=",".join(VERSIONS), help="ops to run: v7, v6 or both (default both)")
    p.add_argument("--batch", "-B", type=int, default=1)
    p.add_argument("--heads", "-H", type=int, default=4)
    p.add_argument("--head-size", "-N", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    p.add_argument("--chunk-size", type=int, default=16, help="the chunked form's chunk (default 16, as the models)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case; the median is reported (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case (default: torch's)")
    p.add_argument("--ops-dir", default=None, help="measure wkv7.py / wkv6.py from this folder (e.g. an older "
                                                   "revision's copies) instead of rwkv_peft.ops")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case (default 1800)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one case in this process
    p.add_argument("--version", choices=VERSIONS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    if args.threads is None:
        import torch
        args.threads = torch.get_num_threads()
    if args.one:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0
    versions = [x.strip() for x in args.versions.split(",") if x.strip()]
    for x in versions:
        if x not in VERSIONS:
            p.error(f"--versions: unknown op {x!r} (known: {', '.join(VERSIONS)})")
    try:
        Ts = [int(t) for t in args.T.split(",") if t.strip()]
    except ValueError:
        p.error(f"--T: expected comma-separated integers, got {args.T!r}")

    before, started = machine(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"WKV chunked forms on the CPU: B={args.batch} H={args.heads} N={args.head_size} {args.dtype}, chunk "
          f"{args.chunk_size}, {args.threads} thread(s), median of {args.repeats}; ops from "
          f"{args.ops_dir or 'rwkv_peft.ops'}; one process per case; MB = peak RSS over the baseline", flush=True)
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    rows = []
    for version in versions:
        first_fb = None
        for T in Ts:
            fwd = run_in_subprocess(args, version, "fwd", T)
            fb = run_in_subprocess(args, version, "fwdbwd", T)
            if first_fb is None:
                first_fb = fb
            rows.append(combine(version, T, fwd, fb, first_fb))
            print(format_row(rows[-1]), flush=True)
    if args.json:
        import torch
        meta = {"date": started, "machine": before, "loadavg_after": list(os.getloadavg()),
                "torch": torch.__version__, "python": platform.python_version(),
                "command": " ".join(["scripts/bench_wkv_cpu.py"] + list(sys.argv[1:] if argv is None else argv)),
                "ops": args.ops_dir or "rwkv_peft.ops", "threads": args.threads,
                "memory": "peak_rss = VmHWM of a fresh process per case and mode; baseline_rss = VmRSS after "
                          "building the inputs, before the warm-up"}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"\nwrote {args.json}")
    ok = all("error" not in r["fwd"] and "error" not in r["fwdbwd"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
