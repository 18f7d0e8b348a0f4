"""Exports for runtimes: state adapters to the runtime state ``.pth``; merged models to ``.pth`` / HF folders.

``export(src, out)`` decides from what ``src`` is:
- an adapter folder with a state, or a state file, and ``out`` ending in ``.pth``: the runtime state file of the
  state's version (``Version.state_file_key`` / ``state_file_layout``): ``{'blocks.N.att.time_state': [H, N, N]
  fp32}``, ``S[h, value, key]`` for RWKV-7, -6 and -5.2 alike. The official ``rwkv`` package carries RWKV-7's
  state in that layout and RWKV-5/6's transposed (``Version.runtime_state_layout``); its RWKV-5/6 class and
  RWKV-Runner transpose the file themselves, so the file is the same for every version;
- the same with ``out`` ending in ``.safetensors``: our self-describing state adapter;
- the same with ``out`` ending in ``.state``, or ``runtime_format`` given ("runner", "ai00"): the state file that
  runtime loads (``rwkv_peft.runtime_states``; Ai00's ``.state`` is safetensors, S[h, key, value], float16);
- an adapter folder with ``base`` given (or recorded in its manifest) and ``what="model"``: the merged model;
- a model checkpoint (``.pth``, HF or fla folder): the model in the other layout (``rwkv_peft.convert``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from . import versions
from .errors import RWKVPeftError
from .tuners.state_tuning import (
    STATE_FILE, export_state_pth, read_state_file, save_state_file, sizes_of_states,
)


class ExportError(RWKVPeftError, ValueError):
    """An export that cannot be done as asked."""


def export_state(src: Union[str, os.PathLike], out: Union[str, os.PathLike],
                 architecture: Optional[str] = None, runtime_format: Optional[str] = None) -> str:
    """State adapter folder / ``.safetensors`` / runtime ``.pth`` / Ai00 ``.state`` -> runtime ``.pth``,
    ``.safetensors``, or a runtime's own state file (``.state``, or ``runtime_format`` "runner" / "ai00").
    ``architecture`` ("rwkv6"): the version of a source that records none (a runtime ``.pth``)."""
    from . import runtime_states
    src, out = Path(src), Path(out)
    if runtime_format is not None or (out.suffix.lower() not in (".pth", ".safetensors")
                                      and runtime_states.format_for_suffix(out) is not None):
        return runtime_states.export_runtime_state(src, out, runtime_format, architecture)
    states, meta = runtime_states.load_any(src, architecture)
    arch = meta.get("architecture") or architecture
    version = versions.by_name(arch)
    sizes = sizes_of_states(states, arch)
    desc = (f"{version.title + ', ' if version else ''}{sizes['num_hidden_layers']} layers x "
            f"[{sizes['num_heads']}, {sizes['head_size']}, {sizes['head_size']}]")
    if out.suffix == ".pth":
        export_state_pth(states, out, architecture=arch)
        v = version or versions.DEFAULT
        return (f"{src} -> {out} (runtime state .pth: {v.state_file_key.format(layer='N')} "
                f"{v.state_file_layout}, {desc})")
    if out.suffix == ".safetensors":
        from .paths import portable_path
        extra = {"source": portable_path(src)}  # no local folder layout in a file that may be published
        save_state_file(states, out, extra=extra, architecture=arch)
        read_state_file(out)  # self-check of the metadata we just wrote
        return f"{src} -> {out} (state adapter safetensors, {desc})"
    raise ExportError(f"{out}: a state is written as a .pth (runtime), .safetensors (state adapter) or .state "
                      f"(Ai00) file")


def _is_state_source(src: Path) -> bool:
    if src.is_dir():
        return (src / STATE_FILE).is_file()
    if src.suffix in (".safetensors", ".state"):
        return True
    if src.suffix == ".pth":
        from .convert import load_pth
        sd = load_pth(src)
        return bool(sd) and all(k.endswith("att.time_state") for k in sd)
    return False


def export(src: Union[str, os.PathLike], out: Union[str, os.PathLike], what: str = "auto",
           base: Optional[Union[str, os.PathLike]] = None, dtype: Optional[str] = None) -> str:
    """See the module docstring. ``what``: "auto", "state" or "model"."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if what not in ("auto", "state", "model"):
        raise ExportError(f"what={what!r}: expected auto, state or model")
    is_adapter = src.is_dir() and ((src / "rwkv_peft_adapter.json").is_file()
                                   or (src / "adapter_config.json").is_file() or (src / STATE_FILE).is_file())
    if what == "state" or (what == "auto" and base is None and _is_state_source(src)):
        if not _is_state_source(src):
            raise ExportError(f"{src}: holds no state to export (no {STATE_FILE}, no blocks.N.att.time_state)")
        msg = export_state(src, out)
        if src.is_dir() and (src / "adapter_config.json").is_file():
            msg += " (the folder's LoRA is not part of a state file: use --what model --base BASE to merge it)"
        return msg
    if is_adapter:
        from .merge import merge_adapters, save_merged
        model = merge_adapters(base, [src], dtype="float32")
        return "merged " + save_merged(model, out, dtype=dtype)
    from .convert import convert
    return convert(src, out, dtype=dtype)
