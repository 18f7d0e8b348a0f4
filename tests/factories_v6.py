"""Tiny random RWKV-6 checkpoints in the official BlinkDL layout, and the official package (v6) as a subprocess."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.factories import draws, official_reference, rel_err  # noqa: F401  (rel_err re-exported for the v6 tests)

__all__ = ["make_blinkdl_v6", "official_reference_v6", "rel_err"]


def make_blinkdl_v6(vocab: int = 97, width: int = 128, layers: int = 2, head_size: int = 64,
                    mix_rank: int = 32, decay_rank: int = 64, dtype=torch.float32, seed: int = 0,
                    time_state: bool = False) -> dict:
    """Random weights of realistic range, in the shapes and key order the official v6 training code saves."""
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
        for name in ("x", "w", "k", "v", "r", "g"):
            sd[a + "time_maa_" + name] = uni(1, 1, C)
        sd[a + "time_maa_w1"] = rnd(C, 5 * mix_rank, scale=0.1)
        sd[a + "time_maa_w2"] = rnd(5, mix_rank, C, scale=0.1)
        sd[a + "time_decay"] = uni(1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "time_decay_w1"] = rnd(C, decay_rank, scale=0.1)
        sd[a + "time_decay_w2"] = rnd(decay_rank, C, scale=0.1)
        sd[a + "time_faaaa"] = rnd(H, N, scale=0.5)
        for name in ("receptance", "key", "value", "output", "gate"):
            sd[a + name + ".weight"] = rnd(C, C, scale=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = uni(C, lo=0.5, hi=1.0), rnd(C, scale=0.05)
        if time_state:
            sd[a + "time_state"] = rnd(H, N, N, scale=0.3)
        f = p + "ffn."
        sd[f + "time_maa_k"], sd[f + "time_maa_r"] = uni(1, 1, C), uni(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[f + "receptance.weight"] = rnd(C, C, scale=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, scale=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=C ** -0.5 * 3)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def official_reference_v6(pth: Path, requests: dict, out: Path) -> dict:
    """Run the official ``rwkv`` package (v6, cpu fp32) in a fresh process; see official_reference.py."""
    return official_reference(pth, requests, out, version="6")
