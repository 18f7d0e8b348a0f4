"""GGUF files for llama.cpp and ollama: RWKV-7 (architecture ``rwkv7``) and RWKV-6 (``rwkv6``).

``export_gguf(src, out, dtype)`` is what ``rwkv-peft export SRC out.gguf`` runs. SRC is a checkpoint (BlinkDL
``.pth``, one of our HF folders, an fla folder) or an adapter folder, which is merged onto its base first (the
base recorded in the adapter, or ``base``). The file holds what llama.cpp's loader asks for and nothing else:

- tensors named and shaped as llama.cpp's own converter (``convert_hf_to_gguf.py``) writes them. We start from
  the BlinkDL keys (``rwkv_peft.convert.to_blinkdl``) and apply, per tensor, the transform the tables below name:
  ``same``; ``vec`` (``[1, 1, C]`` or ``[H, N]`` -> ``[C]``); ``t`` (transpose of a 2-D low-rank map);
  ``w2`` (RWKV-6 ``time_maa_w2`` ``[5, D, C]`` -> ``[5, C, D]``); ``lerp`` (the token-shift mixes of one
  layer stacked into ``time_mix_lerp_fused`` ``[n, 1, 1, C]``: RWKV-7 r, w, k, v, a, g; RWKV-6 w, k, v, r, g).
  RWKV-7 layer 0 gets copies of ``a0/a1/a2`` as ``v0/v1/v2`` (the loader requires them; the graph ignores
  layer 0's value mix, as the official model does).
- metadata: architecture keys (context length 1048576 as llama.cpp's converter writes, widths, head size,
  layer-norm eps, the low-rank sizes, ``attention.head_count`` 0) and the RWKV World tokenizer
  (``tokenizer.ggml.model`` "rwkv", tokens as the escaped byte text ``repr(bytes)[2:-1]``, id 0 ``<s>`` control,
  ids without a token ``[PADi]`` unused; bos = eos = 0, eot = 261 ``"\\n\\n"``; a chat template in the RWKV
  World format that llama.cpp recognises by the text "rwkv-world").
- types: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices; as in llama.cpp's converter, 1-D tensors,
  norms, biases, ``time_mix_first``, ``time_mix_w1/w2``, ``time_mix_decay_w1/w2`` and ``time_mix_lerp_fused``
  stay f32, and a matrix whose rows do not split into 32-value blocks falls back from q8_0 to f16.

Not representable, so refused with :class:`GGUFExportError` naming the file/key/value: RWKV-5 and RWKV-4 (llama.cpp
has no such architecture), a learned initial state (``blocks.N.att.time_state``: llama.cpp's RWKV models have no
tensor for it), a vocabulary smaller than the World tokenizer's, or a tokenizer that is not the World tokenizer.
The write is atomic (temporary file, then rename).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .errors import RWKVPeftError

StateDict = Dict[str, torch.Tensor]
CONTEXT_LENGTH = 1048576       # what llama.cpp's converter writes: "RWKV isn't context limited"
LLAMA_NORM_GROUP_EPS = 64e-5   # llama.cpp's ln_x group-norm eps (fixed); ours is head_size * 1e-5
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
DTYPE_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}   # llama_ftype (general.file_type)
KEEP_F32 = ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1", "time_mix_decay_w2",
            "time_mix_lerp_fused")
EOT_TOKEN = 261  # "\n\n"
CHAT_TEMPLATE = (
    "{#- rwkv-world chat format: System / User / Assistant turns separated by blank lines -#}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}{{- 'System: ' + message['content'] | trim + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] | trim + '\\n\\n' -}}\n"
    "{%- else -%}{{- 'Assistant: ' + message['content'] | trim + '\\n\\n' -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}\n"
)

# ---- per-version tables: BlinkDL key -> (GGUF name, transform) ---------------------------------------------

_GLOBAL = {
    "emb.weight": ("token_embd.weight", "same"),
    "blocks.0.ln0.weight": ("token_embd_norm.weight", "same"),
    "blocks.0.ln0.bias": ("token_embd_norm.bias", "same"),
    "ln_out.weight": ("output_norm.weight", "same"),
    "ln_out.bias": ("output_norm.bias", "same"),
    "head.weight": ("output.weight", "same"),
}
_BLOCK_COMMON = {
    "ln1.weight": ("attn_norm.weight", "same"), "ln1.bias": ("attn_norm.bias", "same"),
    "ln2.weight": ("attn_norm_2.weight", "same"), "ln2.bias": ("attn_norm_2.bias", "same"),
    "att.receptance.weight": ("time_mix_receptance.weight", "same"),
    "att.key.weight": ("time_mix_key.weight", "same"),
    "att.value.weight": ("time_mix_value.weight", "same"),
    "att.output.weight": ("time_mix_output.weight", "same"),
    "att.ln_x.weight": ("time_mix_ln.weight", "same"), "att.ln_x.bias": ("time_mix_ln.bias", "same"),
    "ffn.key.weight": ("channel_mix_key.weight", "same"),
    "ffn.value.weight": ("channel_mix_value.weight", "same"),
}
_V7_BLOCK = {
    **_BLOCK_COMMON,
    **{f"att.{p}0": (f"time_mix_{p}0.weight", "vec") for p in "wav"},
    **{f"att.{p}{n}": (f"time_mix_{p}{n}.weight", "t") for p in "wavg" for n in "12"},
    "att.k_k": ("time_mix_k_k.weight", "vec"), "att.k_a": ("time_mix_k_a.weight", "vec"),
    "att.r_k": ("time_mix_r_k.weight", "vec"),
    "ffn.x_k": ("channel_mix_lerp_k.weight", "vec"),
}
_V6_BLOCK = {
    **_BLOCK_COMMON,
    "att.gate.weight": ("time_mix_gate.weight", "same"),
    "att.time_maa_x": ("time_mix_lerp_x.weight", "vec"),
    "att.time_maa_w1": ("time_mix_w1.weight", "t"), "att.time_maa_w2": ("time_mix_w2.weight", "w2"),
    "att.time_decay": ("time_mix_decay.weight", "vec"),
    "att.time_decay_w1": ("time_mix_decay_w1.weight", "t"), "att.time_decay_w2": ("time_mix_decay_w2.weight", "t"),
    "att.time_faaaa": ("time_mix_first.weight", "same"),
    "ffn.time_maa_k": ("channel_mix_lerp_k.weight", "vec"), "ffn.time_maa_r": ("channel_mix_lerp_r.weight", "vec"),
    "ffn.receptance.weight": ("channel_mix_receptance.weight", "same"),
}
SPECS = {
    "7": {"arch": "rwkv7", "block": _V7_BLOCK, "lerp": [f"att.x_{c}" for c in "rwkvag"],
          "layer0_copies": {f"time_mix_v{n}.weight": f"time_mix_a{n}.weight" for n in "012"}},
    "6": {"arch": "rwkv6", "block": _V6_BLOCK, "lerp": [f"att.time_maa_{c}" for c in "wkvrg"],
          "layer0_copies": {}},
}


class GGUFExportError(RWKVPeftError, ValueError):
    """A model, tokenizer or type that a GGUF for llama.cpp cannot hold; the message names file, key and value."""


# ---- tensors ------------------------------------------------------------------------------------------------

def _transform(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "vec":
        return t.reshape(-1)
    if how == "t":
        return t.t()
    if how == "w2":
        return t.permute(0, 2, 1)
    return t


def gguf_tensors(sd: StateDict, version: str, where: str = "model") -> Dict[str, torch.Tensor]:
    """BlinkDL state dict -> {GGUF tensor name: tensor in llama.cpp's layout} (see the module docstring)."""
    spec = SPECS[version]
    out: Dict[str, torch.Tensor] = {}
    lerps: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key.endswith("att.time_state"):
            raise GGUFExportError(
                f"{where}: key '{key}' is a learned initial state; llama.cpp's {spec['arch']} GGUF has no tensor for "
                f"it. Export the model without the state (a LoRA-only adapter or the base), and keep the state as "
                f"a runtime state file (rwkv-peft export ADAPTER state.pth)")
        if key in _GLOBAL:
            name, how = _GLOBAL[key]
            out[name] = _transform(t, how)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m and m.group(2) in spec["lerp"]:
            lerps.setdefault(int(m.group(1)), {})[m.group(2)] = t.reshape(-1)
            continue
        if not m or m.group(2) not in spec["block"]:
            raise GGUFExportError(f"{where}: key '{key}' has no place in a llama.cpp {spec['arch']} GGUF")
        i, (name, how) = int(m.group(1)), spec["block"][m.group(2)]
        if i == 0 and name in spec["layer0_copies"]:
            continue  # replaced below: llama.cpp wants layer 0's unused value mix shaped like the a-lora
        out[f"blk.{i}.{name}"] = _transform(t, how)
    for i, parts in sorted(lerps.items()):
        missing = [p for p in spec["lerp"] if p not in parts]
        if missing:
            raise GGUFExportError(f"{where}: missing key 'blocks.{i}.{missing[0]}'")
        out[f"blk.{i}.time_mix_lerp_fused.weight"] = torch.stack([parts[p] for p in spec["lerp"]]).unsqueeze(1)\
            .unsqueeze(1)
    for dst, src in spec["layer0_copies"].items():
        out[f"blk.0.{dst}"] = out[f"blk.0.{src}"].clone()
    return out


def tensor_type(name: str, ndim: int, dtype: str) -> str:
    """The GGUF type of one tensor under llama.cpp's converter rules (f32 for vectors, norms and the small maps)."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "f32"
    if name.split(".")[-2] in KEEP_F32:
        return "f32"
    return dtype


def encode(t: torch.Tensor, kind: str):
    """(numpy data, GGMLQuantizationType) of ``t`` as ``kind``, q8_0 falling back to f16 as llama.cpp does."""
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    data = t.detach().to("cpu", torch.float32).contiguous().numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def default_dtype(sd: StateDict) -> str:
    """llama.cpp's guess: the dtype of the first matrix if it is bf16 or f16, else f16."""
    first = next((t.dtype for t in sd.values() if t.dim() >= 2), torch.float32)
    return "bf16" if first == torch.bfloat16 else "f16"


def check_dtype(dtype: Optional[str]) -> Optional[str]:
    """``dtype`` as a GGUF type name (f32, f16, bf16, q8_0; float32/float16/bfloat16 accepted) or None."""
    if dtype is None:
        return None
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in GGUF_DTYPES:
        raise GGUFExportError(f"--dtype {dtype!r}: a GGUF is written as {', '.join(GGUF_DTYPES)} "
                              f"(float32, float16 and bfloat16 name the first three)")
    return name


# ---- metadata and tokenizer ---------------------------------------------------------------------------------

def model_version(config, where: str = "model") -> str:
    """'7' or '6' for the versions llama.cpp runs; :class:`GGUFExportError` for the others."""
    from .models.rwkv6.configuration_rwkv6 import RWKV6Config
    from .models.rwkv7.configuration_rwkv7 import RWKV7Config
    versions = {RWKV7Config.model_type: "7", RWKV6Config.model_type: "6"}
    kind = getattr(config, "model_type", None)
    if kind not in versions:
        raise GGUFExportError(
            f"{where}: model_type {kind!r} ({config.describe() if hasattr(config, 'describe') else 'unknown'}): "
            f"llama.cpp runs RWKV-6 ('rwkv6') and RWKV-7 ('rwkv7') only, so there is no GGUF layout for it; "
            f"export a .pth or a Hugging Face folder instead")
    return versions[kind]


def arch_metadata(version: str, config, tensors: Dict[str, torch.Tensor]) -> List[Tuple[str, str, object]]:
    """[(key without the '<arch>.' prefix, 'u32' | 'f32', value)] as llama.cpp's converter writes them."""
    kv = [("context_length", "u32", CONTEXT_LENGTH),
          ("embedding_length", "u32", tensors["token_embd.weight"].shape[1]),
          ("block_count", "u32", config.num_hidden_layers),
          ("feed_forward_length", "u32", tensors["blk.0.channel_mix_key.weight"].shape[0]),
          ("attention.layer_norm_epsilon", "f32", float(config.layer_norm_eps)),
          ("wkv.head_size", "u32", config.head_size),
          ("attention.head_count", "u32", 0)]  # "required by llama.cpp, unused"
    if version == "7":
        v_layer = 1 if config.num_hidden_layers > 1 else 0
        kv += [("attention.decay_lora_rank", "u32", tensors["blk.0.time_mix_w1.weight"].shape[0]),
               ("attention.iclr_lora_rank", "u32", tensors["blk.0.time_mix_a1.weight"].shape[0]),
               ("attention.value_residual_mix_lora_rank", "u32",
                tensors[f"blk.{v_layer}.time_mix_v1.weight"].shape[0]),
               ("attention.gate_lora_rank", "u32", tensors["blk.0.time_mix_g1.weight"].shape[0])]
    else:
        kv += [("rescale_every_n_layers", "u32", 0),
               ("time_mix_extra_dim", "u32", tensors["blk.0.time_mix_w1.weight"].shape[0] // 5),
               ("time_decay_extra_dim", "u32", tensors["blk.0.time_mix_decay_w1.weight"].shape[0])]
    return [(k, t, int(v) if t == "u32" else v) for k, t, v in kv]


def world_vocab_file(tokenizer_from: Iterable[Optional[Path]], where: str = "model") -> Optional[Path]:
    """The World vocabulary of the first folder in ``tokenizer_from`` holding a tokenizer (None: the shipped one);
    :class:`GGUFExportError` when that tokenizer is not the RWKV World tokenizer."""
    import json

    from .tokenization.tokenization_rwkv_world import VOCAB_FILE_NAME
    for folder in tokenizer_from:
        cfg = Path(folder) / "tokenizer_config.json" if folder is not None else None
        if cfg is None or not cfg.is_file():
            continue
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
        if cls != "RWKVWorldTokenizer":
            raise GGUFExportError(f"{cfg}: tokenizer_class {cls!r}: a GGUF export writes the RWKV World tokenizer "
                                  f"(tokenizer.ggml.model 'rwkv', tokenizer_class 'RWKVWorldTokenizer') only")
        vocab = Path(folder) / VOCAB_FILE_NAME
        return vocab if vocab.is_file() else None
    return None


def world_tokens(vocab_size: int, vocab_file: Optional[Path] = None,
                 where: str = "model") -> Tuple[List[bytes], List[int]]:
    """(token texts, token types) for ``vocab_size`` ids, in llama.cpp's "rwkv" tokenizer encoding."""
    from .tokenization.tokenization_rwkv_world import load_world_vocab
    normal, control, unused = 1, 3, 5  # gguf.TokenType
    table = load_world_vocab(vocab_file)
    needed = 1 + max(i for i, tok in enumerate(table) if tok is not None)
    if vocab_size < needed:
        raise GGUFExportError(f"{where}: vocab_size {vocab_size} is smaller than the RWKV World tokenizer "
                              f"({needed} ids); a GGUF export writes that tokenizer and needs a model sized for it")
    tokens, types = [b"<s>"], [control]
    for i in range(1, vocab_size):
        tok = table[i] if i < len(table) else None
        tokens.append(f"[PAD{i}]".encode() if tok is None else repr(tok)[2:-1].encode("utf-8"))
        types.append(unused if tok is None else normal)
    return tokens, types


def _write_metadata(writer, version: str, config, tensors, dtype: str, name: str, vocab) -> None:
    arch = SPECS[version]["arch"]
    writer.add_string("general.type", "model")
    writer.add_string("general.name", name)
    writer.add_uint32("general.file_type", FILE_TYPE[dtype])
    writer.add_uint32("general.quantization_version", 2)
    for key, kind, value in arch_metadata(version, config, tensors):
        (writer.add_uint32 if kind == "u32" else writer.add_float32)(f"{arch}.{key}", value)
    tokens, types = vocab
    writer.add_string("tokenizer.ggml.model", "rwkv")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    for key, value in (("bos", 0), ("eos", 0), ("eot", EOT_TOKEN)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)


# ---- writing ------------------------------------------------------------------------------------------------

def save_gguf(config, sd: StateDict, out: Union[str, os.PathLike], dtype: Optional[str] = None,
              name: Optional[str] = None, tokenizer_from: Sequence[Optional[Path]] = (),
              where: str = "model") -> str:
    """Write our state dict ``sd`` (of ``config``) as a GGUF at ``out``, atomically; returns a one-line summary.

    ``dtype``: f32 | f16 | bf16 | q8_0 (default: bf16 for a bf16 model, else f16, as llama.cpp's converter
    guesses). ``tokenizer_from``: folders whose tokenizer (if any) must be the World tokenizer.
    """
    import gguf

    from .convert import atomic_path, to_blinkdl
    version = model_version(config, where)
    kind = check_dtype(dtype)
    blink = to_blinkdl({k: v.detach() for k, v in sd.items()}, config)
    tensors = gguf_tensors(blink, version, where)
    kind = kind or default_dtype(blink)
    vocab = world_tokens(config.vocab_size, world_vocab_file(tokenizer_from, where), where)
    out = Path(out)
    counts: Dict[str, int] = {}
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), SPECS[version]["arch"])
        _write_metadata(writer, version, config, tensors, kind, name or out.stem, vocab)
        for tname, t in tensors.items():
            data, qtype = encode(t, tensor_type(tname, t.dim(), kind))
            writer.add_tensor(tname, data, raw_dtype=qtype)
            counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    note = ""
    if config.head_size != 64:
        note = (f" (note: llama.cpp normalises ln_x with eps {LLAMA_NORM_GROUP_EPS:g}, this model with "
                f"{config.head_size * 1e-5:g}: its logits will differ slightly)")
    return (f"{out} (GGUF {SPECS[version]['arch']}, {kind}: {len(tensors)} tensors: {types}; "
            f"World tokenizer, {len(vocab[0])} ids): {config.describe()}{note}")


def _is_adapter(path: Path) -> bool:
    from .methods.adapter_io import MANIFEST
    from .tuners.state_tuning import STATE_FILE
    return path.is_dir() and any((path / f).is_file() for f in (MANIFEST, "adapter_config.json", STATE_FILE))


def export_gguf(src: Union[str, os.PathLike], out: Union[str, os.PathLike], dtype: Optional[str] = None,
                base: Optional[Union[str, os.PathLike]] = None) -> str:
    """``rwkv-peft export SRC out.gguf``: SRC a checkpoint, or an adapter folder merged onto ``base`` (default:
    the base its manifest records) in fp32 first. Returns :func:`save_gguf`'s summary."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    check_dtype(dtype)
    if _is_adapter(src):
        from .merge import merge_adapters
        from .paths import BaseNotFoundError, adapter_base
        if base is None:
            try:
                base = adapter_base(src)[1]
            except BaseNotFoundError as e:
                raise GGUFExportError(f"{e}; pass the base model to merge the adapter into") from None
        model = merge_adapters(base, [src], dtype="float32")
        return save_gguf(model.config, model.state_dict(), out, dtype, name=src.name,
                         tokenizer_from=[src, Path(base)], where=str(src))
    if src.is_file() and src.suffix not in (".pth", ".pt", ".bin"):
        raise GGUFExportError(f"{src}: not a model checkpoint (expected a BlinkDL .pth, a model folder or an "
                              f"adapter folder)")
    from .convert import load_any
    config, sd, _ = load_any(src)
    return save_gguf(config, sd, out, dtype, name=src.stem if src.is_file() else src.name,
                     tokenizer_from=[src] if src.is_dir() else [], where=str(src))
