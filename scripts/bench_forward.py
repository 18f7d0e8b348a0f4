#!/usr/bin/env python
"""Forward throughput on CPU: rwkv-peft's RWKV-7 against the official ``rwkv`` package, same random checkpoint.

Measures, in fp32 on CPU, tokens/s of (a) one forward pass over a sequence (prefill / training-style) and (b)
token-by-token decoding with the state carried: for both, a loop of ``forward`` calls on one token (like with
like); for ours also (c) ``generate()`` (greedy, ``--steps`` new tokens, EOS off), which adds transformers'
per-step work. The official package runs in a subprocess (it chooses its architecture from environment
variables at import) that stays up: the rounds alternate, ours then official, ``--repeats`` times, and the
medians are reported, so load from other processes hits both alike. Also times the head's matrix-vector product
alone in both weight layouts (``nn.Linear``'s [V, C] and the official [C, V]): at V = 65536 it is most of a
decode step's memory traffic. Prints a table and writes JSON.

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
with torch.no_grad():
    m.forward(toks[:8], None, full_output=True)
    print("ready", flush=True)
    for line in sys.stdin:  # one round per line: one forward pass, one decode loop
        t0 = time.perf_counter(); m.forward(toks, None, full_output=True); seq = time.perf_counter() - t0
        state = None
        t0 = time.perf_counter()
        for t in toks[: args["steps"]]:
            _, state = m.forward([t], state)
        print(json.dumps({"seq_s": seq, "step_s": time.perf_counter() - t0}), flush=True)
'''


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq", type=int, default=512, help="tokens in the one-pass forward")
    p.add_argument("--steps", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (ours, official); medians reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--layouts", action="store_true",
                   help="also decode with only the head's weight stored transposed, [in, out] in memory (chat / "
                        "generate store every Linear weight so: relayout_for_cpu_decoding, always measured)")
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

    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"}
    req = json.dumps({"model": str(pth), "tokens": tokens, "steps": args.steps, "threads": args.threads})
    official_proc = subprocess.Popen([sys.executable, "-c", OFFICIAL, req], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
    while official_proc.stdout.readline().strip() != "ready":
        if official_proc.poll() is not None:
            raise RuntimeError("the official rwkv package failed to load the checkpoint")

    x = torch.tensor([tokens])
    model.generation_config.eos_token_id = None  # generate() decodes exactly --steps tokens
    model.generation_config.pad_token_id = 0
    W = model.head.weight.detach()
    W_official = W.t().contiguous()  # the official package's head layout [C, V]
    h = torch.randn(1, args.width)
    # every weight a decode step reads from memory (all nn.Linear: the head and the layers), in the official layout
    floor_weights = [mod.weight.detach().t().contiguous() for mod in model.modules()
                     if isinstance(mod, torch.nn.Linear)]
    floor_inputs = [torch.randn(1, w.shape[0]) for w in floor_weights]
    floor_mb = sum(w.numel() * w.element_size() for w in floor_weights) / 1e6

    def floor():
        for xi, wi in zip(floor_inputs, floor_weights):
            xi @ wi

    def timed(fn, n=1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def decode_loop(m=model):
        state = None
        for t in tokens[: args.steps]:
            state = m(torch.tensor([[t]]), state=state, use_cache=True).state

    from rwkv_peft.methods import relayout_for_cpu_decoding
    relaid = {}
    chat_model = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    relayout_for_cpu_decoding(chat_model)  # as `rwkv-peft chat` / `generate` load a model on the CPU
    relaid["chat"] = chat_model
    if args.layouts:  # the head alone stored [in, out]
        m = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
        m.head.weight.data = m.head.weight.data.t().contiguous().t()
        relaid["head"] = m

    def ours_round():
        return {"seq_s": timed(lambda: model(x, use_cache=True)), "step_s": timed(decode_loop),
                "generate_s": timed(lambda: model.generate(x[:, :1], max_new_tokens=args.steps, do_sample=False)),
                "head_linear_s": timed(lambda: torch.nn.functional.linear(h, W), 8),
                "head_official_s": timed(lambda: h @ W_official, 8),
                "matvec_floor_s": timed(floor, 4),
                **{f"step_{name}_layout_s": timed(lambda: decode_loop(m)) for name, m in relaid.items()}}

    ours_runs, official_runs = [], []
    with torch.no_grad():
        model(x[:, :8])
        model.generate(x[:, :1], max_new_tokens=2, do_sample=False)
        for _ in range(args.repeats):
            ours_runs.append(ours_round())
            official_proc.stdin.write("go\n")
            official_proc.stdin.flush()
            official_runs.append(json.loads(official_proc.stdout.readline()))
    official_proc.stdin.close()
    official_proc.wait()
    med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # noqa: E731
    ours, official = med(ours_runs), med(official_runs)

    rows = []
    for name, r in (("rwkv-peft", ours), ("official rwkv 0.8.32", official)):
        rows.append({"impl": name, "seq_tokens_per_s": args.seq / r["seq_s"],
                     "step_tokens_per_s": args.steps / r["step_s"],
                     "generate_tokens_per_s": args.steps / r["generate_s"] if "generate_s" in r else None})
    head_mb = W.numel() * W.element_size() / 1e6
    print(f"RWKV-7 L{args.layers} C{args.width} V{args.vocab}, fp32, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads), seq {args.seq}, decode {args.steps} tokens, median of {args.repeats} "
          f"alternating rounds")
    print(f"{'implementation':<24}{'forward tok/s':>16}{'decode tok/s':>16}{'generate tok/s':>16}")
    for r in rows:
        gen = f"{r['generate_tokens_per_s']:>16.1f}" if r["generate_tokens_per_s"] else f"{'-':>16}"
        print(f"{r['impl']:<24}{r['seq_tokens_per_s']:>16.1f}{r['step_tokens_per_s']:>16.1f}{gen}")
    print(f"ratio (ours / official): forward {rows[0]['seq_tokens_per_s'] / rows[1]['seq_tokens_per_s']:.2f}x, "
          f"decode {rows[0]['step_tokens_per_s'] / rows[1]['step_tokens_per_s']:.2f}x (forward loop), "
          f"{rows[0]['generate_tokens_per_s'] / rows[1]['step_tokens_per_s']:.2f}x (our generate)")
    for name, what in (("chat", "as chat / generate load it (relayout_for_cpu_decoding: every Linear [in, out])"),
                       ("head", "with only the head's weight stored [in, out]")):
        if name in relaid:
            print(f"decode {what}: {args.steps / ours[f'step_{name}_layout_s']:.1f} tok/s "
                  f"({official['step_s'] / ours[f'step_{name}_layout_s']:.2f}x official)")
    print(f"head matvec alone ({head_mb:.0f} MB fp32): nn.Linear layout [V, C] {ours['head_linear_s'] * 1e3:.2f} ms "
          f"({head_mb / 1e3 / ours['head_linear_s']:.1f} GB/s), official layout [C, V] "
          f"{ours['head_official_s'] * 1e3:.2f} ms ({head_mb / 1e3 / ours['head_official_s']:.1f} GB/s)")
    print(f"matvec floor: the {len(floor_weights)} Linear weights ({floor_mb:.0f} MB) one after another, official "
          f"layout, nothing else: {ours['matvec_floor_s'] * 1e3:.2f} ms/token = {1 / ours['matvec_floor_s']:.1f} tok/s "
          f"({official['step_s'] / args.steps / ours['matvec_floor_s']:.2f}x official's decode)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                         "head_matvec_s": {"linear": ours["head_linear_s"],
                                                           "official_layout": ours["head_official_s"]},
                                         "matvec_floor_s": ours["matvec_floor_s"], "matvec_floor_mb": floor_mb,
                                         "rounds": {"ours": ours_runs, "official": official_runs},
                                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
