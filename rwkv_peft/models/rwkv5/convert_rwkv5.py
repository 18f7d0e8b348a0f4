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

from typing import Dict

import torch

from ..keymap import KeyMap, layer_count, require
from ..rwkv7.convert_rwkv7 import CheckpointError, detect_version
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
    require(sd, ("emb.weight", "blocks.0.att.time_decay", "blocks.0.att.time_faaaa", "blocks.0.ffn.key.weight"),
             f"{where}: RWKV-5.2 checkpoint")
    V, C = sd["emb.weight"].shape
    decay = sd["blocks.0.att.time_decay"]
    H, N = decay.shape
    if N < 2 or H * N != C:
        raise CheckpointError(f"{where}: 'blocks.0.att.time_decay' has shape {list(decay.shape)}; expected "
                              f"[H, N] with H * N = {C} (the width of 'emb.weight')")
    layers = layer_count(sd)
    return RWKV5Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
        use_initial_state="blocks.0.att.time_state" in sd,
    )


_BLOCK_ORDER = ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [
    "att." + n for n in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay", "time_faaaa",
                         "receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight",
                         "ln_x.weight", "ln_x.bias", "time_state")
] + ["ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"]


KEYMAP = KeyMap("RWKV-5.2", "rwkv_peft.models.rwkv5.modeling_rwkv5:RWKV5ForCausalLM", config_from_blinkdl,
                att_vec=_ATT_VEC, ffn_vec=_FFN_VEC, att_same=_SAME_ATT, ffn_same=_SAME_FFN, block_order=_BLOCK_ORDER)
blinkdl_to_hf, hf_to_blinkdl, load_blinkdl_model = KEYMAP.blinkdl_to_hf, KEYMAP.hf_to_blinkdl, KEYMAP.load_blinkdl_model
