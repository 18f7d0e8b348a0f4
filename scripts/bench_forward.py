#!/usr/bin/env python
"""Forward throughput on CPU: rwkv-peft's RWKV-7 against the official ``rwkv`` package, same random checkpoint.

Measures, in fp32 on CPU, tokens/s of (a) one forward pass over a sequence (prefill / training-style) and (b)
token-by-token decoding with the state carried. The official package runs in a subprocess (it chooses its
architecture from environment variables at import). Prints a table and writes JSON.

    python scripts/bench_forward.py --width 512 --layers 6 --seq 512 --json bench_forward.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OFFICIAL = r'''
import json, sys, time, statistics, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from rwkv.model import RWKV
m = RWKV(model=args["model"][:-4], strategy="cpu fp32")
toks = args["tokens"]
seq, step = [], []
with torch.no_grad():
    m.forward(toks[:8], None, full_output=True)
    for _ in range(args["repeats"]):
        t0 = time.perf_counter(); m.forward(toks, None, full_output=True); seq.append(time.perf_counter() - t0)
    for _ in range(args["repeats"]):
        state = None
        t0 = time.perf_counter()
        for t in toks[: args["steps"]]:
            _, state = m.forward([t], state)
        step.append(time.perf_counter() - t0)
print(json.dumps({"seq_s": statistics.median(seq), "step_s": statistics.median(step)}))
'''


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq", type=int, default=512, help="tokens in the one-pass forward")
    p.add_argument("--steps", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import rwkv_peft  # noqa: F401
    from rwkv_peft.convert import convert
    from tests.factories import make_blinkdl_v7

    tmp = Path(tempfile.mkdtemp())
    pth = tmp / "bench.pth"
    torch.save(make_blinkdl_v7(args.vocab, args.width, args.layers, seed=0), pth)
    convert(pth, tmp / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab, (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()

    seq, step = [], []
    x = torch.tensor([tokens])
    with torch.no_grad():
        model(x[:, :8])
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(x, use_cache=True)
            seq.append(time.perf_counter() - t0)
        for _ in range(args.repeats):
            state = None
            t0 = time.perf_counter()
            for t in tokens[: args.steps]:
                state = model(torch.tensor([[t]]), state=state, use_cache=True).state
            step.append(time.perf_counter() - t0)
    ours = {"seq_s": statistics.median(seq), "step_s": statistics.median(step)}

    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"}
    req = json.dumps({"model": str(pth), "tokens": tokens, "steps": args.steps, "repeats": args.repeats,
                      "threads": args.threads})
    out = subprocess.run([sys.executable, "-c", OFFICIAL, req], env=env, capture_output=True, text=True, check=True)
    official = json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for name, r in (("rwkv-peft", ours), ("official rwkv 0.8.32", official)):
        rows.append({"impl": name, "seq_tokens_per_s": args.seq / r["seq_s"], "step_tokens_per_s": args.steps / r["step_s"]})
    print(f"RWKV-7 L{args.layers} C{args.width} V{args.vocab}, fp32, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads), seq {args.seq}, decode {args.steps} tokens")
    print(f"{'implementation':<24}{'forward tok/s':>16}{'decode tok/s':>16}")
    for r in rows:
        print(f"{r['impl']:<24}{r['seq_tokens_per_s']:>16.1f}{r['step_tokens_per_s']:>16.1f}")
    print(f"ratio (ours / official): forward {rows[0]['seq_tokens_per_s'] / rows[1]['seq_tokens_per_s']:.2f}x, "
          f"decode {rows[0]['step_tokens_per_s'] / rows[1]['step_tokens_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
