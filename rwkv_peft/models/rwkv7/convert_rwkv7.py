"""RWKV-7 checkpoints: BlinkDL ``.pth`` <-> our Hugging Face keys, and flash-linear-attention's HF keys -> ours.

Every mapping here is a rename plus, for some tensors, a transpose or a reshape: nothing is recomputed, so a
``.pth -> HF -> .pth`` round trip gives back the same bytes (dtype, shape and values of every tensor).

BlinkDL key                      shape        ours (``model.`` prefix unless noted)
emb.weight                       [V, C]       emb.weight
blocks.0.ln0.{weight,bias}       [C]          ln0.*
blocks.i.ln{1,2}.*               [C]          blocks.i.ln{1,2}.*
blocks.i.att.x_{r,w,k,v,a,g}     [1, 1, C]    blocks.i.att.x_*        [C]
blocks.i.att.{w0,a0,v0,k_k,k_a}  [1, 1, C]    blocks.i.att.*          [C]
blocks.i.att.{w,a,v,g}1          [C, D]       blocks.i.att.{w,a,v,g}_lora.down.weight  [D, C] (transposed)
blocks.i.att.{w,a,v,g}2          [D, C]       blocks.i.att.{w,a,v,g}_lora.up.weight    [C, D] (transposed)
blocks.i.att.r_k                 [H, N]       blocks.i.att.r_k
blocks.i.att.{receptance,key,value,output}.weight, ln_x.*, ffn.key.weight, ffn.value.weight: same
blocks.i.ffn.x_k                 [1, 1, C]    blocks.i.ffn.x_k        [C]
blocks.i.att.time_state          [H, N, N]    blocks.i.att.time_state (a merged initial state, optional)
ln_out.*                         [C]          ln_out.*
head.weight                      [V, C]       head.weight (no prefix)
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from ...errors import CheckpointError  # noqa: F401 (imported from here too)
from ..keymap import KeyMap, check_complete as _check_complete, layer_count, require
from .configuration_rwkv7 import RWKV7Config

StateDict = Dict[str, torch.Tensor]


_VEC = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
_SAME_ATT = ("r_k", "receptance.weight", "key.weight", "value.weight", "output.weight",
             "ln_x.weight", "ln_x.bias", "time_state")


def detect_version(sd: StateDict) -> str:
    """RWKV architecture version of a BlinkDL state dict, from its keys (as the official package does)."""
    keys = set(sd)
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        return "7"
    if "blocks.0.att.time_maa_x" in keys:
        return "6"
    if "blocks.0.att.ln_x.weight" in keys:
        decay = sd.get("blocks.0.att.time_decay")
        if decay is not None and decay.dim() == 2:
            return "5.2"
        return "5.1" if "blocks.0.att.gate.weight" in keys else "5"
    if "blocks.0.att.time_first" in keys:
        return "4"
    raise CheckpointError("no RWKV block keys found (expected e.g. 'blocks.0.att.r_k' for RWKV-7)")


def config_from_blinkdl(sd: StateDict, where: str = "checkpoint") -> RWKV7Config:
    """Read every size from the tensors: nothing is typed by hand."""
    version = detect_version(sd)
    if version != "7":
        raise CheckpointError(f"{where}: RWKV-{version} checkpoint; this converter handles RWKV-7 only")
    require(sd, ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.v1",
                  "blocks.0.att.g1", "blocks.0.ffn.key.weight"), where)
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    layers = layer_count(sd)
    return RWKV7Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
        decay_low_rank=sd["blocks.0.att.w1"].shape[1], a_low_rank=sd["blocks.0.att.a1"].shape[1],
        v_low_rank=sd["blocks.0.att.v1"].shape[1], gate_low_rank=sd["blocks.0.att.g1"].shape[1],
        use_initial_state="blocks.0.att.time_state" in sd,
        deep_embed_rank=sd["blocks.0.ffn.s1"].shape[-1] if "blocks.0.ffn.s1" in sd else 0,
    )


DEEP_EMBED = ("ffn.s_emb.weight", "ffn.s_emb_x.weight", "ffn.s1", "ffn.s2", "ffn.s0")  # DeepEmbed variant


_BLOCK_ORDER = ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [
    "att." + n for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1",
                         "v2", "g1", "g2", "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight",
                         "output.weight", "ln_x.weight", "ln_x.bias", "time_state")
] + ["ffn.x_k", "ffn.key.weight", "ffn.value.weight", *DEEP_EMBED]



KEYMAP = KeyMap("RWKV-7", "rwkv_peft.models.rwkv7.modeling_rwkv7:RWKV7ForCausalLM", config_from_blinkdl,
                att_vec=_VEC, ffn_vec=("x_k",), att_same=_SAME_ATT,
                ffn_same=("key.weight", "value.weight") + tuple(d[len("ffn."):] for d in DEEP_EMBED),
                block_order=_BLOCK_ORDER,
                att_transposed={f"{x}{i}": f"{_LORA[x]}.{'down' if i == 1 else 'up'}.weight" for x in _LORA
                                for i in (1, 2)})
blinkdl_to_hf, hf_to_blinkdl, load_blinkdl_model = KEYMAP.blinkdl_to_hf, KEYMAP.hf_to_blinkdl, KEYMAP.load_blinkdl_model


def check_complete(sd: StateDict, config, where: str, model_class=None) -> None:
    """Every tensor the model (RWKV-7 unless ``model_class`` says otherwise) needs, in its shape, and no other."""
    _check_complete(sd, config, where, model_class or KEYMAP.causal_lm_class())


# ---- flash-linear-attention's RWKV-7 HF checkpoints ----------------------------------------------------------

_FLA_LORA = {"w_lora": ("w_lora", True), "a_lora": ("a_lora", True), "v_lora": ("v_lora", True),
             "g_lora": ("g_lora", False)}


def is_fla_state_dict(sd: StateDict) -> bool:
    return any(k.startswith("model.layers.") for k in sd)


def fla_to_hf(sd: StateDict, fla_config: dict, where: str = "checkpoint") -> Tuple[RWKV7Config, StateDict]:
    """flash-linear-attention keys (``model.layers.N.attn.r_proj.weight``, ``w_lora.lora.0.weight``, ...) -> ours.

    fla's low-rank maps are ``Linear(C, D)`` (``lora.0``, stored ``[D, C]``, the transpose of ``.pth`` w1) and
    ``Linear(D, C)`` with the bias holding ``w0``/``a0``/``v0`` (``lora.2``). fla has no ``v_lora`` in layer 0;
    ours gets zeros there (the official model ignores layer 0's v-lora too).
    """
    require(sd, ("model.embeddings.weight", "model.layers.0.attn.r_k", "model.layers.0.attn.w_lora.lora.0.weight",
                  "model.layers.0.ffn.key.weight"), where)
    V, C = sd["model.embeddings.weight"].shape
    H, N = sd["model.layers.0.attn.r_k"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    v_key = next((k for k in sd if re.fullmatch(r"model\.layers\.\d+\.attn\.v_lora\.lora\.0\.weight", k)), None)
    config = RWKV7Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["model.layers.0.ffn.key.weight"].shape[0],
        decay_low_rank=sd["model.layers.0.attn.w_lora.lora.0.weight"].shape[0],
        a_low_rank=sd["model.layers.0.attn.a_lora.lora.0.weight"].shape[0],
        v_low_rank=sd[v_key].shape[0] if v_key else fla_config.get("v_low_rank_dim") or None,
        gate_low_rank=sd["model.layers.0.attn.g_lora.lora.0.weight"].shape[0],
        layer_norm_eps=fla_config.get("norm_eps", 1e-5),
    )
    out: StateDict = {}
    for key, t in sd.items():
        new = _fla_key(key, t, out)
        if new is None:
            raise CheckpointError(f"{where}: unexpected key '{key}' for a flash-linear-attention RWKV-7 checkpoint")
    if "head.weight" not in out and fla_config.get("tie_word_embeddings"):
        out["head.weight"] = out["model.emb.weight"]
    dtype = out["model.emb.weight"].dtype
    for part, shape in (("down", (config.v_low_rank, C)), ("up", (C, config.v_low_rank))):
        out.setdefault(f"model.blocks.0.att.v_lora.{part}.weight", torch.zeros(shape, dtype=dtype))
    out.setdefault("model.blocks.0.att.v0", torch.zeros(C, dtype=dtype))
    check_complete(out, config, where)
    return config, {k: v.contiguous() for k, v in out.items()}


def _fla_key(key: str, t: torch.Tensor, out: StateDict):
    """Write fla tensor ``key`` into ``out`` under our names; return the new key or None if unknown."""
    simple = {"model.embeddings.weight": "model.emb.weight", "model.norm.weight": "model.ln_out.weight",
              "model.norm.bias": "model.ln_out.bias", "lm_head.weight": "head.weight"}
    if key in simple:
        out[simple[key]] = t
        return simple[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if not m:
        return None
    i, rest = m.group(1), m.group(2)
    p = f"model.blocks.{i}."
    norms = {"pre_norm": "model.ln0", "attn_norm": p + "ln1", "ffn_norm": p + "ln2", "attn.g_norm": p + "att.ln_x"}
    nm = re.fullmatch(r"(pre_norm|attn_norm|ffn_norm|attn\.g_norm)\.(weight|bias)", rest)
    if nm:
        new = f"{norms[nm.group(1)]}.{nm.group(2)}"
        out[new] = t
        return new
    proj = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
    pm = re.fullmatch(r"attn\.(r_proj|k_proj|v_proj|o_proj)\.weight", rest)
    if pm:
        out[p + f"att.{proj[pm.group(1)]}.weight"] = t
        return p + f"att.{proj[pm.group(1)]}.weight"
    vm = re.fullmatch(r"attn\.(x_[rwkvag]|k_k|k_a|r_k)", rest)
    if vm:
        out[p + "att." + vm.group(1)] = t if vm.group(1) == "r_k" else t.reshape(-1)
        return p + "att." + vm.group(1)
    if rest == "ffn.x_k":
        out[p + "ffn.x_k"] = t.reshape(-1)
        return p + "ffn.x_k"
    if rest in ("ffn.key.weight", "ffn.value.weight"):
        out[p + rest] = t
        return p + rest
    lm = re.fullmatch(r"attn\.([wavg]_lora)\.lora\.(0|2)\.(weight|bias)", rest)
    if lm:
        name, idx, kind = lm.groups()
        if kind == "bias":  # w0 / a0 / v0
            new = p + f"att.{name[0]}0"
            out[new] = t.reshape(-1)
            return new
        new = p + f"att.{name}.{'down' if idx == '0' else 'up'}.weight"
        out[new] = t
        return new
    return None
