"""MiSS (Matrix Shard Sharing) on every RWKV version through ``peft`` (``MissConfig`` / ``MissModel``; never
re-implemented here). Targets use the same per-version presets as LoRA (``rwkv_peft.versions``).

MiSS trains one small shared block per wrapped ``nn.Linear`` ``W [out, in]``: the input is cut into shards of
``r`` features, the shards are summed, and the sum goes through the block. Its variants (peft's
``init_weights``):

    balance  (peft's default, ``init_weights=True``)  block [r, out]        any in_features >= r
    bat      (``init_weights="bat"``)                  block [out/r, r, r]  in and out divisible by r; the update
             depends on W (non-linear across shards), costs a weight-sized copy per forward
    mini     (``init_weights="mini"``)                 block [r, mini_r]    out divisible by mini_r; fewest params

peft's MiSS has no per-module ranks (no ``rank_pattern``) and cannot share a model with a LoRA adapter (peft's
mixed-adapter model does not take MiSS), so a recipe enables one of the two. State tuning stacks with it as
with LoRA.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from .. import versions
from ..errors import RWKVPeftError
from ..versions import Version
from .lora import _check_targets_exist, _get_peft_model, resolve_targets

VARIANTS = ("balance", "bat", "mini")
_INIT_WEIGHTS = {"balance": True, "bat": "bat", "mini": "mini"}


class MissFitError(RWKVPeftError, ValueError):
    """A MiSS rank (or mini_r) that does not fit a targeted module; the message names the module and its sizes."""


def variant_of(init_weights) -> str:
    """Our variant name of peft's ``MissConfig.init_weights`` (True -> balance)."""
    return {"bat": "bat", "mini": "mini"}.get(init_weights if isinstance(init_weights, str) else "", "balance")


def miss_config(r: int = 64, dropout: float = 0.0, targets="default", variant: str = "balance",
                mini_r: Optional[int] = None, modules_to_save: Optional[Sequence[str]] = None,
                version: Version = versions.DEFAULT):
    from peft import MissConfig
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    if r < 1:
        raise ValueError(f"r={r}: the MiSS rank must be >= 1")
    if variant == "mini" and not mini_r:
        raise ValueError("variant 'mini' needs mini_r (the block's width along out_features)")
    if mini_r is not None and variant != "mini":
        raise ValueError(f"mini_r is used by variant 'mini' only (variant is {variant!r})")
    return MissConfig(
        r=r, miss_dropout=dropout, mini_r=mini_r or 1, target_modules=resolve_targets(targets, version),
        exclude_modules=list(version.never_targeted) or None, init_weights=_INIT_WEIGHTS[variant], bias="none",
        modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM",
    )


def targeted_modules(model: nn.Module, targets: Sequence[str], version: Version) -> List[str]:
    """Names of the modules peft wraps for ``targets`` (exact name or ``.``-suffix), minus the never-targeted."""
    excluded = version.never_targeted
    return [n for n, _ in model.named_modules()
            if any(n == t or n.endswith("." + t) for t in targets)
            and not any(n == x or n.endswith("." + x) for x in excluded)]


def check_fits(model: nn.Module, targets: Sequence[str], r: int, variant: str, mini_r: Optional[int],
               version: Version) -> None:
    """Each targeted module is a Linear whose sizes fit ``r`` (and ``mini_r``), as peft's MiSS layer needs."""
    modules = dict(model.named_modules())
    for name in targeted_modules(model, targets, version):
        m = modules[name]
        in_f, out_f = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if in_f is None or out_f is None:
            raise MissFitError(f"MiSS target {name!r} is a {type(m).__name__}; MiSS wraps Linear layers only")
        if r > in_f:
            raise MissFitError(f"MiSS r={r} does not fit {name} (in_features {in_f}): r must be <= in_features; "
                               f"lower r or leave this module out of targets")
        if variant == "bat" and (in_f % r or out_f % r):
            raise MissFitError(f"MiSS variant 'bat' with r={r} does not fit {name} [{out_f} x {in_f}]: both "
                               f"in_features and out_features must be divisible by r")
        if variant == "mini" and out_f % mini_r:
            raise MissFitError(f"MiSS variant 'mini' with mini_r={mini_r} does not fit {name} (out_features "
                               f"{out_f}): out_features must be divisible by mini_r")


def apply_miss(model: nn.Module, r: int = 64, dropout: float = 0.0, targets="default", variant: str = "balance",
               mini_r: Optional[int] = None, modules_to_save: Optional[Sequence[str]] = None):
    """Attach a MiSS adapter through ``peft.get_peft_model``; returns the ``PeftModel``.

    With state tuning, apply state tuning first (``apply_miss(apply_state_tuning(base))``): the states stay
    trainable here, as ``apply_lora`` keeps them.
    """
    from ..tuners.state_tuning import mark_states_trainable, state_tuning_config

    version = versions.of(model)
    cfg = miss_config(r, dropout, targets, variant, mini_r, modules_to_save, version)
    target_list = resolve_targets(targets, version)
    _check_targets_exist(model, target_list, version, method="MiSS")
    check_fits(model, target_list, r, variant, mini_r, version)
    peft_model = _get_peft_model(model, cfg)
    base = peft_model.get_base_model()
    base._rwkv_miss = {"r": r, "dropout": dropout, "targets": target_list, "variant": variant,
                       "mini_r": mini_r, "modules_to_save": list(modules_to_save or [])}
    if state_tuning_config(peft_model) is not None:
        mark_states_trainable(peft_model)
    return peft_model


def is_miss(model) -> bool:
    """Whether ``model`` is a ``PeftModel`` whose active adapter is MiSS."""
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return False
    name = model.active_adapter if isinstance(getattr(model, "active_adapter", None), str) else "default"
    c = cfg.get(name) or next(iter(cfg.values()))
    return str(getattr(c.peft_type, "value", c.peft_type)) == "MISS"
