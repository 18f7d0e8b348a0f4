"""Real tokens per second of training steps on short dialogues: padded rows against packed rows (with resets).

A persona recipe trains on short dialogues (tens to a few hundred tokens). Padded, each micro-batch is as long as
its longest dialogue and the rest is padding; packed (``data.pack: true``, ``pack_state: reset``), rows of
``--max-length`` tokens hold several dialogues, each starting from the initial state (``position_ids``). Both
run the training path's model call (``return_logits=False``: chunked loss, forward + backward) on the same
dialogues, in the same order, with the same number of real tokens; the table gives real (non-padding) tokens per
second, the padding fraction and the ratio.

Usage:
  python scripts/bench_packing.py                                    # tiny shape, CPU-sized
  python scripts/bench_packing.py --layers 24 --width 2048 --max-length 4096 --samples 512 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def dialogue_lengths(n: int, low: int, high: int, seed: int):
    """Lengths of ``n`` dialogues, log-uniform in [low, high] (most are short, a few long)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    return [int(round(low * (high / low) ** float(x))) for x in u]


def padded_batches(lengths, batch_size: int):
    """Micro-batches of ``batch_size`` dialogues, right-padded to the longest: lists of (B, T, real tokens)."""
    out = []
    for i in range(0, len(lengths), batch_size):
        part = lengths[i:i + batch_size]
        out.append((len(part), max(part), sum(part)))
    return out


def packed_batches(lengths, batch_size: int, max_length: int):
    """Rows of at most ``max_length`` tokens (greedy, in order), ``batch_size`` rows per micro-batch: lists of
    (row sample lengths per row)."""
    rows, cur = [], []
    for n in lengths:
        if cur and sum(cur) + n > max_length:
            rows.append(cur)
            cur = []
        cur.append(n)
    if cur:
        rows.append(cur)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def make_model(args):
    from rwkv_peft.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    cfg = RWKV7Config(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                      head_size=args.head_size)
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(cfg).to(args.device, getattr(torch, args.dtype))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def step(model, ids, pos, targets):
    out = model(input_ids=ids, position_ids=pos, shift_labels=targets, num_items_in_batch=1, return_logits=False)
    out.loss.backward()


def run_padded(model, batches, args):
    tokens, start = 0, time.perf_counter()
    for B, T, real in batches:
        ids = torch.randint(1, args.vocab, (B, T), device=args.device)
        targets = ids.clone()
        step(model, ids, None, targets)
        tokens += real
    _sync(args.device)
    return tokens / (time.perf_counter() - start)


def run_packed(model, batches, args):
    tokens, start = 0, time.perf_counter()
    for rows in batches:
        T = max(sum(r) for r in rows)
        ids = torch.randint(1, args.vocab, (len(rows), T), device=args.device)
        pos = torch.arange(1, T + 1, device=args.device).repeat(len(rows), 1)
        for b, r in enumerate(rows):
            t = 0
            for n in r:
                pos[b, t:t + n] = torch.arange(n, device=args.device)
                t += n
        step(model, ids, pos, ids.clone())
        tokens += sum(map(sum, rows))
    _sync(args.device)
    return tokens / (time.perf_counter() - start)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--samples", type=int, default=96, help="dialogues per pass")
    p.add_argument("--low", type=int, default=24, help="shortest dialogue (tokens)")
    p.add_argument("--high", type=int, default=512, help="longest dialogue (tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="dialogues per padded micro-batch")
    p.add_argument("--packed-rows", type=int, default=1, help="rows per packed micro-batch")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    lengths = dialogue_lengths(args.samples, args.low, args.high, seed=0)
    padded = padded_batches(lengths, args.batch_size)
    packed = packed_batches(lengths, args.packed_rows, args.max_length)
    pad_frac = 1 - sum(lengths) / sum(B * T for B, T, _ in padded)
    packed_frac = 1 - sum(lengths) / sum(len(r) * max(sum(x) for x in r) for r in packed)
    model = make_model(args)
    run_packed(model, packed[:1], args)  # warm-up (kernels, allocator)
    run_padded(model, padded[:1], args)
    rates = {"padded": [], "packed": []}
    for _ in range(args.repeats):
        rates["padded"].append(run_padded(model, padded, args))
        rates["packed"].append(run_packed(model, packed, args))
        model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"shape L{args.layers} C{args.width} V{args.vocab} {args.dtype} on {args.device}; {args.samples} dialogues of "
          f"{args.low}-{args.high} tokens ({sum(lengths)} real tokens)")
    print(f"{'layout':<8} {'micro-batches':>13} {'padding':>8} {'real tok/s (median)':>20}")
    print(f"{'padded':<8} {len(padded):>13} {pad_frac:>8.1%} {med['padded']:>20.0f}")
    print(f"{'packed':<8} {len(packed):>13} {packed_frac:>8.1%} {med['packed']:>20.0f}")
    print(f"packed / padded: {med['packed'] / med['padded']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rates": rates, "median": med, "padding": pad_frac,
                       "packed_padding": packed_frac}, f, indent=2)


if __name__ == "__main__":
    main()
