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
from typing import Dict

import torch

from ..keymap import KeyMap, layer_count, require
from ..rwkv7.convert_rwkv7 import CheckpointError, detect_version
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
    require(sd, ("emb.weight", "blocks.0.att.time_decay", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"),
             f"{where}: RWKV-4 checkpoint")
    V, C = sd["emb.weight"].shape
    decay, key = sd["blocks.0.att.time_decay"], sd["blocks.0.att.key.weight"]
    A = key.shape[0]
    if key.dim() != 2 or key.shape[1] != C or tuple(decay.shape) != (A,):
        raise CheckpointError(f"{where}: 'blocks.0.att.time_decay' has shape {list(decay.shape)} and "
                              f"'blocks.0.att.key.weight' {list(key.shape)}; expected [A] and [A, {C}] (C = "
                              f"the width of 'emb.weight')")
    layers = layer_count(sd)
    return RWKV4Config(vocab_size=V, hidden_size=C, num_hidden_layers=layers, attention_hidden_size=A,
                       intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0])


# the order of the official v4 training code's parameters (RWKV-LM v4neo: ln1, ln2, then ln0 in block 0)
_BLOCK_ORDER = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ln0.weight", "ln0.bias"] + [
    "att." + n for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r",
                         "key.weight", "value.weight", "receptance.weight", "output.weight")
] + ["ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"]


KEYMAP = KeyMap("RWKV-4", "rwkv_peft.models.rwkv4.modeling_rwkv4:RWKV4ForCausalLM", config_from_blinkdl,
                att_vec=_ATT_VEC, ffn_vec=_FFN_VEC, att_same=_SAME_ATT, ffn_same=_SAME_FFN, block_order=_BLOCK_ORDER)
blinkdl_to_hf, hf_to_blinkdl, load_blinkdl_model = KEYMAP.blinkdl_to_hf, KEYMAP.hf_to_blinkdl, KEYMAP.load_blinkdl_model
