"""Our state tuner inside TRL (and any other code that switches peft adapters or copies models).

A state adapter is the base model's own ``att.time_state`` parameters (and, with full-state tuning, the
``shift_state`` ones): peft does not know them, so ``PeftModel.disable_adapter()`` and ``set_adapter("ref")``,
which TRL's DPO and GRPO trainers use for their reference pass, would leave the *trained* state on. This module
makes the state follow the adapter:

* :func:`follow_adapter` (called by ``apply_state_tuning``) records the initial states the base had before state
  tuning (usually none) and hooks the RWKV backbone so that every forward runs on those base states while peft's
  adapters are disabled or another adapter than the state's own (``"default"``) is active;
* :func:`initial_state_disabled` does the same explicitly, for any model (with or without peft);
* :func:`reference_model` is the reference for a model without peft (state tuning alone, a full fine-tune): a
  frozen copy that *shares* every frozen weight with the policy and starts from the base states, for
  ``DPOTrainer(ref_model=...)``;
* :class:`RWKVAdapterCallback` makes a ``transformers`` / TRL trainer save what it trains as our adapter: the
  state beside peft's files in every checkpoint (so ``checkpoint-N`` loads with ``rwkv_peft.methods.load_adapter``
  and resumes with its state), and ``<output_dir>/adapter`` at the end (``save_adapter``'s folder).

Everything here survives ``copy.deepcopy`` (TRL's ``create_reference_model``): the hooks are plain functions of
the module they run on, and the recorded base states are copied with it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

INITIAL_STATE_NAMES = ("time_state", "shift_state")  # learned initial states (state / full-state tuning)
OWNER = "default"              # the peft adapter a state belongs to: TRL's reference adapter is "ref"
_BASE = "_rwkv_base_initial_states"  # on the backbone: {parameter name: the base's tensor} before state tuning
_COPIES = "_rwkv_adapter_initial_states"  # on the backbone: {peft adapter name: {parameter name: tensor}}
_OFF = "_rwkv_state_off"             # on the backbone: how many explicit `initial_state_disabled` are open
_SWAPPED = "_rwkv_state_swapped"     # on the backbone: what the forward pre-hook swapped out (restored after)
_HOOKED = "_rwkv_follows_adapter"


def backbone(model: nn.Module) -> nn.Module:
    """The RWKV stack (``RWKV<N>Model``) under peft, DDP and ``...ForCausalLM`` wrappers: every forward, TRL's
    fused log-prob forward included, goes through it."""
    from .state_tuning import unwrap
    m = unwrap(getattr(model, "module", model))
    prefix = getattr(m, "base_model_prefix", "")
    inner = getattr(m, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else m


def initial_state_params(model: nn.Module) -> List[Tuple[nn.Module, str, str]]:
    """``(module, attribute, name under the backbone)`` of every learned initial state the model has now."""
    out = []
    for name, m in backbone(model).named_modules():
        for attr in INITIAL_STATE_NAMES:
            if isinstance(m._parameters.get(attr), nn.Parameter):
                out.append((m, attr, f"{name}.{attr}" if name else attr))
    return out


def remember_base_states(model: nn.Module) -> None:
    """Record the initial states the base has before state tuning changes them (first call wins); a base without
    any records nothing (its reference runs from zeros)."""
    bb = backbone(model)
    if getattr(bb, _BASE, None) is None:
        setattr(bb, _BASE, {name: m._parameters[attr].detach().clone()
                            for m, attr, name in initial_state_params(model)})


def remember_states_for(model: nn.Module, adapter_name: str) -> None:
    """Record the current initial states as those of peft adapter ``adapter_name``: what the model runs from while
    that adapter is active. TRL's DPOTrainer copies a ``PeftModel``'s adapter as ``"ref"`` before training, its
    reference; :class:`RWKVAdapterCallback` gives that copy the state as it was then, so both parts of the
    reference are the adapter as training found it (a fresh adapter: the base)."""
    bb = backbone(model)
    copies = getattr(bb, _COPIES, None) or {}
    copies[adapter_name] = {name: m._parameters[attr].detach().clone() for m, attr, name in initial_state_params(bb)}
    setattr(bb, _COPIES, copies)


def _swap_out(bb: nn.Module, states: Optional[Dict[str, torch.Tensor]] = None
              ) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    """Put ``states`` (default: the base's, or none) in place of the learned ones; returns what to put back."""
    base: Dict[str, torch.Tensor] = states if states is not None else (getattr(bb, _BASE, None) or {})
    swapped = []
    for m, attr, name in initial_state_params(bb):
        p = m._parameters[attr]
        old = base.get(name)
        setattr(m, attr, None if old is None else nn.Parameter(old.to(p.device, p.dtype), requires_grad=False))
        swapped.append((m, attr, p))
    return swapped


def _swap_back(swapped) -> None:
    for m, attr, p in reversed(swapped):
        setattr(m, attr, p)


@contextlib.contextmanager
def initial_state_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (any wrapping) from the base's own initial states instead of the learned ones: what the
    reference pass of DPO / GRPO needs. The learned parameters are put back (the same objects) on exit."""
    bb = backbone(model)
    swapped = _swap_out(bb)
    setattr(bb, _OFF, getattr(bb, _OFF, 0) + 1)
    try:
        yield model
    finally:
        setattr(bb, _OFF, getattr(bb, _OFF, 1) - 1)
        _swap_back(swapped)


def states_to_run(bb: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """``None`` while the state's own peft adapter (``"default"``) is active, or when there is no peft. Otherwise
    the states to run from: the base's when peft's adapters are disabled (``disable_adapter()``), those recorded
    for the active adapter (``remember_states_for``), else the base's."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    layer = next((m for m in bb.modules() if isinstance(m, BaseTunerLayer)), None)
    if layer is None:
        return None
    active = list(layer.active_adapters)
    if not layer.disable_adapters and OWNER in active:
        return None
    copies = getattr(bb, _COPIES, None) or {}
    if not layer.disable_adapters and active and active[0] in copies:
        return copies[active[0]]
    return getattr(bb, _BASE, None) or {}


def _before_forward(module, args):
    if getattr(module, _OFF, 0) == 0 and getattr(module, _SWAPPED, None) is None:
        states = states_to_run(module)
        if states is not None:
            module.__dict__[_SWAPPED] = _swap_out(module, states)


def _after_forward(module, args, output):
    swapped = module.__dict__.pop(_SWAPPED, None)
    if swapped is not None:
        _swap_back(swapped)


def follow_adapter(model: nn.Module) -> nn.Module:
    """Record the base's initial states and make the learned ones step aside whenever peft's adapter is off
    (idempotent; called by ``apply_state_tuning``). Returns ``model``."""
    remember_base_states(model)
    bb = backbone(model)
    if not getattr(bb, _HOOKED, False):
        bb.register_forward_pre_hook(_before_forward)
        bb.register_forward_hook(_after_forward, always_call=True)
        setattr(bb, _HOOKED, True)
    return model


# ---- a reference model without peft ------------------------------------------------------------------------------

def reference_model(model: nn.Module) -> nn.Module:
    """A frozen reference for ``model`` when there is no peft adapter to switch off (state tuning alone, a full
    fine-tune): pass it as ``DPOTrainer(ref_model=...)``. Frozen weights are *shared* with ``model`` (no copy);
    trainable ones are copied as they are now (make it before training); the initial states are the base's.
    Make it before a trainer patches the model (TRL replaces ``forward`` on the instance)."""
    learned = {id(m._parameters[attr]) for m, attr, _ in initial_state_params(model)}
    memo = {id(p): p for p in model.parameters() if not p.requires_grad and id(p) not in learned}
    memo.update({id(b): b for b in model.buffers()})
    ref = copy.deepcopy(model, memo)
    _swap_out(backbone(ref))  # the base's states in place of the learned ones, for good
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


# ---- saving what a trainer trained as our adapter -----------------------------------------------------------------

def trained_model(model: nn.Module) -> nn.Module:
    """The model a trainer holds, without accelerate's wrappers (DDP, compiled)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_trained_adapter(model: nn.Module, out_dir: os.PathLike) -> Path:
    """``rwkv_peft.methods.save_adapter`` for a model a trainer holds: peft writes every adapter it carries, and
    TRL adds a frozen ``"ref"`` copy to a ``PeftModel`` it is given; only the trained one is kept."""
    from ..methods import save_adapter
    model = trained_model(model)
    out = save_adapter(model, out_dir)
    for name in list(getattr(model, "peft_config", {}) or {}):
        if name != getattr(model, "active_adapter", OWNER) and (out / name).is_dir():
            shutil.rmtree(out / name)
    return out


def save_state_beside(model: nn.Module, folder: os.PathLike) -> None:
    """Add our state file and manifest to a folder a trainer wrote (peft's adapter files or the model's weights):
    the folder then loads with ``load_adapter`` (LoRA + state, or the state) and resumes with its state."""
    from ..methods.adapter_io import MANIFEST
    from .state_tuning import STATE_FILE, state_tuning_config
    if state_tuning_config(trained_model(model)) is None:
        return
    folder = Path(folder)
    tmp = folder / ".rwkv_adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_trained_adapter(model, tmp)
        for name in (STATE_FILE, MANIFEST):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_state_from(model: nn.Module, folder: os.PathLike) -> bool:
    """Copy the state saved in ``folder`` (``save_state_beside`` / ``save_adapter``) into the model's learned
    state, in place (the optimizer keeps its parameters). False when the folder holds none."""
    from .state_tuning import STATE_FILE, read_state_file, set_states
    f = Path(folder) / STATE_FILE
    if not f.is_file():
        return False
    states, meta = read_state_file(f)
    set_states(trained_model(model), states, meta.get("architecture"), where=str(f))
    return True


def keep_states_trainable(model: nn.Module) -> None:
    """Undo what a trainer does to a state adapter it is handed: peft's ``add_adapter`` (TRL's DPO reference
    copy) freezes every parameter but the adapters', and TRL casts a quantized model's trainable parameters to
    bf16; the learned states train, in fp32."""
    from .state_tuning import mark_states_trainable, state_tuning_config
    model = trained_model(model)
    if state_tuning_config(model) is None:
        return
    mark_states_trainable(model)
    for m, attr, _ in initial_state_params(model):
        p = m._parameters[attr]
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def __getattr__(name: str):
    """``RWKVAdapterCallback`` is made on first use: ``apply_state_tuning`` imports this module, and importing
    transformers' trainer machinery costs about a second (a chat with a state has no use for it)."""
    if name == "RWKVAdapterCallback":
        globals()[name] = _adapter_callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter_callback_class():
    from transformers import TrainerCallback

    class RWKVAdapterCallback(TrainerCallback):
        """Save what a ``transformers`` / TRL trainer trains as our adapter.

        ``trainer = DPOTrainer(model, ..., callbacks=[RWKVAdapterCallback()])``: each ``checkpoint-N`` gets our state
        file and manifest beside what the trainer saved (it loads with ``load_adapter``; ``trainer.train(
        resume_from_checkpoint=True)`` restores the state too), and the end of training writes ``adapter_dir``
        (default ``<output_dir>/adapter``) with ``save_adapter``. ``adapter_dir=False`` skips the final save.
        """

        def __init__(self, adapter_dir=None):
            self.adapter_dir = adapter_dir
            self.saved: Optional[Path] = None

        def on_init_end(self, args, state, control, model=None, **kwargs):
            from .state_tuning import state_tuning_config
            if model is None or state_tuning_config(trained_model(model)) is None:
                return
            keep_states_trainable(model)
            if "ref" in (getattr(trained_model(model), "peft_config", None) or {}):
                remember_states_for(model, "ref")  # DPO's reference copy of the adapter: the state as it is now

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            keep_states_trainable(model)  # a resumed PeftModel reloads its adapter, which may freeze the rest again
            if state.global_step > 0:  # resumed: the trainer restored peft's weights, not ours
                load_state_from(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_save(self, args, state, control, model=None, **kwargs):
            if model is not None and state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    save_state_beside(model, folder)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None and self.adapter_dir is not False and state.is_world_process_zero:
                self.saved = save_trained_adapter(model, self.adapter_dir or Path(args.output_dir) / "adapter")

    return RWKVAdapterCallback
