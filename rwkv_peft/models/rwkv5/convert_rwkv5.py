"""RWKV-5.2 checkpoints: BlinkDL ``.pth`` <-> our Hugging Face keys.

Every mapping is a rename plus, for the token-mix vectors, a reshape: nothing is recomputed, so a
``.pth -> HF -> .pth`` round trip gives back the same bytes (dtype, shape and values of every tensor).

BlinkDL key                                 shape        ours (``model.`` prefix unless noted)
emb.weight                                  [V, C]       emb.weight
blocks.0.ln0.{weight,bias}                  [C]          ln0.*
blocks.i.ln{1,2}.*                          [C]          blocks.i.ln{1,2}.*
blocks.i.att.time_mix_{k,v,r,g}             [1, 1, C]    blocks.i.att.time_mix_*          [C]
blocks.i.att.time_decay                     [H, N]       blocks.i.att.time_decay          (same; 2-D marks v5.2)
blocks.i.att.time_faaaa                     [H, N]       blocks.i.att.time_faaaa
blocks.i.att.{receptance,key,value,output,gate}.weight, ln_x.*: same
blocks.i.att.time_state                     [H, N, N]    blocks.i.att.time_state (a merged initial state, optional)
blocks.i.ffn.time_mix_{k,r}                 [1, 1, C]    blocks.i.ffn.time_mix_*          [C]
blocks.i.ffn.{key,receptance,value}.weight: same
ln_out.*                                    [C]          ln_out.*
head.weight                                 [V, C]       head.weight (no prefix)

Only RWKV-5.2 is read: RWKV-5.0 / 5.1 (a per-head decay ``[H]``, or no gate) and checkpoints that store
``time_first`` (``u = exp(time_first)``) instead of ``time_faaaa`` are refused with the key that tells.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from ..rwkv7.convert_rwkv7 import CheckpointError, check_complete, detect_version
from .configuration_rwkv5 import RWKV5Config

StateDict = Dict[str, torch.Tensor]

_ATT_VEC = ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g")
_FFN_VEC = ("time_mix_k", "time_mix_r")
_SAME_ATT = ("time_decay", "time_faaaa", "receptance.weight", "key.weight", "value.weight", "output.weight",
             "gate.weight", "ln_x.weight", "ln_x.bias", "time_state")
_SAME_FFN = ("key.weight", "receptance.weight", "value.weight")


def config_from_blinkdl(sd: StateDict, where: str = "checkpoint") -> RWKV5Config:
    """Read every size from the tensors: nothing is typed by hand."""
    try:
        version = detect_version(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if version != "5.2":
        raise CheckpointError(f"{where}: RWKV-{version} checkpoint; this converter handles RWKV-5.2 only")
    if "blocks.0.att.time_first" in sd and "blocks.0.att.time_faaaa" not in sd:
        raise CheckpointError(f"{where}: 'blocks.0.att.time_first' (u = exp(time_first)) found; only RWKV-5.2 "
                              f"checkpoints with 'time_faaaa' are supported")
    _require(sd, ("emb.weight", "blocks.0.att.time_decay", "blocks.0.att.time_faaaa", "blocks.0.ffn.key.weight"),
             f"{where}: RWKV-5.2 checkpoint")
    V, C = sd["emb.weight"].shape
    decay = sd["blocks.0.att.time_decay"]
    H, N = decay.shape
    if N < 2 or H * N != C:
        raise CheckpointError(f"{where}: 'blocks.0.att.time_decay' has shape {list(decay.shape)}; expected "
                              f"[H, N] with H * N = {C} (the width of 'emb.weight')")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return RWKV5Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
        use_initial_state="blocks.0.att.time_state" in sd,
    )


def _require(sd: StateDict, keys, where: str):
    for k in keys:
        if k not in sd:
            raise CheckpointError(f"{where}: missing key '{k}'")


def blinkdl_key_to_hf(key: str) -> Tuple[str, str]:
    """(our key, how the tensor changes: 'same' | 'flatten')."""
    if key == "emb.weight":
        return "model.emb.weight", "same"
    if key == "head.weight":
        return "head.weight", "same"
    if key in ("ln_out.weight", "ln_out.bias"):
        return "model." + key, "same"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(key)
    i, rest = m.group(1), m.group(2)
    p = f"model.blocks.{i}."
    if rest in ("ln0.weight", "ln0.bias") and i == "0":
        return "model." + rest, "same"
    if re.fullmatch(r"ln[12]\.(weight|bias)", rest):
        return p + rest, "same"
    if rest.startswith("ffn."):
        name = rest[4:]
        if name in _FFN_VEC:
            return p + rest, "flatten"
        if name in _SAME_FFN:
            return p + rest, "same"
    if rest.startswith("att."):
        name = rest[4:]
        if name in _ATT_VEC:
            return p + rest, "flatten"
        if name in _SAME_ATT:
            return p + rest, "same"
    raise KeyError(key)


def blinkdl_to_hf(sd: StateDict, where: str = "checkpoint") -> Tuple[RWKV5Config, StateDict]:
    config = config_from_blinkdl(sd, where)
    out: StateDict = {}
    for key, t in sd.items():
        try:
            new, how = blinkdl_key_to_hf(key)
        except KeyError:
            raise CheckpointError(f"{where}: unexpected key '{key}' (not part of an RWKV-5.2 checkpoint "
                                  f"this converter knows)") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: key '{key}' holds a {type(t).__name__}, not a tensor")
        out[new] = t.reshape(-1) if how == "flatten" else t
    from .modeling_rwkv5 import RWKV5ForCausalLM
    check_complete(out, config, where, RWKV5ForCausalLM)
    return config, {k: v.contiguous() for k, v in out.items()}


def hf_to_blinkdl(sd: StateDict, config: RWKV5Config) -> StateDict:
    """Our state dict -> BlinkDL keys and shapes (the exact inverse of ``blinkdl_to_hf``)."""
    C = config.hidden_size
    out: StateDict = {}
    for key, t in sd.items():
        if key == "model.emb.weight":
            out["emb.weight"] = t
        elif key == "head.weight":
            out["head.weight"] = t
        elif key in ("model.ln_out.weight", "model.ln_out.bias"):
            out[key[len("model."):]] = t
        elif key in ("model.ln0.weight", "model.ln0.bias"):
            out["blocks.0." + key[len("model."):]] = t
        else:
            m = re.fullmatch(r"model\.blocks\.(\d+)\.(att|ffn|ln1|ln2)\.(.+)", key)
            if not m:
                raise CheckpointError(f"unexpected key '{key}' in the model's RWKV-5.2 state dict")
            i, part, name = m.groups()
            p = f"blocks.{i}.{part}."
            if (part == "att" and name in _ATT_VEC) or (part == "ffn" and name in _FFN_VEC):
                out[p + name] = t.reshape(1, 1, C)
            else:
                out[p + name] = t
    return {k: out[k].contiguous() for k in sorted(out, key=_official_order)}


_BLOCK_ORDER = ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [
    "att." + n for n in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay", "time_faaaa",
                         "receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight",
                         "ln_x.weight", "ln_x.bias", "time_state")
] + ["ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"]


def _official_order(key: str):
    """The order of the official v5 training code's parameters (ln0 first within block 0, as for RWKV-6)."""
    if key == "emb.weight":
        return (0, 0, 0)
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return (1, int(i), _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else len(_BLOCK_ORDER))
    return (2, 0, int(key.endswith("bias"))) if key.startswith("ln_out") else (3, 0, 0)


def load_blinkdl_model(sd: StateDict, where: str = "checkpoint", dtype=None):
    """A ``RWKV5ForCausalLM`` holding the tensors of a BlinkDL state dict (for tests and scripts)."""
    from .modeling_rwkv5 import RWKV5ForCausalLM
    config, hf = blinkdl_to_hf(sd, where)
    with torch.device("meta"):
        model = RWKV5ForCausalLM(config)
    model.load_state_dict(hf, assign=True, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
