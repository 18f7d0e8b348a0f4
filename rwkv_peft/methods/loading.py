"""Loading a base model: BlinkDL ``.pth``, our HF folders or fla folders; optionally quantized (bitsandbytes).

Quantization goes through ``transformers.BitsAndBytesConfig`` on ``from_pretrained``. Only the six big
projections of each block (time-mix receptance/key/value/output, channel-mix key/value) are quantized; the
small decay/a/v/gate low-rank maps (``att.{w,a,v,g}_lora.down/up``), the head, and every non-Linear parameter
(embeddings, norms, token-shift mixes, ``w0``/``a0``/``v0``, ``k_k``/``k_a``/``r_k``, the initial state) stay in
``dtype``. A ``.pth`` is converted to a temporary HF folder first (bitsandbytes quantizes while
``from_pretrained`` loads); the folder is deleted once the model is in memory.

Every loaded model records where it came from (``model._rwkv_peft_load``), so an adapter's manifest can say
which base it was trained on and a merge from a quantized run can reload that base in full precision.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

QUANTIZATIONS = (None, "nf4", "fp4", "int8")
# suffixes (transformers matches modules-not-to-convert as prefixes, regexes or suffixes of module names)
# modules bitsandbytes leaves unquantized: the head and the small low-rank maps (v7: w/a/v/g; v6: maa/decay)
KEEP_HIGH_PRECISION = (["head"] + [f"att.{x}_lora.{p}" for x in "wavg" for p in ("down", "up")]
                       + ["att.maa_lora.down", "att.decay_lora.down", "att.decay_lora.up"])


def torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    t = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    return t


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bnb_config(quantization: Optional[str], dtype: Union[str, torch.dtype] = "bfloat16", double_quant: bool = False):
    """The ``BitsAndBytesConfig`` for ``quantization`` in {"nf4", "fp4", "int8"} (None for None)."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig
    q = str(quantization).lower()
    if q in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch_dtype(dtype),
                                  llm_int8_skip_modules=list(KEEP_HIGH_PRECISION))
    if q in ("int8", "8bit"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(KEEP_HIGH_PRECISION))
    raise ValueError(f"quantization {quantization!r}: expected one of None, 'nf4', 'fp4', 'int8'")


def is_quantized(model: nn.Module) -> bool:
    """True when any Linear of the model is a bitsandbytes 4-bit or 8-bit layer."""
    for m in model.modules():
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            return True
    return False


def load_info(model: nn.Module) -> dict:
    """How the (base) model was loaded: path, dtype, quantization, double_quant (empty if unknown)."""
    from ..tuners.state_tuning import unwrap
    return dict(getattr(unwrap(model), "_rwkv_peft_load", {}) or {})


def _default_device_map(quantization):
    if quantization is None:
        return None
    return {"": 0} if torch.cuda.is_available() else "cpu"


def _single_device(device_map):
    """The one device a ``device_map`` names ("cpu", "cuda:0", 0, {"": 0}, "auto"), or None."""
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map {device_map!r}: a .pth base loads onto one device; pass e.g. {{'': 0}}")
        device_map = device_map[""]
    if device_map == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return device_map


def _build_from_state_dict(config, sd, dtype: torch.dtype, device=None):
    from ..convert import causal_lm_class
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("att.time_state")]
    if missing or unexpected:
        from ..models.rwkv7.convert_rwkv7 import CheckpointError
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for m in model.modules():  # a state the config asks for but the file lacks: zeros
        if getattr(m, "time_state", None) is not None and m.time_state.is_meta:
            m.time_state = nn.Parameter(torch.zeros(m.time_state.shape, dtype=dtype))
    if device is not None:
        model.to(device)
    return model.eval()


def load_base_model(path: Union[str, os.PathLike], dtype: Union[str, torch.dtype] = "bfloat16",
                    quantization: Optional[str] = None, double_quant: bool = False, device_map=None,
                    trainable_initial_state: bool = False):
    """Load an RWKV base model (any version in ``rwkv_peft.versions``) for fine-tuning.

    path: a BlinkDL ``.pth``, one of our HF folders, an fla RWKV-7 folder, or a Hub repository id of one.
    dtype: the dtype of the weights (and the compute dtype of 4-bit layers).
    quantization: None, "nf4", "fp4" (4-bit, ``double_quant`` optional) or "int8".
    device_map: passed to ``from_pretrained`` (default for a quantized load: GPU 0 if there is one, else CPU);
        for an unquantized ``.pth`` a device string moves the model there.
    trainable_initial_state: give every layer an initial state parameter (zeros where the checkpoint has none)
        ready for ``apply_state_tuning``.
    """
    from transformers import AutoModelForCausalLM

    from .. import convert as conv
    from .. import versions

    from ..paths import local_or_hub
    path = local_or_hub(path)  # a file, a folder, or a Hub repository id (through the Hugging Face cache)
    if not path.exists():
        from ..models.rwkv7.convert_rwkv7 import CheckpointError
        raise CheckpointError(f"{path}: no such file or folder")
    dt = torch_dtype(dtype)
    if quantization is not None:
        quantization = str(quantization).lower()
    qconf = bnb_config(quantization, dt, double_quant)
    device_map = device_map if device_map is not None else _default_device_map(quantization)

    is_ours = path.is_dir() and versions.by_model_type(conv.read_folder_config(path).get("model_type")) is not None
    if is_ours:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, quantization_config=qconf,
                                                     device_map=device_map)
    elif qconf is None:
        config, sd, _ = conv.load_any(path)
        device = _single_device(device_map)
        model = _build_from_state_dict(config, sd, dt, device)
    else:  # .pth / fla folder + quantization: through a temporary HF folder of ours
        config, sd, _ = conv.load_any(path)
        tmp = Path(tempfile.mkdtemp(prefix="rwkv-peft-base-"))
        try:
            conv.save_hf_folder(config, {k: v.to(dt) for k, v in sd.items()}, tmp / "model", tokenizer=False)
            del sd
            model = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=dt, quantization_config=qconf,
                                                         device_map=device_map)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model.config._name_or_path = str(path.resolve())
    model.name_or_path = str(path.resolve())  # what peft writes as base_model_name_or_path
    model._rwkv_peft_load = {"path": str(path.resolve()), "dtype": dtype_name(dt), "quantization": quantization,
                             "double_quant": bool(double_quant) if quantization in ("nf4", "fp4") else False,
                             "device_map": device_map}
    if quantization is not None:
        keep_4bit_layers_trainable(model)
    tables_to_host(model)
    if trainable_initial_state:
        from ..tuners.state_tuning import add_initial_state
        add_initial_state(model)
    return model.eval()


def tables_to_host(model: nn.Module) -> None:
    """DeepEmbed tables that a ``device_map`` load put on a GPU go back to CPU memory (``HostEmbedding``)."""
    from ..models.rwkv7.modeling_rwkv7 import HostEmbedding
    for m in model.modules():
        if isinstance(m, HostEmbedding):
            m._apply(lambda t: t)


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights.

    bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place, for good, into an AVX-512 BF16 inference layout
    the first time the layer runs in eval mode without gradients on such a CPU (an evaluation, or the samples
    before training). Training steps after that go through ``bitsandbytes::gemv_4bit``, which has no autograd
    kernel: torch warns "bitsandbytes::gemv_4bit: an autograd kernel was not registered to the Autograd key(s)
    ..." and drops the gradient through the frozen base weight (LoRA gradients of the earlier layers came out
    about 90% off). A base loaded here is trained and evaluated in turns, so it keeps the trainable layout. GPU
    layers never repack; the attribute is bitsandbytes' own switch, set from the CPU's features.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
