"""RWKV-6 checkpoints: BlinkDL ``.pth`` <-> our Hugging Face keys.

Every mapping is a rename plus, for some tensors, a transpose or a reshape: nothing is recomputed, so a
``.pth -> HF -> .pth`` round trip gives back the same bytes (dtype, shape and values of every tensor).

BlinkDL key                                 shape        ours (``model.`` prefix unless noted)
emb.weight                                  [V, C]       emb.weight
blocks.0.ln0.{weight,bias}                  [C]          ln0.*
blocks.i.ln{1,2}.*                          [C]          blocks.i.ln{1,2}.*
blocks.i.att.time_maa_{x,w,k,v,r,g}         [1, 1, C]    blocks.i.att.time_maa_*          [C]
blocks.i.att.time_maa_w1                    [C, 5 D]     blocks.i.att.maa_lora.down.weight [5 D, C] (transposed)
blocks.i.att.time_maa_w2                    [5, D, C]    blocks.i.att.maa_lora.up          (same)
blocks.i.att.time_decay                     [1, 1, C]    blocks.i.att.time_decay          [C]
blocks.i.att.time_decay_w1                  [C, Dd]      blocks.i.att.decay_lora.down.weight [Dd, C] (transposed)
blocks.i.att.time_decay_w2                  [Dd, C]      blocks.i.att.decay_lora.up.weight   [C, Dd] (transposed)
blocks.i.att.time_faaaa                     [H, N]       blocks.i.att.time_faaaa
blocks.i.att.{receptance,key,value,output,gate}.weight, ln_x.*: same
blocks.i.att.time_state                     [H, N, N]    blocks.i.att.time_state (a merged initial state, optional)
blocks.i.ffn.time_maa_{k,r}                 [1, 1, C]    blocks.i.ffn.time_maa_*          [C]
blocks.i.ffn.{key,receptance,value}.weight: same
ln_out.*                                    [C]          ln_out.*
head.weight                                 [V, C]       head.weight (no prefix)
"""
from __future__ import annotations

from typing import Dict

import torch

from ..keymap import KeyMap, layer_count, require
from ..rwkv7.convert_rwkv7 import CheckpointError, detect_version
from .configuration_rwkv6 import RWKV6Config

StateDict = Dict[str, torch.Tensor]

_ATT_VEC = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_decay")
_FFN_VEC = ("time_maa_k", "time_maa_r")
_TRANSPOSED = {"time_maa_w1": "maa_lora.down.weight", "time_decay_w1": "decay_lora.down.weight",
               "time_decay_w2": "decay_lora.up.weight"}
_RENAMED = {"time_maa_w2": "maa_lora.up"}
_SAME_ATT = ("time_faaaa", "receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight",
             "ln_x.weight", "ln_x.bias", "time_state")
_SAME_FFN = ("key.weight", "receptance.weight", "value.weight")


def config_from_blinkdl(sd: StateDict, where: str = "checkpoint") -> RWKV6Config:
    """Read every size from the tensors: nothing is typed by hand."""
    try:
        version = detect_version(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if version != "6":
        raise CheckpointError(f"{where}: RWKV-{version} checkpoint; this converter handles RWKV-6 only")
    require(sd, ("emb.weight", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w2", "blocks.0.att.time_decay_w1",
                  "blocks.0.ffn.key.weight"), f"{where}: RWKV-6 checkpoint")
    V, C = sd["emb.weight"].shape
    faaaa = sd["blocks.0.att.time_faaaa"]
    if faaaa.dim() != 2:
        raise CheckpointError(f"{where}: 'blocks.0.att.time_faaaa' has shape {list(faaaa.shape)}; expected [H, N]")
    H, N = faaaa.shape
    maa_w2 = sd["blocks.0.att.time_maa_w2"]
    if maa_w2.dim() != 3 or maa_w2.shape[0] != 5:
        raise CheckpointError(f"{where}: 'blocks.0.att.time_maa_w2' has shape {list(maa_w2.shape)}; expected [5, D, C]")
    layers = layer_count(sd)
    return RWKV6Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
        mix_low_rank=maa_w2.shape[1], decay_low_rank=sd["blocks.0.att.time_decay_w1"].shape[1],
        use_initial_state="blocks.0.att.time_state" in sd,
    )


_BLOCK_ORDER = ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [
    "att." + n for n in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g",
                         "time_maa_w1", "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa",
                         "receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight",
                         "ln_x.weight", "ln_x.bias", "time_state")
] + ["ffn.time_maa_k", "ffn.time_maa_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"]


KEYMAP = KeyMap("RWKV-6", "rwkv_peft.models.rwkv6.modeling_rwkv6:RWKV6ForCausalLM", config_from_blinkdl,
                att_vec=_ATT_VEC, ffn_vec=_FFN_VEC, att_same=_SAME_ATT, ffn_same=_SAME_FFN, block_order=_BLOCK_ORDER,
                att_transposed=_TRANSPOSED, att_renamed=_RENAMED)
blinkdl_to_hf, hf_to_blinkdl, load_blinkdl_model = KEYMAP.blinkdl_to_hf, KEYMAP.hf_to_blinkdl, KEYMAP.load_blinkdl_model
