#!/usr/bin/env python
"""Peak process memory (RSS) of one LoRA training step of RWKV-7 on the CPU: full logits against the chunked loss.

The model is a random RWKV7ForCausalLM (fp32, World vocab 65536 by default) whose depth is chosen so that its
parameter count, counted from the built model, is the closest to --target-params (27M: width 192, 4 layers).
LoRA is attached with ``rwkv_peft.methods.apply_lora`` and AdamW trains the adapters. Each case (loss path, T) runs
in its own process: build the model, attach LoRA, read the baseline RSS, run one warm-up step and one timed step
(forward + backward + AdamW step), then read the process's RSS high-water mark (VmHWM; ru_maxrss elsewhere).

Loss paths:
  full     out = model(input_ids=ids); F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1))
           - the [B, T, V] logits exist (in fp32 ``.float()`` is the same tensor, no copy);
  chunked  model(input_ids=ids, labels=ids, return_logits=False, loss_chunk_size=N) - never holds [B, T, V].
  recompute  the training step's chunk mode with long_context.recompute (rwkv_peft.training.step): --chunk-len
           tokens per forward, the gradient through the whole row, each chunk run again in the backward.

RSS counts what glibc's malloc keeps after tensors are freed (0.6-0.7 GB more than the live tensors at 2 x 2048);
MALLOC_MMAP_THRESHOLD_=1048576 in the environment (each case inherits it; the JSON records MALLOC_* variables)
hands blocks of 1 MB and more back to the system at once. Timing: one thread count for all cases (--threads).

    python scripts/bench_memory_cpu.py                                   # T = 1024, 2048, 4096; both paths
    python scripts/bench_memory_cpu.py --T 2048 --paths chunked --loss-chunk-size 256 --json out.json
    MALLOC_MMAP_THRESHOLD_=1048576 python scripts/bench_memory_cpu.py --checkpointing --loss-chunk-size 256
    python scripts/bench_memory_cpu.py --vocab 300 --width 64 --layers 1 --T 32 --batch 1   # a tiny smoke run
    python scripts/bench_memory_cpu.py --paths recompute --batch 1 --T 4096,16384,65536 --chunk-len 4096
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_memory import count_params  # noqa: E402  (counts parameters on the meta device)

PATHS = ("full", "chunked", "recompute")


# ---- the model ------------------------------------------------------------------------------------------------------

def config_for(vocab: int, width: int, layers: int):
    from rwkv_peft.models.rwkv7.configuration_rwkv7 import RWKV7Config
    return RWKV7Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers)


def pick_layers(vocab: int, width: int, target: float, max_layers: int = 64) -> int:
    """The depth whose counted parameter total is the closest to ``target`` (the shallowest on a tie)."""
    best, best_err, prev = 1, None, None
    for layers in range(1, max_layers + 1):
        err = abs(count_params(config_for(vocab, width, layers)) - target)
        if best_err is None or err < best_err:
            best, best_err = layers, err
        if prev is not None and err > prev:  # the count grows with depth: past the closest one
            break
        prev = err
    return best


# ---- memory readings (this process) -------------------------------------------------------------------------------

def _status_bytes(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark (VmHWM on Linux, else ru_maxrss)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, kB on Linux


# ---- one case (child process) ---------------------------------------------------------------------------------------

def step_loss(model, ids, path: str, loss_chunk_size: int):
    import torch.nn.functional as F

    from rwkv_peft.models.common import shift_targets
    if path == "full":
        out = model(input_ids=ids)
        V = out.logits.shape[-1]
        return F.cross_entropy(out.logits.float().reshape(-1, V), shift_targets(ids).reshape(-1), ignore_index=-100)
    return model(input_ids=ids, labels=ids, return_logits=False, loss_chunk_size=loss_chunk_size).loss


def recompute_step(model, ids, chunk_len: int, loss_chunk_size):
    """Forward and backward of the whole row in chunk mode with recompute, as the training loop runs it."""
    import contextlib
    from types import SimpleNamespace

    from rwkv_peft.training.step import micro_batch_loss, trained_tokens
    acc = SimpleNamespace(device=ids.device, distributed_type="NO", scaler=None, backward=lambda x: x.backward(),
                          no_sync=lambda m: contextlib.nullcontext())
    batch = {"input_ids": ids, "labels": ids}
    lc = SimpleNamespace(chunk_len=chunk_len, grad_chunks=1, recompute=True)
    denom = float(trained_tokens(batch))
    return micro_batch_loss(acc, model, batch, denom, lc, chunked=True, sync=True,
                            loss_chunk_size=loss_chunk_size) / denom


def train_step(model, opt, ids, path: str, loss_chunk_size: int, chunk_len: int = 4096) -> float:
    if path == "recompute":
        loss = recompute_step(model, ids, chunk_len, loss_chunk_size)
    else:
        loss = step_loss(model, ids, path, loss_chunk_size)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_case(args) -> dict:
    import torch

    from rwkv_peft.methods import apply_lora
    from rwkv_peft.models.rwkv7.modeling_rwkv7 import RWKV7ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(config_for(args.vocab, args.width, args.layers))
    params = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    if args.checkpointing:  # transformers >= 5.2x calls it activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    baseline, build_peak = rss_bytes(), peak_rss_bytes()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.T), generator=g)
    times, losses = [], []
    for _ in range(2):  # one warm-up step, one timed step
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, ids, args.path, args.loss_chunk_size, args.chunk_len))
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    return {
        "path": args.path, "T": args.T, "batch": args.batch, "vocab": args.vocab, "width": args.width,
        "layers": args.layers, "params": params, "trainable_params": sum(p.numel() for p in trainable),
        "lora_r": args.lora_r, "loss_chunk_size": args.loss_chunk_size if args.path != "full" else None,
        "chunk_len": args.chunk_len if args.path == "recompute" else None,
        "checkpointing": args.checkpointing, "threads": torch.get_num_threads(),
        "baseline_rss": baseline, "build_peak_rss": build_peak, "peak_rss": peak, "step_rss_over_baseline":
        peak - baseline, "rss_after": rss_bytes(), "warmup_s": times[0], "step_s": times[1], "loss": losses,
    }


def run_in_subprocess(args, path: str, T: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--path", path, "--T", str(T),
           "--batch", str(args.batch), "--vocab", str(args.vocab), "--width", str(args.width),
           "--layers", str(args.layers),
           "--lora-r", str(args.lora_r), "--threads", str(args.threads)]
    cmd += ["--checkpointing"] if args.checkpointing else []
    cmd += ["--loss-chunk-size", str(args.loss_chunk_size)] if args.loss_chunk_size else []
    cmd += ["--chunk-len", str(args.chunk_len)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"path": path, "T": T, "error": f"timed out after {args.timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
        return {"path": path, "T": T, "error": err[:300]}
    return json.loads(line[len("RESULT "):])


# ---- driver ---------------------------------------------------------------------------------------------------------

def gb(b) -> str:
    return f"{b / 1e9:.2f}"


HEADER = (f"{'path':>7} {'B x T':>9} {'chunk':>5} {'baseline GB':>11} {'peak GB':>8} {'peak-base GB':>12} "
          f"{'s/step':>7} {'loss':>8}  chunked/full peak")


def format_row(r: dict, full_peak=None) -> str:
    if "error" in r:
        return f"{r['path']:>7} {r['T']:>9}  ERROR: {r['error']}"
    ratio = f"{r['peak_rss'] / full_peak:.2f}" if r["path"] == "chunked" and full_peak else ""
    return (f"{r['path']:>7} {str(r['batch']) + 'x' + str(r['T']):>9} {r['loss_chunk_size'] or '':>5} "
            f"{gb(r['baseline_rss']):>11} {gb(r['peak_rss']):>8} {gb(r['step_rss_over_baseline']):>12} "
            f"{r['step_s']:>7.2f} {r['loss'][-1]:>8.4f}  {ratio}")


def print_table(rows) -> None:
    full = {r["T"]: r["peak_rss"] for r in rows if r.get("path") == "full" and "error" not in r}
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(format_row(r, full.get(r["T"])))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="1024,2048,4096", help="sequence lengths, comma-separated (default 1024,2048,4096)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--paths", default=",".join(PATHS), help="loss paths: full, chunked or both (default both)")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="positions per chunk of the chunked "
                   "loss (default: the model's, a 64 MiB chunk of logits)")
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (default 65536)")
    p.add_argument("--width", type=int, default=192, help="hidden size (default 192)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the depth whose parameter count "
                                                             "is closest to --target-params)")
    p.add_argument("--target-params", type=float, default=27e6, help="parameter count to aim at (default 27e6)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r; default 16)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each case (default 2)")
    p.add_argument("--checkpointing", action="store_true", help="turn gradient checkpointing on (default off)")
    p.add_argument("--chunk-len", type=int, default=4096, help="tokens per forward of the recompute path "
                                                               "(default 4096)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case (default 1800)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one case in this process
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        args.T = int(args.T)
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0

    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    for x in paths:
        if x not in PATHS:
            p.error(f"--paths: unknown path {x!r} (known: {', '.join(PATHS)})")
    try:
        Ts = [int(t) for t in args.T.split(",") if t.strip()]
    except ValueError:
        p.error(f"--T: expected comma-separated integers, got {args.T!r}")
    if args.layers is None:
        args.layers = pick_layers(args.vocab, args.width, args.target_params)
    config = config_for(args.vocab, args.width, args.layers)
    params = count_params(config)
    print(f"{config.describe()} - {params:,} parameters (counted); LoRA r={args.lora_r}; batch {args.batch}; "
          f"{args.threads} thread(s); one process per case", flush=True)

    before, started = machine(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    print(HEADER + "\n" + "-" * len(HEADER), flush=True)
    for T in Ts:
        for path in paths:
            rows.append(run_in_subprocess(args, path, T))
            print(format_row(rows[-1]), flush=True)
    print()
    print_table(rows)
    if args.json:
        import torch
        meta = {"date": started, "machine": before,
                "loadavg_after": list(os.getloadavg()), "torch": torch.__version__,
                "python": platform.python_version(),
                "command": " ".join(["scripts/bench_memory_cpu.py"] + list(sys.argv[1:] if argv is None else argv)),
                "config": config.describe(), "params": params, "threads": args.threads,
                "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                "memory": "peak_rss = VmHWM (RSS high-water mark) of a fresh process per case; baseline_rss = VmRSS "
                          "after model build + LoRA + optimizer creation"}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
