"""Tiny random RWKV-7 checkpoints in the official BlinkDL layout, and the official package (any version) as a
subprocess; the helpers the per-version factories (factories_v4/v5/v6.py) share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rwkv_peft.models.rwkv7.configuration_rwkv7 import default_low_rank

REFERENCE_SCRIPT = Path(__file__).with_name("official_reference.py")


def draws(g: torch.Generator):
    """(rnd, uni) drawing from ``g``: normal ``* scale + mean`` and uniform in [lo, hi)."""

    def rnd(*shape, scale=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * scale + mean

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    return rnd, uni


def make_blinkdl_v7(vocab: int = 97, width: int = 128, layers: int = 2, head_size: int = 64,
                    dtype=torch.float32, seed: int = 0, time_state: bool = False, deep_embed: int = 0) -> dict:
    """Random weights of realistic range, in the shapes and key order the official training code saves.
    ``deep_embed`` (R > 0): the DeepEmbed variant's per-layer tables and maps, R x R per token."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, F = width, width // head_size, head_size, 4 * width
    Dw, Da, Dv, Dg = (default_low_rank(C, 1.8, 0.5), default_low_rank(C, 1.8, 0.5),
                      default_low_rank(C, 1.3, 0.5), default_low_rank(C, 0.6, 0.8))
    rnd, uni = draws(g)

    sd = {"emb.weight": rnd(vocab, C, scale=1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = uni(1, 1, C)
        sd[a + "w0"] = uni(1, 1, C, lo=-6.0, hi=1.0)
        sd[a + "w1"], sd[a + "w2"] = rnd(C, Dw, scale=0.1), rnd(Dw, C, scale=0.1)
        sd[a + "a0"] = rnd(1, 1, C, scale=0.5)
        sd[a + "a1"], sd[a + "a2"] = rnd(C, Da, scale=0.1), rnd(Da, C, scale=0.1)
        sd[a + "v0"] = rnd(1, 1, C, scale=0.5, mean=0.5)
        sd[a + "v1"], sd[a + "v2"] = rnd(C, Dv, scale=0.1), rnd(Dv, C, scale=0.1)
        sd[a + "g1"], sd[a + "g2"] = rnd(C, Dg, scale=0.1), rnd(Dg, C, scale=0.1)
        sd[a + "k_k"] = uni(1, 1, C, lo=0.6, hi=1.0)
        sd[a + "k_a"] = uni(1, 1, C, lo=0.8, hi=1.2)
        sd[a + "r_k"] = rnd(H, N, scale=0.1)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = rnd(C, C, scale=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = uni(C, lo=0.5, hi=1.0), rnd(C, scale=0.05)
        if time_state:
            sd[a + "time_state"] = rnd(H, N, N, scale=0.3)
        f = p + "ffn."
        sd[f + "x_k"] = uni(1, 1, C)
        sd[f + "key.weight"] = rnd(F, C, scale=C ** -0.5)
        sd[f + "value.weight"] = rnd(C, F, scale=F ** -0.5)
        if deep_embed:
            R = deep_embed
            sd[f + "s_emb.weight"] = rnd(vocab, R * R, scale=R ** -0.5)
            sd[f + "s_emb_x.weight"] = rnd(R * R, C, scale=0.3 * C ** -0.5)
            sd[f + "s1"], sd[f + "s2"] = rnd(C, R, scale=C ** -0.5), rnd(R, F, scale=0.3 * R ** -0.5)
            sd[f + "s0"] = rnd(F, scale=0.1, mean=1.0)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(vocab, C, scale=C ** -0.5 * 3)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def official_reference(pth: Path, requests: dict, out: Path, deep_embed: bool = False, version: str = "7") -> dict:
    """Run the official ``rwkv`` package (cpu fp32) in a fresh process on a checkpoint of RWKV-``version`` (as
    ``detect_blinkdl_version`` names it: "7", "6", "5.2", "4"); see official_reference.py.
    ``deep_embed``: as a DeepEmbed model (``RWKV_DE_VERSION=1``, read when the package is imported; v7 only)."""
    req = out.with_suffix(".json")
    req.write_text(json.dumps({"model": str(pth), "out": str(out), "version": version, **requests}))
    env = {**os.environ, "RWKV_V7_ON": "1" if version == "7" else "0", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"}
    env.pop("RWKV_DE_VERSION", None)
    if deep_embed:
        env["RWKV_DE_VERSION"] = "1"
    proc = subprocess.run([sys.executable, str(REFERENCE_SCRIPT), str(req)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"official package failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (the measure the tests hold to 1e-5 in fp32)."""
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
