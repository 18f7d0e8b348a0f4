"""LoRA and its variants on every RWKV version through ``peft`` (never re-implemented here): target presets
(per version, in ``rwkv_peft.versions``), DoRA, rsLoRA, PiSSA / OLoRA / Gaussian init, ``modules_to_save``;
PiSSA on a quantized base.

Module names of one RWKV-7 block (``model.blocks.N.``)::

    att.receptance  att.key  att.value  att.output          [C, C]   the time-mix projections
    att.{w,a,v,g}_lora.down / .up                           [D, C] / [C, D]  small decay/a/v/gate maps
    ffn.key [F, C]  ffn.value [C, F]                        the channel mix
plus ``head`` [V, C] (the output projection) and the norms ``ln1``/``ln2``/``att.ln_x``/``model.ln_out``.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from torch import nn

from .. import versions
from ..versions import Version

TARGET_PRESETS = versions.DEFAULT.lora_presets  # RWKV-7's; every version's: ``rwkv_peft.versions``
VARIANTS = ("lora", "dora", "rslora")
INITS = (None, "pissa", "olora", "gaussian")
# inits that move part of the base weight into the adapter: the adapter alone is not a delta on the base
MUTATING_INITS = ("pissa", "olora")


def resolve_targets(targets: Union[str, Sequence[str]], version: Version = versions.DEFAULT) -> List[str]:
    """A preset name ("default", "attention", "ffn", "all") or an explicit list of module names/suffixes."""
    presets = version.lora_presets
    if isinstance(targets, str):
        if targets in presets:
            return list(presets[targets])
        if "," in targets:
            return [t.strip() for t in targets.split(",") if t.strip()]
        raise ValueError(f"targets {targets!r}: expected a preset ({', '.join(presets)}) or a list of "
                         f"module names such as {presets['default']}")
    out = [str(t) for t in targets]
    if not out:
        raise ValueError("targets: empty list")
    return out


def _check_targets_exist(model: nn.Module, targets: Iterable[str], version: Version, method: str = "LoRA") -> None:
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"{method} target {t!r} matches no module of the model; {version.title} modules are e.g. "
                             f"{version.lora_presets['all'][:8]} (presets: {', '.join(version.lora_presets)})")


def pattern_matches(pattern: str, name: str) -> bool:
    """peft's rule for a ``rank_pattern`` / ``alpha_pattern`` key: a regex that matches the whole module name or
    its tail after a ``.`` (``att.key``, ``blocks.0.att.key``, ``blocks\\.[01]\\.ffn\\.(key|value)``)."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def check_patterns(model: nn.Module, targets: Sequence[str], version: Version, patterns: Dict[str, object],
                   key: str) -> None:
    """Every key of ``patterns`` (``rank_pattern`` / ``alpha_pattern``) names at least one targeted module
    (peft only warns and ignores such a key)."""
    if not patterns:
        return
    from .miss import targeted_modules
    names = targeted_modules(model, targets, version)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{key} key {pattern!r} is not a valid regular expression ({e})") from None
        if not any(pattern_matches(pattern, n) for n in names):
            raise ValueError(f"{key} key {pattern!r} matches none of the targeted modules (e.g. "
                             f"{names[:3]}); a key is a module name or its tail, or a regular expression")


def lora_config(r: int = 16, alpha: float = 32, dropout: float = 0.0, targets="default", variant: str = "lora",
                modules_to_save: Optional[Sequence[str]] = None, init: Optional[str] = None,
                version: Version = versions.DEFAULT, rank_pattern: Optional[Dict[str, int]] = None,
                alpha_pattern: Optional[Dict[str, float]] = None):
    from peft import LoraConfig
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    if r < 1:
        raise ValueError(f"r={r}: the LoRA rank must be >= 1")
    for k, v in (rank_pattern or {}).items():
        if int(v) < 1:
            raise ValueError(f"rank_pattern {k!r}: {v}: a LoRA rank must be >= 1")
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_targets(targets, version), bias="none",
        exclude_modules=list(version.never_targeted) or None,
        use_dora=variant == "dora", use_rslora=variant == "rslora",
        init_lora_weights=True if init is None else init,
        modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM",
        rank_pattern={str(k): int(v) for k, v in (rank_pattern or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (alpha_pattern or {}).items()},
    )


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0, targets="default",
               variant: str = "lora", modules_to_save: Optional[Sequence[str]] = None, init: Optional[str] = None,
               rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None):
    """Attach a LoRA adapter through ``peft.get_peft_model``; returns the ``PeftModel``.

    PiSSA (or OLoRA) on a quantized base (peft refuses PiSSA there): the base is reloaded in full precision from
    the path it was loaded from, the init runs on those weights, the residual ``W - A0 B0`` is quantized as the
    base was (same ``BitsAndBytesConfig``), and the adapter ``A0, B0`` is attached to it - as peft documents for
    QPiSSA. The returned model is a new object; the one passed in should be dropped.

    rank_pattern / alpha_pattern: peft's per-module ranks / alphas, ``{module name, tail or regex: value}``
    (``{"blocks.0.att.key": 8, "ffn\\.(key|value)": 32}``); modules no key matches keep ``r`` / ``alpha``. A key
    that matches no targeted module is an error.
    """
    from ..tuners.state_tuning import mark_states_trainable, state_tuning_config
    from .loading import is_quantized

    version = versions.of(model)
    cfg = lora_config(r, alpha, dropout, targets, variant, modules_to_save, init, version, rank_pattern,
                      alpha_pattern)
    _check_targets_exist(model, cfg.target_modules, version)
    check_patterns(model, cfg.target_modules, version, cfg.rank_pattern, "rank_pattern")
    check_patterns(model, cfg.target_modules, version, cfg.alpha_pattern, "alpha_pattern")
    if init in MUTATING_INITS and is_quantized(model):
        peft_model = _init_on_full_precision(model, cfg)
    else:
        peft_model = _get_peft_model(model, cfg)
        if init in MUTATING_INITS:  # keep A0, B0 to save the adapter as a plain LoRA on the original base
            _remember_initial(peft_model)
    base = peft_model.get_base_model()
    base._rwkv_lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(cfg.target_modules),
                       "variant": variant, "init": init, "modules_to_save": list(modules_to_save or []),
                       **({"rank_pattern": dict(cfg.rank_pattern)} if cfg.rank_pattern else {}),
                       **({"alpha_pattern": dict(cfg.alpha_pattern)} if cfg.alpha_pattern else {})}
    if state_tuning_config(peft_model) is not None:
        mark_states_trainable(peft_model)
    return peft_model


def _get_peft_model(model: nn.Module, cfg):
    """``peft.get_peft_model`` without transformers' FutureWarning about peft's own read of
    ``is_gradient_checkpointing`` (see ``rwkv_peft.quiet.peft_wrapping``)."""
    from peft import get_peft_model

    from ..quiet import peft_wrapping
    with peft_wrapping():
        return get_peft_model(model, cfg)


def _remember_initial(peft_model) -> None:
    from peft import get_peft_model_state_dict
    # the vocabulary is never resized here; "auto" would look the base path up on the Hub (and warn offline)
    sd = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    peft_model.get_base_model()._rwkv_lora_initial = {
        k: v.detach().to("cpu", copy=True) for k, v in sd.items() if "lora_A" in k or "lora_B" in k}


def _init_on_full_precision(model: nn.Module, cfg):
    import copy

    from peft import set_peft_model_state_dict

    from .. import convert as conv
    from ..tuners.state_tuning import get_states, has_initial_state, set_states, state_tuning_config
    from .loading import load_base_model, load_info

    info = load_info(model)
    if not info.get("path"):
        raise ValueError(f"{cfg.init_lora_weights} on a quantized base needs the full-precision weights: load "
                         "the base with rwkv_peft.methods.load_base_model(path, quantization=...) so its path is "
                         "known, or apply it to a full-precision model (peft refuses PiSSA on 4-bit weights)")
    states = get_states(model) if has_initial_state(model) else None
    st_cfg = state_tuning_config(model)
    device_map = info.get("device_map")
    full = load_base_model(info["path"], dtype="float32")
    full_peft = _get_peft_model(full, copy.deepcopy(cfg))
    _remember_initial(full_peft)
    initial = full_peft.get_base_model()._rwkv_lora_initial
    residual = full_peft.unload()  # base weights with A0 B0 removed (W_res)
    tmp = Path(tempfile.mkdtemp(prefix="rwkv-peft-pissa-"))
    try:
        sd = {k: v.detach().cpu() for k, v in residual.state_dict().items()}
        conv.save_hf_folder(residual.config, sd, tmp / "residual", tokenizer=False)
        del full, full_peft, residual, sd
        qmodel = load_base_model(tmp / "residual", dtype=info["dtype"], quantization=info["quantization"],
                                 double_quant=info.get("double_quant", False), device_map=device_map)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    qmodel._rwkv_peft_load = dict(info)  # the original base, not the temporary residual
    qmodel.config._name_or_path = info["path"]
    qmodel.name_or_path = info["path"]
    plain = copy.deepcopy(cfg)
    plain.init_lora_weights = True
    peft_model = _get_peft_model(qmodel, plain)
    device = next(p.device for n, p in peft_model.named_parameters() if "lora_A" in n)
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in initial.items()})
    peft_model.peft_config["default"].init_lora_weights = cfg.init_lora_weights
    peft_model.get_base_model()._rwkv_lora_initial = initial
    if states is not None:
        set_states(peft_model, states)
    if st_cfg is not None:
        peft_model.get_base_model()._rwkv_state_tuning = st_cfg
    return peft_model
