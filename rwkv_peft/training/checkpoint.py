"""Checkpoints and resume, and the run's final outputs.

A checkpoint (``<output>/checkpoints/step-NNNNNNN/``) holds the trainable weights (adapter, state, or all weights
in a full fine-tune), the optimizer, scheduler and RNG states (``accelerator.save_state``),
``trainer_state.json`` (step, losses, evals) and a ready-to-use ``adapter/``; it is written to a temporary folder
and renamed into place. Resuming loads all of that, so the resumed run continues bit for bit as the uninterrupted
one would have. Writing a checkpoint changes nothing in the run (see :func:`training_state_kept`).

FSDP2 and DeepSpeed save the model and optimizer their own way inside ``save_state`` (FSDP2: every process writes
its shard with torch.distributed.checkpoint, the frozen base included; DeepSpeed: its engine checkpoint, here
without the frozen parameters); the hooks below then stand aside. The adapter and the final outputs are written
from whole weights (:func:`whole_weights`), which every process helps gather.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .setup import CHECKPOINTS, STATE_FILE, TrainingSetupError, base_model, find_checkpoints
from .step import TrainingError


def trainable_state_dict(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_snapshot() -> dict:
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        s["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def rng_restore(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "numpy" in s:
        import numpy as np
        np.random.set_state(s["numpy"])
    if "cuda" in s:
        torch.cuda.set_rng_state_all(s["cuda"])


@contextlib.contextmanager
def training_state_kept(model):
    """Undo what saving an adapter may change: peft's PiSSA/OLoRA conversion freezes parameters (the learned
    state included) and puts the model in eval mode."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable.get(n, p.requires_grad))
        for n, m in model.named_modules():
            m.training = modes.get(n, m.training)


def engine_saves(acc) -> bool:
    """FSDP / DeepSpeed: ``save_state`` and ``load_state`` handle the model and optimizer themselves."""
    return acc.distributed_type in ("FSDP", "DEEPSPEED")


def whole_weights(acc, model, trainable_only: bool) -> Optional[Dict[str, torch.Tensor]]:
    """The model's state dict with whole tensors, on the main process (empty elsewhere), where its parameters are
    sharded: FSDP2, DeepSpeed ZeRO-3 (``accelerator.get_state_dict``; needs
    ``stage3_gather_16bit_weights_on_model_save``). None where they are whole already. Every process must call it."""
    if getattr(acc, "is_fsdp2", False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)
    if acc.distributed_type == "DEEPSPEED" and acc.state.deepspeed_plugin.zero_stage == 3:
        return acc.get_state_dict(model)
    return None


def install_state_hooks(acc) -> None:
    """``accelerator.save_state`` / ``load_state`` write and read only the trainable weights (not under FSDP or
    DeepSpeed, which save the model and optimizer themselves)."""
    def save_hook(models, weights, output_dir):
        if acc.is_main_process and not engine_saves(acc):
            from safetensors.torch import save_file
            for i, m in enumerate(models):
                save_file(trainable_state_dict(acc.unwrap_model(m)),
                          os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file
        for i, m in enumerate(models):
            sd = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            target = acc.unwrap_model(m)
            params = {n: p for n, p in target.named_parameters() if p.requires_grad}
            if set(sd) != set(params):
                raise TrainingSetupError(f"{input_dir}: the checkpoint's trainable weights do not match this "
                                         f"recipe's method (missing {sorted(set(params) - set(sd))[:3]}, extra "
                                         f"{sorted(set(sd) - set(params))[:3]})")
            with torch.no_grad():
                for n, t in sd.items():
                    params[n].copy_(t)
        models.clear()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def resume(acc, folder: Path, world: int, batch_size: int, say):
    """Load a checkpoint into the prepared objects; returns (step, history)."""
    info = json.loads((folder / STATE_FILE).read_text())
    acc.load_state(str(folder), **engine_kwargs(acc, "load"))
    if info.get("world_size", world) != world or info.get("batch_size", batch_size) != batch_size:
        say(f"note: the checkpoint was made with {info.get('world_size')} process(es) x batch "
            f"{info.get('batch_size')}; the data order from here differs from the original run")
    say(f"resumed from {folder} at step {info['step']}")
    return int(info["step"]), {"losses": info["losses"], "evals": info["evals"], "tokens": info.get("tokens", 0)}


def save_checkpoint(acc, model, out: Path, at: int, info: dict, keep: int, save_adapter, say,
                    rng: Optional[dict] = None) -> Path:
    """Write ``checkpoints/step-<at>`` atomically; ``rng`` is the RNG as it was at the step boundary (an
    interrupt may come mid-step). ``save_adapter(model, folder)`` writes the ready-to-use adapter."""
    root, main = out / CHECKPOINTS, acc.is_main_process
    dst, tmp = root / f"step-{at:07d}", root / f".step-{at:07d}.tmp"
    acc.wait_for_everyone()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    now = rng_snapshot() if rng is not None else None
    if rng is not None:
        rng_restore(rng)
    acc.save_state(str(tmp), **engine_kwargs(acc, "save"))
    if now is not None:
        rng_restore(now)
    acc.wait_for_everyone()
    weights = whole_weights(acc, model, trainable_only=True) if save_adapter is not None else None
    if main:
        if save_adapter is not None:
            unwrapped = acc.unwrap_model(model)
            with training_state_kept(unwrapped):
                save_adapter(unwrapped, str(tmp / "adapter"), state_dict=weights)
        (tmp / STATE_FILE).write_text(json.dumps({"step": at, **info}, indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        for old in find_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return dst


def engine_kwargs(acc, what: str) -> dict:
    """DeepSpeed: checkpoints without the frozen parameters (the base stays where the recipe loads it from)."""
    if acc.distributed_type != "DEEPSPEED":
        return {}
    return {"exclude_frozen_parameters": True} if what == "save" else {"load_module_strict": False}


def save_final(acc, model, save_adapter, tokenizer, out: Path, say) -> Optional[Path]:
    """``<out>/adapter`` (a method run) or ``<out>/model`` (a full fine-tune), with the tokenizer beside it.
    Every process calls it (under FSDP2 / DeepSpeed they gather the weights together); the main one writes."""
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    weights = whole_weights(acc, model, trainable_only=save_adapter is not None)
    if save_adapter is not None:
        return write_final(acc, out / "adapter", lambda d: save_adapter(unwrapped, d, state_dict=weights),
                           tokenizer, say)
    return write_final(acc, out / "model", lambda d: base_model(unwrapped).save_pretrained(d, state_dict=weights),
                       tokenizer, say)


def write_final(acc, dst: Path, write, tokenizer, say) -> Optional[Path]:
    from ..convert import atomic_path
    if not acc.is_main_process:
        return None
    with atomic_path(dst, is_dir=True) as tmp:
        write(str(tmp))
        try:
            tokenizer.save_pretrained(str(tmp))
        except Exception as e:  # noqa: BLE001 - the weights are what matter
            say(f"note: the tokenizer was not saved beside the weights ({type(e).__name__}: {e})")
    say(f"saved {dst}")
    return dst


def push_to_hub(recipe, folder: Path, say) -> None:
    """The run's output to ``hub.repo_id`` as ``rwkv-peft publish`` uploads it: the same model card, the same
    files (``rwkv_peft.hub.publish``)."""
    from ..hub import publish
    try:
        say(publish(folder, recipe.hub.repo_id, private=recipe.hub.private))
    except Exception as e:  # noqa: BLE001 - the run's outputs are saved; say so and how to finish
        raise TrainingError(f"training finished and {folder} is saved, but pushing to the hub failed "
                            f"({type(e).__name__}: {e}); publish it later") from None
