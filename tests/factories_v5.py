"""Tiny random RWKV-5.2 checkpoints in the official BlinkDL layout, and the official package (v5.2) as a
subprocess."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.factories import draws, official_reference, rel_err  # noqa: F401  (rel_err re-exported for the v5 tests)

__all__ = ["make_blinkdl_v5", "official_reference_v5", "rel_err"]


def make_blinkdl_v5(vocab: int = 97, width: int = 128, layers: int = 2, head_size: int = 64,
                    dtype=torch.float32, seed: int = 0, time_state: bool = False) -> dict:
    """Random weights of realistic range, in the shapes of the official v5.2 training code (time_decay and
    time_faaaa [H, N], token mixes [1, 1, C]) and the key order ``convert_rwkv5`` writes."""
    g = torch.Generator().manual_seed(seed)
    C, H, N = width, width // head_size, head_size
    F = int(C * 3.5) // 32 * 32
    rnd, uni = draws(g)

    sd = {"emb.weight": rnd(vocab, C, scale=1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        a = p + "att."
        for name in ("k", "v", "r", "g"):
            sd[a + "time_mix_" + name] = uni(1, 1, C)
        sd[a + "time_decay"] = uni(H, N, lo=-6.0, hi=1.0)       # decays exp(-exp(.)) from ~1 down to ~0.07
        sd[a + "time_faaaa"] = rnd(H, N, scale=0.5)
        for name in ("receptance", "key", "value", "output", "gate"):
            sd[a + name + ".weight"] = rnd(C, C, scale=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = uni(C, lo=0.5, hi=1.0), rnd(C, scale=0.05)
        if time_state:
            sd[a + "time_state"] = rnd(H, N, N, scale=0.3)
        f = p + "ffn."
        sd[f + "time_mix_k"], sd[f + "time_mix_r"] = uni(1, 1, C), uni(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[f + "receptance.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, scale=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=C ** -0.5 * 3)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def official_reference_v5(pth: Path, requests: dict, out: Path) -> dict:
    """Run the official ``rwkv`` package (v5.2, cpu fp32) in a fresh process; see official_reference.py."""
    return official_reference(pth, requests, out, version="5.2")
