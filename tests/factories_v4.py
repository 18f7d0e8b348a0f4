"""Tiny random RWKV-4 checkpoints in the official BlinkDL layout, and the official package (v4) as a subprocess."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.factories import draws, official_reference, rel_err  # noqa: F401  (rel_err re-exported for the v4 tests)

__all__ = ["make_blinkdl_v4", "official_reference_v4", "rel_err"]


def make_blinkdl_v4(vocab: int = 97, width: int = 64, layers: int = 2, att_width: int | None = None,
                    dtype=torch.float32, seed: int = 0) -> dict:
    """Random weights of realistic range, in the shapes and key order of the official v4 training code
    (RWKV-LM v4neo: ln1, ln2, ln0; time_decay, time_first, token mixes [1, 1, C], key, value, receptance, output;
    the channel mix's token mixes, key, receptance, value). ``att_width``: the WKV channels A (default C)."""
    g = torch.Generator().manual_seed(seed)
    C, A, F = width, att_width or width, 4 * width
    rnd, uni = draws(g)

    sd = {"emb.weight": rnd(vocab, C, scale=1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        a = p + "att."
        sd[a + "time_decay"] = uni(A, lo=-5.0, hi=3.0)      # w = -exp(.) from -0.007 (slow) to -20 (fast)
        sd[a + "time_first"] = rnd(A, scale=0.5, mean=-1.2)  # around log(0.3), as the official init
        for name in ("k", "v", "r"):
            sd[a + "time_mix_" + name] = uni(1, 1, C)
        for name in ("key", "value", "receptance"):
            sd[a + name + ".weight"] = rnd(A, C, scale=C ** -0.5 * (2.0 if name == "key" else 1.0))
        sd[a + "output.weight"] = rnd(C, A, scale=A ** -0.5)
        f = p + "ffn."
        sd[f + "time_mix_k"], sd[f + "time_mix_r"] = uni(1, 1, C), uni(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[f + "receptance.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, scale=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=C ** -0.5 * 3)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def official_reference_v4(pth: Path, requests: dict, out: Path) -> dict:
    """Run the official ``rwkv`` package (v4, cpu fp32) in a fresh process; see official_reference.py."""
    return official_reference(pth, requests, out, version="4")
