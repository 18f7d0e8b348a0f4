"""Fine-tuning methods on RWKV-7: base loading (optionally 4/8-bit), LoRA and variants through peft, MiSS
through peft, state tuning (our tuner beside peft), and one adapter folder holding either or both.

The training loop uses exactly these names::

    model = load_base_model(path, dtype="bfloat16", quantization=None | "nf4" | "fp4" | "int8")
    model = apply_lora(model, r=16, alpha=32, targets="default", variant="lora", init=None)   # optional
    model = apply_miss(model, r=64, targets="default", variant="balance")   # or MiSS instead of LoRA
    model = apply_state_tuning(model, init="zeros")                                          # optional
    print(trainable_summary(model))
    ... train ...
    save_adapter(model, out_dir)
    model = load_adapter(load_base_model(path), out_dir)
"""
from ..tuners.state_tuning import (
    apply_state_tuning, combine_states, export_state_pth, get_states, load_state_any, load_state_pth,
    set_states,
)
from .adapter_io import (
    MANIFEST, AdapterMismatchError, base_sizes, check_adapter_fits, load_adapter, read_manifest, save_adapter,
    trainable_summary,
)
from .cpu_decoding import (
    CPU_WEIGHTS, CPUDecodingError, PackedLinear, packed_summary, prepare_for_cpu_decoding, relayout_for_cpu_decoding,
)
from .loading import KEEP_HIGH_PRECISION, bnb_config, is_quantized, load_base_model, load_info
from .lora import TARGET_PRESETS, apply_lora, lora_config, resolve_targets
from .miss import MissFitError, apply_miss, miss_config

__all__ = [
    "load_base_model", "apply_lora", "apply_miss", "miss_config", "MissFitError", "apply_state_tuning", "save_adapter", "load_adapter", "trainable_summary",
    "export_state_pth", "load_state_pth", "load_state_any", "get_states", "set_states", "combine_states",
    "AdapterMismatchError", "MANIFEST", "TARGET_PRESETS", "KEEP_HIGH_PRECISION", "bnb_config", "is_quantized",
    "load_info", "relayout_for_cpu_decoding", "lora_config", "resolve_targets", "base_sizes", "check_adapter_fits",
    "read_manifest", "CPU_WEIGHTS", "CPUDecodingError", "PackedLinear", "packed_summary", "prepare_for_cpu_decoding",
]
