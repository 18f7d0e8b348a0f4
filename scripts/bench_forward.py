#!/usr/bin/env python
"""Forward and decode throughput on the CPU: rwkv-peft's RWKV-7 against the official ``rwkv`` package, same
random checkpoint.

Measures tokens/s of (a) one forward pass over a sequence (prefill / training-style) and (b) token-by-token
decoding with the state carried (a loop of ``forward`` calls on one token: like with like); for ours also
(c) ``generate()`` (greedy, ``--steps`` new tokens, EOS off), which adds transformers' per-step work.

Ours runs as ``from_pretrained`` loads it (float32, ``nn.Linear`` layout) and as ``chat`` / ``generate`` load it
with each ``--cpu-weights`` (``methods.prepare_for_cpu_decoding``: fp32 relaid, fp16, int8). The official
package runs ``cpu fp32`` and, with ``--official-bf16``, ``cpu bf16`` (its only other CPU mode for RWKV-7). Each
reduced-precision run also reports its decode error against its own package's float32 decode of the same tokens:
relative RMS error of the logits, mean KL divergence of the next-token distributions, and how often the top token
agrees.

The official package runs in a subprocess (it chooses its architecture from environment variables at import)
that stays up: the rounds alternate, ours then official, ``--repeats`` times, and the medians are reported, so
load from other processes hits both alike. Also times the head's matrix-vector product alone in both weight
layouts (``nn.Linear``'s [V, C] and the official [C, V]) and the "matvec floor" (every Linear weight multiplied
once in the official layout, nothing else: what a float32 decode step cannot go below). Prints a table and
writes JSON.

    python scripts/bench_forward.py --threads 1 --official-bf16 --json bench_forward.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
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

def quality(logits, ref):
    """logits, ref: [steps, V] decode logits -> relative RMS error, mean KL(ref || logits), top-token agreement"""
    import torch.nn.functional as F
    logits, ref = logits.double(), ref.double()
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return {"rel_rms": float((logits - ref).norm() / ref.norm()), "kl": float(kl),
            "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).double().mean())}


# the official package's side (a subprocess: it picks its architecture from environment variables at import);
# quality() is shared with ours, its source handed over as text
OFFICIAL = inspect.getsource(quality) + r'''
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from rwkv.model import RWKV
models = {s: RWKV(model=args["model"][:-4], strategy=s) for s in args["strategies"]}
toks = args["tokens"]

def decode(m):
    state, out = None, []
    for t in toks[: args["steps"]]:
        logits, state = m.forward([t], state)
        out.append(logits.float())
    return torch.stack(out)

with torch.no_grad():
    ref = decode(models["cpu fp32"])
    print(json.dumps({s: quality(decode(m), ref) for s, m in models.items() if s != "cpu fp32"}), flush=True)
    for line in sys.stdin:  # one round per line: one forward pass (fp32), one decode loop per strategy
        t0 = time.perf_counter(); models["cpu fp32"].forward(toks, None, full_output=True)
        r = {"seq_s": time.perf_counter() - t0}
        for s, m in models.items():
            t0 = time.perf_counter(); decode(m); r[f"step_s {s}"] = time.perf_counter() - t0
        print(json.dumps(r), flush=True)
'''


def timed(fn, n: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def decode(model, tokens):
    """[steps, V] logits of decoding ``tokens`` one at a time, the state carried."""
    state, out = None, []
    for t in tokens:
        o = model(torch.tensor([[t]]), state=state, use_cache=True)
        state = o.state
        out.append(o.logits[0, -1])
    return torch.stack(out)


def start_official(pth: Path, tokens, args):
    """The official package's process, ready for rounds, and its reduced-precision errors."""
    strategies = ["cpu fp32"] + (["cpu bf16"] if args.official_bf16 else [])
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"}
    req = json.dumps({"model": str(pth), "tokens": tokens, "steps": args.steps, "threads": args.threads,
                      "strategies": strategies})
    proc = subprocess.Popen([sys.executable, "-c", OFFICIAL, req], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # it prints what it loads first
        if line.startswith("{"):
            return proc, strategies, json.loads(line)
    raise RuntimeError("the official rwkv package failed to load the checkpoint")


def matvec_floor(model):
    """A function doing every nn.Linear's matrix-vector product once in the official [in, out] layout, and the MB
    of weights it reads."""
    weights = [m.weight.detach().t().contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[0]) for w in weights]

    def floor():
        for xi, wi in zip(inputs, weights):
            xi @ wi
    return floor, len(weights), sum(w.numel() * w.element_size() for w in weights) / 1e6


def load_models(hf: Path, weights_kinds):
    """(the model as from_pretrained loads it, {cpu-weights kind: the model as chat / generate load it})."""
    from transformers import AutoModelForCausalLM

    from rwkv_peft.methods import prepare_for_cpu_decoding
    load = lambda: AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()  # noqa: E731
    return load(), {kind: prepare_for_cpu_decoding(load(), kind) for kind in weights_kinds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq", type=int, default=512, help="tokens in the one-pass forward")
    p.add_argument("--steps", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (ours, official); medians reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cpu-weights", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"],
                   help="ours as chat / generate load it with these --cpu-weights")
    p.add_argument("--official-bf16", action="store_true", help="also the official package's 'cpu bf16'")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import rwkv_peft  # noqa: F401
    from rwkv_peft.convert import convert
    from tests.factories import make_blinkdl_v7

    tmp = Path(tempfile.mkdtemp())
    pth = tmp / "bench.pth"
    torch.save(make_blinkdl_v7(args.vocab, args.width, args.layers, seed=0), pth)
    convert(pth, tmp / "hf")
    model, chat_models = load_models(tmp / "hf", args.cpu_weights)
    tokens = torch.randint(0, args.vocab, (args.seq,), generator=torch.Generator().manual_seed(0)).tolist()
    official, strategies, official_quality = start_official(pth, tokens, args)

    x = torch.tensor([tokens])
    steps = tokens[: args.steps]
    model.generation_config.eos_token_id = None  # generate() decodes exactly --steps tokens
    model.generation_config.pad_token_id = 0
    W = model.head.weight.detach()
    W_official, h = W.t().contiguous(), torch.randn(1, args.width)  # the official package's head layout [C, V]
    floor, n_floor, floor_mb = matvec_floor(model)

    def ours_round():
        r = {"seq_s": timed(lambda: model(x, use_cache=True)), "step_s": timed(lambda: decode(model, steps)),
             "generate_s": timed(lambda: model.generate(x[:, :1], max_new_tokens=args.steps, do_sample=False)),
             "head_linear_s": timed(lambda: torch.nn.functional.linear(h, W), 8),
             "head_official_s": timed(lambda: h @ W_official, 8), "matvec_floor_s": timed(floor, 4)}
        for kind, m in chat_models.items():
            r[f"seq_s {kind}"] = timed(lambda: m(x, use_cache=True))
            r[f"step_s {kind}"] = timed(lambda: decode(m, steps))
        return r

    with torch.no_grad():
        ref = decode(model, steps)
        ours_quality = {kind: quality(decode(m, steps), ref) for kind, m in chat_models.items()}
        model.generate(x[:, :1], max_new_tokens=2, do_sample=False)  # warm-up
        ours_runs, official_runs = [], []
        for _ in range(args.repeats):
            ours_runs.append(ours_round())
            official.stdin.write("go\n")
            official.stdin.flush()
            official_runs.append(json.loads(official.stdout.readline()))
    official.stdin.close()
    official.wait()
    med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # noqa: E731
    ours, off = med(ours_runs), med(official_runs)
    rows = report(args, ours, off, strategies, ours_quality, official_quality, n_floor, floor_mb, W)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                         "rounds": {"ours": ours_runs, "official": official_runs},
                                         "matvec_floor_mb": floor_mb, "torch": torch.__version__,
                                         "date": time.strftime("%Y-%m-%d")}, indent=2))


def report(args, ours, off, strategies, ours_quality, official_quality, n_floor, floor_mb, W):
    """Print the table; return its rows."""
    rows = [{"impl": "rwkv-peft, as from_pretrained loads it", "forward": args.seq / ours["seq_s"],
             "decode": args.steps / ours["step_s"], "generate": args.steps / ours["generate_s"]}]
    rows += [{"impl": f"rwkv-peft, chat / generate --cpu-weights {kind}", "forward": args.seq / ours[f"seq_s {kind}"],
              "decode": args.steps / ours[f"step_s {kind}"], **ours_quality[kind]}
             for kind in args.cpu_weights]
    official = f"official rwkv {importlib.metadata.version('rwkv')}"
    rows += [{"impl": f"{official} '{s}'", "forward": args.seq / off["seq_s"] if s == "cpu fp32" else None,
              "decode": args.steps / off[f"step_s {s}"], **official_quality.get(s, {})} for s in strategies]
    base = next(r for r in rows if r["impl"].endswith("'cpu fp32'"))
    print(f"RWKV-7 L{args.layers} C{args.width} V{args.vocab}, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads), seq {args.seq}, decode {args.steps} tokens, median of {args.repeats} "
          f"alternating rounds; ratios against the official 'cpu fp32'; errors against the same package's fp32")
    print(f"{'implementation':<46}{'forward tok/s':>14}{'decode tok/s':>13}{'ratio':>7}{'rel-rms':>9}{'KL':>9}"
          f"{'top-1':>7}")
    for r in rows:
        fwd = f"{r['forward']:>9.1f} {r['forward'] / base['forward']:.2f}x" if r["forward"] else f"{'-':>14}"
        err = (f"{r['rel_rms']:>9.1e}{r['kl']:>9.1e}{r['top1_agree']:>7.2f}" if "kl" in r else "")
        print(f"{r['impl']:<46}{fwd:>14}{r['decode']:>13.1f}{r['decode'] / base['decode']:>6.2f}x{err}")
    print(f"generate() of the model as loaded: {rows[0]['generate']:.1f} tok/s")
    head_mb = W.numel() * W.element_size() / 1e6
    print(f"head matvec alone ({head_mb:.0f} MB fp32): nn.Linear layout [V, C] {ours['head_linear_s'] * 1e3:.2f} ms, "
          f"official layout [C, V] {ours['head_official_s'] * 1e3:.2f} ms")
    print(f"fp32 matvec floor: the {n_floor} Linear weights ({floor_mb:.0f} MB) one after another, official layout, "
          f"nothing else: {ours['matvec_floor_s'] * 1e3:.2f} ms/token = {1 / ours['matvec_floor_s']:.1f} tok/s "
          f"({1 / ours['matvec_floor_s'] / base['decode']:.2f}x the official fp32 decode)")
    return rows


if __name__ == "__main__":
    main()
