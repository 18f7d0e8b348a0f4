"""Merging adapters into a base: LoRA and MiSS (peft's ``merge_and_unload``), states (into ``att.time_state``), several
adapters combined with weights (peft's ``add_weighted_adapter``; states by weighted sum).

Rules:
- merges are computed on full-precision weights. A model trained on a quantized base is merged into the
  ORIGINAL weights, reloaded in full precision from the path recorded at load time (and in the adapter
  manifest). Merging into re-quantized 4/8-bit weights is lossy and only happens with ``allow_lossy=True``.
- an adapter that does not fit the base fails before anything is merged, naming the dimension that differs.
- several LoRA adapters: ``combine`` is one of peft's combination types (linear, cat, svd, ties, ties_svd,
  dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd); "linear"
  needs equal ranks ("cat" or "svd" mix ranks); TIES / DARE / magnitude pruning use ``density`` in (0, 1].
  As peft defines them, "linear", "ties", "dare_*" and "magnitude_prune" combine the A factors and the B factors
  separately (each weighted by sqrt(weight * scaling)), not the delta weights B A; the "*_svd" types apply TIES /
  DARE / pruning to the delta weights (the published definitions) and keep the top ``max(r)`` singular directions;
  "cat" is the exact weighted sum of the deltas. The combined delta carries scaling 1 (each adapter's scaling,
  rsLoRA's included, is already folded in). DoRA adapters are not combined (peft would drop their magnitudes).
- several states: ``S = sum_i w_i S_i`` per layer with the same weights (see
  ``rwkv_peft.tuners.state_tuning.combine_states``). A state replaces a state the base already holds.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .errors import RWKVPeftError
from .methods.adapter_io import AdapterMismatchError, check_adapter_fits, read_manifest, save_adapter
from .tuners.state_tuning import (
    STATE_FILE, combine_states, load_shift_states, load_state_any, set_shift_states, set_states, unwrap,
)

__all__ = ["MergeError", "AdapterMismatchError", "merge_model", "merge_adapters", "save_merged", "COMBINATIONS"]

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")


class MergeError(RWKVPeftError, ValueError):
    """A merge that cannot be done as asked (the message says why and what to do)."""


def _is_peft(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def merge_model(model: nn.Module, allow_lossy: bool = False, dtype: Union[str, torch.dtype] = "float32"):
    """The merged plain ``RWKV7ForCausalLM`` of a model being trained (LoRA and/or state attached).

    On a quantized base the adapter is saved to a temporary folder and merged into the base reloaded in full
    precision (``dtype``) from its recorded path; with ``allow_lossy=True`` it is merged into the quantized
    weights in place instead (peft re-quantizes them).
    """
    from .methods.loading import is_quantized, load_base_model, load_info

    if not is_quantized(model):
        if _is_peft(model):
            model = model.merge_and_unload()
        return _finish(model)
    if allow_lossy:
        return _finish(model.merge_and_unload() if _is_peft(model) else model)
    info = load_info(model)
    if not info.get("path") or not Path(info["path"]).exists():
        raise MergeError("this model has a quantized base whose full-precision checkpoint is unknown or gone "
                         f"({info.get('path')!r}); merge with merge_adapters(base_path, adapter_dir) or pass "
                         "allow_lossy=True to merge into the re-quantized weights")
    tmp = Path(tempfile.mkdtemp(prefix="rwkv-peft-merge-"))
    try:
        save_adapter(model, tmp / "adapter")
        full = load_base_model(info["path"], dtype=dtype)
        return merge_adapters(full, [tmp / "adapter"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for attr in ("_rwkv_state_tuning", "_rwkv_lora", "_rwkv_miss", "_rwkv_lora_initial", "_rwkv_loaded_state"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model.eval()


def _parse_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    if weights is None:
        return [1.0] * n if n == 1 else [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{n} adapters but {len(weights)} weights")
    return weights


def merge_adapters(base: Union[str, os.PathLike, nn.Module, None], adapters: Sequence[Union[str, os.PathLike]],
                   weights: Optional[Sequence[float]] = None, combine: str = "linear",
                   density: Optional[float] = None, dtype: Union[str, torch.dtype] = "float32",
                   seed: int = 0) -> nn.Module:
    """Load ``base`` in full precision and merge one or more adapter folders (or state files) into it.

    base: a checkpoint path (``.pth`` / HF / fla folder), an unquantized model, or None to use the base path
        recorded in the first adapter's manifest.
    adapters: adapter folders (LoRA and/or state), or runtime state ``.pth`` / ``state_adapter.safetensors``.
    weights: one per adapter (default 1 for one adapter, 1/n each for n). They weight the LoRA combination
        and the state sum alike; adapters without LoRA (or without state) drop out of that part.
    Returns the merged plain model (with ``config.use_initial_state`` when a state was merged).
    """
    from .methods.loading import is_quantized, load_base_model

    if not adapters:
        raise MergeError("no adapter given")
    if combine not in COMBINATIONS:
        raise MergeError(f"combine {combine!r}: expected one of {', '.join(COMBINATIONS)}")
    adapters = [Path(a) for a in adapters]
    for a in adapters:
        if not a.exists():
            raise FileNotFoundError(f"{a}: no such adapter folder or state file")
    weights = _parse_weights(weights, len(adapters))
    if density is not None and not 0.0 < float(density) <= 1.0:  # DARE at density 0 divides by 0 (NaN weights)
        raise MergeError(f"density {density}: expected the fraction of values kept, in (0, 1]")
    if base is None:  # the base the first adapter records (resolved as rwkv_peft.paths.adapter_base says)
        from .paths import BaseNotFoundError, adapter_base
        try:
            base = adapter_base(adapters[0])[1]
        except BaseNotFoundError as e:
            raise MergeError(f"{e}; pass the base (--base)") from None
    elif isinstance(base, (str, os.PathLike)):  # a path spec: assets:..., ~/...
        from .paths import resolve_path
        base = resolve_path(os.fspath(base))
    if isinstance(base, nn.Module):
        model = base
        if is_quantized(model):
            raise MergeError("the base passed in is quantized; merge into the full-precision checkpoint "
                             "(pass its path) so the merge is not lossy")
    else:
        model = load_base_model(base, dtype=dtype)

    lora_dirs, lora_w, states, state_w, state_paths = [], [], [], [], []
    for a, w in zip(adapters, weights):
        if a.is_dir():
            check_adapter_fits(a, model)
            if (a / "adapter_config.json").is_file():
                lora_dirs.append(a)
                lora_w.append(w)
            if (a / STATE_FILE).is_file():
                states.append(load_state_any(a / STATE_FILE)[0])
                state_w.append(w)
                state_paths.append(a / STATE_FILE)
        else:
            from . import versions
            from .tuners.state_tuning import check_state_version, check_states, model_sizes
            st, meta = load_state_any(a, versions.of(unwrap(model)).name)
            check_state_version(meta.get("architecture"), model, where=str(a))
            check_states(st, model_sizes(model), where=str(a))
            states.append(st)
            state_w.append(w)
            state_paths.append(a)

    if lora_dirs:
        model = _merge_loras(model, lora_dirs, lora_w, combine, density, seed)
    if states:
        merged = states[0] if len(states) == 1 and state_w[0] == 1.0 else combine_states(states, state_w)
        set_states(model, merged)
        shifts = [load_shift_states(p) for p in state_paths]
        if any(s is not None for s in shifts):  # full-state adapters: their shift states combine the same way
            if any(s is None for s in shifts):
                raise MergeError("some of the states to merge hold token-shift states (full-state tuning) and some "
                                 "do not; merge states of one kind")
            set_shift_states(model, [tuple(sum(float(w) * s[i][j] for s, w in zip(shifts, state_w))
                                           for j in range(2)) for i in range(len(shifts[0]))])
    return _finish(model)


def _merge_loras(model, dirs: List[Path], weights: List[float], combine: str, density, seed: int):
    from peft import PeftModel

    from .quiet import peft_wrapping

    if len(dirs) == 1 and weights[0] == 1.0:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(model, str(dirs[0]))
        return peft_model.merge_and_unload()
    not_lora = [str(d) for d in dirs if _peft_type(d) != "LORA"]
    if not_lora:
        raise MergeError(f"only LoRA adapters can be combined with weights (peft's add_weighted_adapter); "
                         f"{', '.join(not_lora)} is not LoRA (MiSS): merge it on its own with weight 1")
    names = [f"adapter{i}" for i in range(len(dirs))]
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(d), adapter_name=name)
    if combine in NEEDS_DENSITY and density is None:
        density = 0.5
    ranks = {peft_model.peft_config[n].r for n in names}
    if combine == "linear" and len(ranks) > 1:
        raise MergeError(f"combine 'linear' needs adapters of equal rank; the ranks are {sorted(ranks)} "
                         f"(use --combine cat or svd)")
    if any(peft_model.peft_config[n].modules_to_save for n in names):
        raise MergeError("adapters with modules_to_save cannot be combined with weights (peft refuses it); merge "
                         "them one at a time")
    if any(peft_model.peft_config[n].use_dora for n in names):
        raise MergeError("DoRA adapters cannot be combined with weights: peft's add_weighted_adapter combines only "
                         "their A and B matrices and drops each adapter's learned magnitude vector; merge a DoRA "
                         "adapter on its own with weight 1")
    kwargs = {"density": density} if combine in NEEDS_DENSITY else {}
    if combine.endswith("svd"):
        kwargs["svd_rank"] = max(ranks)
    torch.manual_seed(seed)  # DARE drops at random
    try:
        peft_model.add_weighted_adapter(names, weights, "combined", combination_type=combine, **kwargs)
    except ValueError as e:
        raise MergeError(f"combining {len(dirs)} adapters with {combine!r} failed: {e}") from e
    _unit_scaling(peft_model, "combined")
    peft_model.set_adapter("combined")
    return peft_model.merge_and_unload(adapter_names=["combined"])


def _peft_type(adapter_dir: Path) -> str:
    import json
    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type", "LORA"))
    except (OSError, ValueError) as e:
        raise MergeError(f"{adapter_dir}/adapter_config.json: cannot read ({e})") from None


def _unit_scaling(peft_model, name: str) -> None:
    """Give the combined adapter the scaling 1 peft means it to have: it sets ``lora_alpha = r`` because each
    adapter's scaling is already folded into the combined A, B, but keeps the first adapter's ``use_rslora``,
    which makes that scaling ``r / sqrt(r) = sqrt(r)`` (the whole merged delta of rsLoRA adapters times sqrt(r))."""
    from peft.tuners.lora import LoraLayer

    peft_model.peft_config[name].use_rslora = False
    for m in peft_model.modules():
        if isinstance(m, LoraLayer) and name in m.scaling:
            m.scaling[name] = 1.0
            m.use_rslora[name] = False


# ---- writing --------------------------------------------------------------------------------------------------------

def save_merged(model: nn.Module, out: Union[str, os.PathLike], dtype: Optional[Union[str, torch.dtype]] = None,
                tokenizer: Optional[bool] = None) -> str:
    """Write a merged model as a BlinkDL ``.pth`` (``out`` ends in .pth) or as our HF folder; atomic."""
    from .convert import save_hf_folder, save_pth, to_blinkdl
    from .methods.loading import is_quantized, torch_dtype

    model = unwrap(model)
    if _is_peft(model) or any("lora_" in n or "miss_block" in n for n, _ in model.named_parameters()):
        raise MergeError("the model still has LoRA / MiSS layers; merge it first (merge_model / merge_adapters)")
    if is_quantized(model):
        raise MergeError("the model is quantized; .pth and HF exports are written from full-precision weights "
                         "(merge_model reloads the base in full precision)")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        dt = torch_dtype(dtype)
        sd = {k: v.to(dt) for k, v in sd.items()}
    config = model.config
    config.use_initial_state = any(k.endswith("att.time_state") for k in sd)
    config.use_initial_shift = any(k.endswith("shift_state") for k in sd)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    out = Path(out)
    if out.suffix == ".pth":
        save_pth(to_blinkdl(sd, config), out)
        return f"{out} (BlinkDL .pth): {config.describe()}" + (" + initial state" if config.use_initial_state else "")
    save_hf_folder(config, sd, out, tokenizer=tokenizer)
    return f"{out} (Hugging Face folder): {config.describe()}" + (" + initial state" if config.use_initial_state else "")
