"""One adapter folder for every method: save, load (with size checks against the base), summary.

Folder layout (written atomically: a temporary folder renamed into place)::

    adapter_config.json          peft's LoRA / MiSS config   } when LoRA or MiSS is attached; a standard peft folder:
    adapter_model.safetensors    peft's LoRA / MiSS weights  } ``PeftModel.from_pretrained`` loads it as it is
    state_adapter.safetensors    initial states + metadata   when state tuning is attached
    rwkv_peft_adapter.json       the manifest: what the folder holds and the base it was trained on

PiSSA / OLoRA adapters move part of the base weight into the adapter; they are saved converted to a plain
LoRA of rank 2r on the *original* base (peft's ``path_initial_model_for_weight_conversion``), so every saved
adapter is a delta on the unmodified base and merges into it.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import versions
from ..errors import RWKVPeftError

MANIFEST = "rwkv_peft_adapter.json"
FORMAT_VERSION = 1
SIZE_KEYS = ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_size",
             "intermediate_size", "decay_low_rank", "a_low_rank", "v_low_rank", "gate_low_rank", "mix_low_rank",
             "deep_embed_rank")


class AdapterMismatchError(RWKVPeftError, ValueError):
    """An adapter that does not fit a base; the message names the dimension and both values."""


def base_sizes(model: nn.Module) -> dict:
    from ..tuners.state_tuning import unwrap
    cfg = unwrap(model).config
    version = versions.by_model_type(cfg.model_type)
    sizes = {"architecture": version.name if version is not None else cfg.model_type}
    for k in SIZE_KEYS[1:]:  # the sizes this version has (RWKV-6 has mix/decay low ranks, RWKV-7 four others)
        if getattr(cfg, k, None) is not None:
            sizes[k] = getattr(cfg, k)
    return sizes


def check_sizes(adapter_sizes: dict, model: nn.Module, where: str) -> None:
    have = base_sizes(model)
    for k in SIZE_KEYS:
        if k in adapter_sizes and adapter_sizes[k] != have.get(k):
            raise AdapterMismatchError(f"{where}: {k} differs: the adapter was trained on {adapter_sizes[k]}, "
                                       f"the base has {have[k]}")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def read_manifest(adapter_dir: os.PathLike) -> Optional[dict]:
    p = Path(adapter_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{p}: invalid JSON ({e})") from e


# ---- save -------------------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, out_dir: os.PathLike, extra: Optional[dict] = None,
                 state_dict: Optional[dict] = None) -> Path:
    """Write LoRA (if attached) + state (if state tuning is attached) + manifest into ``out_dir``.

    Atomic: everything is written to a temporary folder beside ``out_dir`` that then replaces ``out_dir`` as a
    whole, so give the adapter its own folder (e.g. ``outputs/<run>/adapter``), not the run folder. Pass the
    unwrapped model (``accelerator.unwrap_model``). ``extra`` (JSON-able) is stored in the manifest.
    ``state_dict``: the model's weights as whole tensors (at least the trained ones), to save instead of the
    model's own when those are sharded (FSDP2, DeepSpeed ZeRO-3; see ``accelerator.get_state_dict``).
    """
    from .. import __version__
    from ..convert import atomic_path
    from ..tuners.state_tuning import (
        STATE_FILE, get_shift_states, get_states, save_state_file, state_tuning_config, unwrap,
    )
    from .loading import load_info

    base = unwrap(model)
    from .miss import is_miss

    st = state_tuning_config(model)
    peft = _is_peft(model)
    miss = peft and is_miss(model)
    lora = peft and not miss
    if not peft and st is None:
        raise ValueError("nothing to save: the model has neither a LoRA or MiSS adapter (apply_lora, apply_miss) "
                         "nor state tuning (apply_state_tuning)")
    out_dir = Path(out_dir)
    info = load_info(model)
    # the base as a portable spec (assets:..., relative, ~/...): no local folder layout in a folder that gets
    # published (rwkv_peft.paths says how it is resolved again)
    from ..paths import portable_path
    base_path = info.get("path") or base.config._name_or_path or None
    base_path = portable_path(base_path) if base_path else None
    manifest = {
        "format": "rwkv-peft-adapter", "format_version": FORMAT_VERSION, "rwkv_peft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # "miss" only when MiSS is attached: manifests of LoRA / state adapters stay as they were
        "contains": {"lora": lora, **({"miss": True} if miss else {}), "state": st is not None},
        "base": {"path": base_path,
                 "dtype": info.get("dtype"), "quantization": info.get("quantization"),
                 "double_quant": info.get("double_quant", False), **base_sizes(model)},
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        if peft:
            with _recorded_base_name(model, base_path):
                manifest["miss" if miss else "lora"] = _save_lora(model, Path(tmp), state_dict)
        if st is not None:
            states = get_states(model) if state_dict is None else _states_in(model, state_dict)
            shifts = None
            if getattr(st, "full", False):  # full-state tuning: the token-shift states too
                shifts = get_shift_states(model) if state_dict is None else _shifts_in(model, state_dict)
            version = versions.of(base)  # the model's version, also for a config recorded by an older release
            save_state_file(states, Path(tmp) / STATE_FILE, extra=st.to_dict(), architecture=version.name,
                            shifts=shifts)
            manifest["state"] = {"file": STATE_FILE, "architecture": version.name, "layout": version.state_layout,
                                 "init": st.init, "layers": st.num_hidden_layers, "heads": st.num_heads,
                                 "head_size": st.head_size, "full": shifts is not None}
        if extra:
            manifest["extra"] = extra
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return out_dir


@contextmanager
def _recorded_base_name(model, name: Optional[str]):
    """peft writes the base's name into adapter_config.json and its README: make it ``name`` while saving."""
    from ..tuners.state_tuning import unwrap
    configs = list(model.peft_config.values())
    base = unwrap(model)
    saved = [c.base_model_name_or_path for c in configs], base.config._name_or_path, base.name_or_path
    try:
        for c in configs:
            c.base_model_name_or_path = name
        base.config._name_or_path = base.name_or_path = name or ""
        yield
    finally:
        for c, old in zip(configs, saved[0]):
            c.base_model_name_or_path = old
        base.config._name_or_path, base.name_or_path = saved[1], saved[2]


def _states_in(model, state_dict: dict) -> list:
    """Every layer's initial state as ``get_states`` gives it, read from ``state_dict`` (keys as the model's)."""
    from ..tuners.state_tuning import time_mixes
    names = {id(m): n for n, m in model.named_modules()}
    return [state_dict[f"{names[id(m)]}.time_state"].detach().float().cpu().clone() for m in time_mixes(model)]


def _shifts_in(model, state_dict: dict) -> list:
    """Every layer's (time-mix, channel-mix) shift state as ``get_shift_states`` gives it, from ``state_dict``."""
    from ..tuners.state_tuning import shift_mixes
    names = {id(m): n for n, m in model.named_modules()}
    return [tuple(state_dict[f"{names[id(m)]}.shift_state"].detach().float().cpu().clone() for m in pair)
            for pair in shift_mixes(model)]


def _save_lora(model, tmp: Path, state_dict: Optional[dict] = None) -> dict:
    import shutil

    from safetensors.torch import save_file

    base = model.get_base_model()
    cfg = model.peft_config[model.active_adapter if isinstance(model.active_adapter, str) else "default"]
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    meta = dict(getattr(base, "_rwkv_miss" if peft_type == "MISS" else "_rwkv_lora", {}) or {})
    initial = getattr(base, "_rwkv_lora_initial", None) if peft_type == "LORA" else None
    if initial is not None:  # PiSSA / OLoRA: save as a plain LoRA (rank 2r) on the original base
        if state_dict is not None:  # peft's conversion reads the model's own state dict for the initial adapter
            raise ValueError("a PiSSA / OLoRA adapter cannot be saved from a gathered state dict (FSDP2, ZeRO-3)")
        init_dir = tmp / "initial_adapter"
        init_dir.mkdir()
        save_file({k: v.contiguous() for k, v in initial.items()}, str(init_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        import warnings
        with warnings.catch_warnings():
            # Three notices of peft's conversion itself: it loads A0 B0 as a second adapter and warns "PiSSA
            # (OLoRA) changes the base weights of the model and should thus not be used with other adapters.
            # Consider converting ..." (this call is that conversion); it reads the initial weights with
            # save_embedding_layers="auto", which looks for config.json next to a .pth base (and on the Hub) and
            # warns "Could not find a config file in ... - will assume that the vocabulary was not modified" (it
            # never is here); on a quantized base it notes "Quant(W_res) + AB != Quant(W) + Delta(AB)", the
            # known gap of merging QPiSSA into the original weights (see merge.py).
            for message in (r"(PiSSA|OLoRA) changes the base weights", r"Could not find a config file in .* - "
                            r"will assume that the vocabulary was not modified", r".*Quant\(W_res\)"):
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(init_dir),
                                  save_embedding_layers=False)
        shutil.rmtree(init_dir)
        meta["converted_to_plain_lora"] = {"from": str(cfg.init_lora_weights) if meta.get("init") is None
                                           else meta["init"], "rank": cfg.r * 2}
    else:  # the vocabulary is never resized here, so no full embedding copies in the adapter
        model.save_pretrained(str(tmp), save_embedding_layers=False, state_dict=state_dict)
    meta.update({"file": "adapter_model.safetensors", "config": "adapter_config.json", "peft_type": peft_type})
    return meta


# ---- load -------------------------------------------------------------------------------------------------------

def check_adapter_fits(adapter_dir: os.PathLike, base_model: nn.Module) -> Optional[dict]:
    """Validate an adapter folder against a base before loading it; returns its manifest (None if absent)."""
    from ..tuners.state_tuning import STATE_FILE, check_state_version, check_states, load_state_any, model_sizes

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter folder")
    manifest = read_manifest(adapter_dir)
    has_lora = (adapter_dir / "adapter_config.json").is_file()
    has_state = (adapter_dir / STATE_FILE).is_file()
    if not has_lora and not has_state:
        raise AdapterMismatchError(f"{adapter_dir}: neither adapter_config.json (LoRA / MiSS) nor {STATE_FILE} (state) "
                                   f"found; not an adapter folder")
    if manifest is not None:
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise AdapterMismatchError(f"{adapter_dir}/{MANIFEST}: format_version differs: the folder has "
                                       f"{manifest['format_version']}, this rwkv-peft reads up to {FORMAT_VERSION}")
        check_sizes(manifest.get("base", {}), base_model, str(adapter_dir))
    if has_state:
        states, meta = load_state_any(adapter_dir / STATE_FILE)
        check_state_version(meta.get("architecture"), base_model, where=str(adapter_dir / STATE_FILE))
        check_states(states, model_sizes(base_model), where=str(adapter_dir / STATE_FILE))
    if has_lora:
        _check_lora_shapes(adapter_dir, base_model)
    return manifest


def _miss_block_shape(cfg: dict, in_f: int, out_f: int):
    """The ``miss_block`` shape peft's MiSS layer has for a Linear [out_f, in_f] under adapter_config ``cfg``."""
    r, init = int(cfg.get("r", 64)), cfg.get("init_weights", True)
    if init == "bat":
        return [out_f // r, r, r]
    if init == "mini":
        return [r, int(cfg.get("mini_r", 1))]
    return [r, out_f]


def _check_lora_shapes(adapter_dir: Path, base_model: nn.Module) -> None:
    """Each ``lora_A`` [r, in] / ``lora_B`` [out, r] against the base module's in/out features; each MiSS
    ``miss_block`` against the shape its config gives that module."""
    from safetensors import safe_open

    from ..tuners.state_tuning import unwrap
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        return
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterMismatchError(f"{adapter_dir}/adapter_config.json: cannot read ({e})") from e
    modules = dict(unwrap(base_model).named_modules())
    with safe_open(str(f), framework="pt") as fh:
        for key in fh.keys():
            is_miss = key.endswith(".miss_block")
            if ".lora_A." not in key and ".lora_B." not in key and not is_miss:
                continue
            name = key[:-len(".miss_block")] if is_miss else key.split(".lora_")[0]
            for prefix in ("base_model.model.",):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            mod = modules.get(name)
            if mod is None:
                import re
                m = re.match(r"model\.blocks\.(\d+)\.", name)
                L = unwrap(base_model).config.num_hidden_layers
                if m and int(m.group(1)) >= L:
                    raise AdapterMismatchError(f"{adapter_dir}: num_hidden_layers differs: the adapter has a layer "
                                               f"{m.group(1)}, the base has {L} layers")
                raise AdapterMismatchError(f"{adapter_dir}: the adapter targets '{name}', which the base does not have")
            shape = fh.get_slice(key).get_shape()
            in_f = getattr(mod, "in_features", None)
            out_f = getattr(mod, "out_features", None)
            if is_miss:
                if in_f is not None and out_f is not None and list(shape) != _miss_block_shape(cfg, in_f, out_f):
                    raise AdapterMismatchError(f"{adapter_dir}: {name} differs: the adapter's MiSS block is "
                                               f"{list(shape)}, a [{out_f} x {in_f}] base layer needs "
                                               f"{_miss_block_shape(cfg, in_f, out_f)}")
                continue
            if ".lora_A." in key and in_f is not None and shape[1] != in_f:
                raise AdapterMismatchError(f"{adapter_dir}: {name} in_features differs: the adapter has {shape[1]}, "
                                           f"the base has {in_f}")
            if ".lora_B." in key and out_f is not None and shape[0] != out_f:
                raise AdapterMismatchError(f"{adapter_dir}: {name} out_features differs: the adapter has "
                                           f"{shape[0]}, the base has {out_f}")


def load_adapter(base_model: nn.Module, adapter_dir: os.PathLike, is_trainable: bool = False,
                 adapter_name: str = "default"):
    """Load LoRA (or MiSS) and/or state from one folder (or a Hub repository id) onto ``base_model`` (a plain model of any version); returns
    the model (a ``PeftModel`` when the folder holds LoRA or MiSS). Version and sizes are checked against the base first."""
    from ..tuners.state_tuning import (
        STATE_FILE, config_for, load_shift_states, load_state_any, mark_states_trainable, set_shift_states,
        set_states, shift_mixes, unwrap,
    )

    from ..paths import local_or_hub
    adapter_dir = local_or_hub(adapter_dir)  # a folder, or a Hub repository id (through the HF cache)
    from peft import PeftModel
    if isinstance(base_model, PeftModel):
        raise ValueError("load_adapter takes the plain base model (load_base_model(...)), not a PeftModel that "
                         "already has an adapter; use merge_adapters to combine several adapters")
    manifest = check_adapter_fits(adapter_dir, base_model)
    model = base_model
    if (adapter_dir / "adapter_config.json").is_file():
        from ..quiet import peft_wrapping
        with peft_wrapping():
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name,
                                              is_trainable=is_trainable)
        base = model.get_base_model()
        lora_meta = dict((manifest or {}).get("lora") or {})
        if lora_meta:
            converted = lora_meta.pop("converted_to_plain_lora", None)
            if converted:  # saved as a plain LoRA of rank 2r on the original base
                lora_meta.update(init=None, r=converted["rank"], converted_from=converted["from"])
            base._rwkv_lora = {k: v for k, v in lora_meta.items() if k not in ("file", "config", "peft_type")}
        miss_meta = (manifest or {}).get("miss")
        if miss_meta:
            base._rwkv_miss = {k: v for k, v in miss_meta.items() if k not in ("file", "config", "peft_type")}
    if (adapter_dir / STATE_FILE).is_file():
        states, meta = load_state_any(adapter_dir / STATE_FILE)
        set_states(model, states, meta.get("architecture"), where=str(adapter_dir / STATE_FILE))
        shifts = load_shift_states(adapter_dir / STATE_FILE)
        if shifts is not None:  # full-state tuning
            set_shift_states(model, shifts, where=str(adapter_dir / STATE_FILE))
        for p in (m.time_state for m in _mixes(model)):
            p.requires_grad_(is_trainable)
        for p in (m.shift_state for pair in (shift_mixes(model) if shifts is not None else []) for m in pair):
            p.requires_grad_(is_trainable)
        cfg = config_for(model, init=str(adapter_dir / STATE_FILE), full=shifts is not None)
        if is_trainable:
            unwrap(model)._rwkv_state_tuning = cfg
            mark_states_trainable(model)
        else:
            unwrap(model)._rwkv_loaded_state = cfg
    if not is_trainable:
        model.eval()
    return model


def _mixes(model):
    from ..tuners.state_tuning import time_mixes
    return time_mixes(model)


# ---- summary ------------------------------------------------------------------------------------------------------

def _numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:  # bitsandbytes 4-bit: packed storage
        n = 1
        for d in qs.shape:
            n *= int(d)
        return n
    return p.numel()


def trainable_summary(model: nn.Module) -> str:
    """One line per group (LoRA, MiSS, state, modules_to_save, other) with trainable counts, then the total."""
    groups = {"lora": 0, "miss": 0, "state": 0, "modules_to_save": 0, "other": 0}
    total = trainable = 0
    for name, p in model.named_parameters():
        n = _numel(p)
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        if "lora_" in name:
            groups["lora"] += n
        elif "miss_block" in name:
            groups["miss"] += n
        elif name.endswith("time_state"):
            groups["state"] += n
        elif "modules_to_save" in name:
            groups["modules_to_save"] += n
        else:
            groups["other"] += n
    parts = [f"{k}: {v:,}" for k, v in groups.items() if v]
    pct = 100.0 * trainable / max(total, 1)
    return (f"trainable parameters: {trainable:,} of {total:,} ({pct:.4f}%)"
            + (f" [{', '.join(parts)}]" if parts else ""))
