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
    _require(sd, ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.v1",
                  "blocks.0.att.g1", "blocks.0.ffn.key.weight"), where)
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return RWKV7Config(
        vocab_size=V, hidden_size=C, num_hidden_layers=layers, head_size=N,
        intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0],
        decay_low_rank=sd["blocks.0.att.w1"].shape[1], a_low_rank=sd["blocks.0.att.a1"].shape[1],
        v_low_rank=sd["blocks.0.att.v1"].shape[1], gate_low_rank=sd["blocks.0.att.g1"].shape[1],
        use_initial_state="blocks.0.att.time_state" in sd,
        deep_embed_rank=sd["blocks.0.ffn.s1"].shape[-1] if "blocks.0.ffn.s1" in sd else 0,
    )


def _require(sd: StateDict, keys, where: str):
    for k in keys:
        if k not in sd:
            raise CheckpointError(f"{where}: missing key '{k}'")


DEEP_EMBED = ("ffn.s_emb.weight", "ffn.s_emb_x.weight", "ffn.s1", "ffn.s2", "ffn.s0")  # DeepEmbed variant


def blinkdl_key_to_hf(key: str) -> Tuple[str, str]:
    """(our key, how the tensor changes: 'same' | 'flatten' | 'transpose')."""
    if key == "emb.weight":
        return "model.emb.weight", "same"
    if key == "head.weight":
        return "head.weight", "same"
    if key.startswith("ln_out."):
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
    if rest == "ffn.x_k":
        return p + rest, "flatten"
    if rest in ("ffn.key.weight", "ffn.value.weight") + DEEP_EMBED:
        return p + rest, "same"
    if rest.startswith("att."):
        name = rest[4:]
        if name in _VEC:
            return p + rest, "flatten"
        if name in _SAME_ATT:
            return p + rest, "same"
        lm = re.fullmatch(r"([wavg])([12])", name)
        if lm:
            part = "down" if lm.group(2) == "1" else "up"
            return f"{p}att.{_LORA[lm.group(1)]}.{part}.weight", "transpose"
    raise KeyError(key)


def blinkdl_to_hf(sd: StateDict, where: str = "checkpoint") -> Tuple[RWKV7Config, StateDict]:
    config = config_from_blinkdl(sd, where)
    out: StateDict = {}
    for key, t in sd.items():
        try:
            new, how = blinkdl_key_to_hf(key)
        except KeyError:
            raise CheckpointError(f"{where}: unexpected key '{key}' (not part of an RWKV-7 checkpoint "
                                  f"this converter knows)") from None
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: key '{key}' holds a {type(t).__name__}, not a tensor")
        out[new] = t.reshape(-1) if how == "flatten" else t.t() if how == "transpose" else t
    check_complete(out, config, where)
    return config, {k: v.contiguous() for k, v in out.items()}


def expected_hf_keys(config, model_class=None) -> Dict[str, Tuple[int, ...]]:
    """Every key of our state dict and its shape, for checks (built from the model itself on 'meta')."""
    if model_class is None:
        from .modeling_rwkv7 import RWKV7ForCausalLM as model_class
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_complete(sd: StateDict, config, where: str, model_class=None) -> None:
    """Every tensor the model (RWKV-7 unless ``model_class`` says otherwise) needs, in its shape, and no other."""
    expected = expected_hf_keys(config, model_class)
    for k, shape in expected.items():
        if k not in sd:
            raise CheckpointError(f"{where}: missing tensor for '{k}' (expected shape {list(shape)})")
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{where}: '{k}' has shape {list(sd[k].shape)}; the sizes read from the "
                                  f"checkpoint give {list(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected key '{extra[0]}'{more}")


def hf_to_blinkdl(sd: StateDict, config: RWKV7Config) -> StateDict:
    """Our state dict -> BlinkDL keys and shapes (the exact inverse of ``blinkdl_to_hf``)."""
    C = config.hidden_size
    out: StateDict = {}
    for key, t in sd.items():
        if key == "model.emb.weight":
            out["emb.weight"] = t
        elif key == "head.weight":
            out["head.weight"] = t
        elif key.startswith("model.ln_out."):
            out[key[len("model."):]] = t
        elif key.startswith("model.ln0."):
            out["blocks.0." + key[len("model."):]] = t
        else:
            m = re.fullmatch(r"model\.blocks\.(\d+)\.(.+)", key)
            if not m:
                raise CheckpointError(f"unexpected key '{key}' in the model's state dict")
            i, rest = m.group(1), m.group(2)
            lm = re.fullmatch(r"att\.([wavg])_lora\.(down|up)\.weight", rest)
            if lm:
                out[f"blocks.{i}.att.{lm.group(1)}{1 if lm.group(2) == 'down' else 2}"] = t.t()
            elif rest == "ffn.x_k" or (rest.startswith("att.") and rest[4:] in _VEC):
                out[f"blocks.{i}.{rest}"] = t.reshape(1, 1, C)
            else:
                out[f"blocks.{i}.{rest}"] = t
    return {k: out[k].contiguous() for k in sorted(out, key=_official_order)}


_BLOCK_ORDER = ["ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [
    "att." + n for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1",
                         "v2", "g1", "g2", "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight",
                         "output.weight", "ln_x.weight", "ln_x.bias", "time_state")
] + ["ffn.x_k", "ffn.key.weight", "ffn.value.weight", *DEEP_EMBED]


def _official_order(key: str):
    """The order the official training code saves keys in (module definition order)."""
    if key == "emb.weight":
        return (0, 0, 0)
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return (1, int(i), _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else len(_BLOCK_ORDER))
    return (2, 0, int(key.endswith("bias"))) if key.startswith("ln_out") else (3, 0, 0)


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
    _require(sd, ("model.embeddings.weight", "model.layers.0.attn.r_k", "model.layers.0.attn.w_lora.lora.0.weight",
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
