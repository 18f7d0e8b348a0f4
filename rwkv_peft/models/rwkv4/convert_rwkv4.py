"""RWKV-4 checkpoints: BlinkDL ``.pth`` <-> our Hugging Face keys.

Every mapping is a rename plus, for the token-mix vectors, a reshape: nothing is recomputed (the official package
forms ``-exp(time_decay)`` in fp32 at load; we keep ``time_decay`` as stored and form it in the forward), so a
``.pth -> HF -> .pth`` round trip gives back the same bytes (dtype, shape and values of every tensor).

BlinkDL key                                 shape        ours (``model.`` prefix unless noted)
emb.weight                                  [V, C]       emb.weight
blocks.0.ln0.{weight,bias}                  [C]          ln0.*
blocks.i.ln{1,2}.*                          [C]          blocks.i.ln{1,2}.*
blocks.i.att.time_decay                     [A]          blocks.i.att.time_decay          (w = -exp(time_decay))
blocks.i.att.time_first                     [A]          blocks.i.att.time_first          (u, used as it is)
blocks.i.att.time_mix_{k,v,r}               [1, 1, C]    blocks.i.att.time_mix_*          [C]
blocks.i.att.{key,value,receptance}.weight  [A, C]       same
blocks.i.att.output.weight                  [C, A]       same
blocks.i.ffn.time_mix_{k,r}                 [1, 1, C]    blocks.i.ffn.time_mix_*          [C]
blocks.i.ffn.{key,receptance,value}.weight: same ([F, C], [C, C], [C, F])
ln_out.*                                    [C]          ln_out.*
head.weight                                 [V, C]       head.weight (no prefix)

Sizes come from the tensors: C from ``emb.weight``, A from ``blocks.0.att.key.weight``, F from
``blocks.0.ffn.key.weight``, the layer count from the block indices. Variants of the v4 training code that the
official package does not run either (``ffnPre`` in block 0, ``pos_emb_x/y``, ``tiny_*`` attention) are refused
with the key that tells.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from ..rwkv7.convert_rwkv7 import CheckpointError, check_complete, detect_version
from .configuration_rwkv4 import RWKV4Config

StateDict = Dict[str, torch.Tensor]

_ATT_VEC = ("time_mix_k", "time_mix_v", "time_mix_r")
_FFN_VEC = ("time_mix_k", "time_mix_r")
_SAME_ATT = ("time_decay", "time_first", "key.weight", "value.weight", "receptance.weight", "output.weight")
_SAME_FFN = ("key.weight", "receptance.weight", "value.weight")


def config_from_blinkdl(sd: StateDict, where: str = "checkpoint") -> RWKV4Config:
    """Read every size from the tensors: nothing is typed by hand."""
    try:
        version = detect_version(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if version != "4":
        raise CheckpointError(f"{where}: RWKV-{version} checkpoint; this converter handles RWKV-4 only")
    for k in sd:
        if re.match(r"blocks\.\d+\.(ffnPre\.|pos_emb|tiny_)", k):
            raise CheckpointError(f"{where}: key '{k}' belongs to a variant of the RWKV-4 training code "
                                  f"(ffnPre / pos_emb / tiny attention) that is not supported")
    _require(sd, ("emb.weight", "blocks.0.att.time_decay", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"),
             f"{where}: RWKV-4 checkpoint")
    V, C = sd["emb.weight"].shape
    decay, key = sd["blocks.0.att.time_decay"], sd["blocks.0.att.key.weight"]
    A = key.shape[0]
    if key.dim() != 2 or key.shape[1] != C or tuple(decay.shape) != (A,):
        raise CheckpointError(f"{where}: 'blocks.0.att.time_decay' has shape {list(decay.shape)} and "
                              f"'blocks.0.att.key.weight' {list(key.shape)}; expected [A] and [A, {C}] (C = "
                              f"the width of 'emb.weight')")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return RWKV4Config(vocab_size=V, hidden_size=C, num_hidden_layers=layers, attention_hidden_size=A,
                       intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0])


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
    part, _, name = rest.partition(".")
    if part == "ffn" and name in _FFN_VEC or part == "att" and name in _ATT_VEC:
        return p + rest, "flatten"
    if part == "ffn" and name in _SAME_FFN or part == "att" and name in _SAME_ATT:
        return p + rest, "same"
    raise KeyError(key)


def blinkdl_to_hf(sd: StateDict, where: str = "checkpoint") -> Tuple[RWKV4Config, StateDict]:
    config = config_from_blinkdl(sd, where)
    out: StateDict = {}
    for key, t in sd.items():
        try:
            new, how = blinkdl_key_to_hf(key)
        except KeyError:
            raise CheckpointError(f"{where}: unexpected key '{key}' (not part of an RWKV-4 checkpoint "
                                  f"this converter knows)") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: key '{key}' holds a {type(t).__name__}, not a tensor")
        out[new] = t.reshape(-1) if how == "flatten" else t
    from .modeling_rwkv4 import RWKV4ForCausalLM
    check_complete(out, config, where, RWKV4ForCausalLM)
    return config, {k: v.contiguous() for k, v in out.items()}


def hf_to_blinkdl(sd: StateDict, config: RWKV4Config) -> StateDict:
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
                raise CheckpointError(f"unexpected key '{key}' in the model's RWKV-4 state dict")
            i, part, name = m.groups()
            p = f"blocks.{i}.{part}."
            if (part == "att" and name in _ATT_VEC) or (part == "ffn" and name in _FFN_VEC):
                out[p + name] = t.reshape(1, 1, C)
            else:
                out[p + name] = t
    return {k: out[k].contiguous() for k in sorted(out, key=_official_order)}


# the order of the official v4 training code's parameters (RWKV-LM v4neo: ln1, ln2, then ln0 in block 0)
_BLOCK_ORDER = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ln0.weight", "ln0.bias"] + [
    "att." + n for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r",
                         "key.weight", "value.weight", "receptance.weight", "output.weight")
] + ["ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"]


def _official_order(key: str):
    if key == "emb.weight":
        return (0, 0, 0)
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return (1, int(i), _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else len(_BLOCK_ORDER))
    return (2, 0, int(key.endswith("bias"))) if key.startswith("ln_out") else (3, 0, 0)


def load_blinkdl_model(sd: StateDict, where: str = "checkpoint", dtype=None):
    """A ``RWKV4ForCausalLM`` holding the tensors of a BlinkDL state dict (for tests and scripts)."""
    from .modeling_rwkv4 import RWKV4ForCausalLM
    config, hf = blinkdl_to_hf(sd, where)
    with torch.device("meta"):
        model = RWKV4ForCausalLM(config)
    model.load_state_dict(hf, assign=True, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
