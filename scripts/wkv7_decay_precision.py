#!/usr/bin/env python
"""Which precision the WKV-7 log decay needs when the other inputs are bf16: a measurement in float64 on the CPU.

For each family of decays, inputs are drawn as the model makes them (``a = -kk``, ``b = kk * gate``, kk unit-norm
per head; r, k, v normal) and the recurrence is computed in float64 three times:

- reference: every input exact;
- "the bf16 band": r, k, v, a, b rounded to bf16, the log decay w exact (what a kernel with an fp32 decay sees);
- "bf16 decay": all six rounded to bf16.

Reported: the relative RMS error of the outputs (all positions, and the last quarter of the sequence, where a
rounded decay has compounded longest) and of the final state, against the reference. The decay can go to bf16
where the third row stays within the second's band.

    python scripts/wkv7_decay_precision.py --T 4096 --json decay_precision.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# log decay w = log(d) families: the model's range is w in [-exp(-0.5), 0], i.e. decays d in [0.545, 1]
FAMILIES = {
    "model range": lambda u: -math.exp(-0.5) * u,                          # d in [0.545, 1], uniform in w
    "near 1 (long memory)": lambda u: -10 ** (-6 + 4 * u),                 # w in [-1e-2, -1e-6]: d > 0.99
    "near the model's lowest": lambda u: -math.exp(-0.5) * (0.9 + 0.1 * u),  # d in [0.545, 0.58]
    "wide (d down to 2e-9)": lambda u: -torch.exp(-8 + 11 * u),            # the kernel tests' range
}
# a family drawn once per channel and held over time (a trained model's decays are mostly its w0, so a rounding
# of w repeats at every step and compounds, where per-token draws round up and down at random)
CONSTANT = ("near 1 (long memory)", "model range")


def draw(B, T, H, N, family, seed=0, constant=False):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    u = torch.rand(B, 1 if constant else T, H, N, generator=g, dtype=torch.float64).expand(B, T, H, N)
    w = FAMILIES[family](u)
    w = w if torch.is_tensor(w) else torch.full_like(u, w)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    return [r, w, k, v, -kk, kk * gate]


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float64)


def rel_rms(x, ref):
    return float((x - ref).norm() / ref.norm())


def measure(B, T, H, N, family, constant=False):
    from rwkv_peft.ops.wkv7 import wkv7_chunked
    x = draw(B, T, H, N, family, constant=constant)
    ref_o, ref_s = wkv7_chunked(*x)
    rows = {}
    for name, xs in (("bf16 band (w exact)", [bf16(t) if i != 1 else t for i, t in enumerate(x)]),
                     ("bf16 decay", [bf16(t) for t in x])):
        o, s = wkv7_chunked(*xs)
        q = T - T // 4
        rows[name] = {"out": rel_rms(o, ref_o), "out_last_quarter": rel_rms(o[:, q:], ref_o[:, q:]),
                      "final_state": rel_rms(s, ref_s)}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    print(f"WKV-7 in float64, B=1 T={args.T} H={args.H} N={args.N}; relative RMS error against exact inputs")
    print(f"{'decays (drawn per token unless said)':<40}{'inputs':<22}{'outputs':>10}{'last 1/4':>10}{'final S':>10}")
    cases = [(f, False) for f in FAMILIES] + [(f, True) for f in CONSTANT]
    for family, constant in cases:
        label = family + (", per channel" if constant else "")
        results[label] = measure(1, args.T, args.H, args.N, family, constant)
        for name, r in results[label].items():
            print(f"{label:<40}{name:<22}{r['out']:>10.2e}{r['out_last_quarter']:>10.2e}{r['final_state']:>10.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
