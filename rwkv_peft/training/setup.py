"""Everything a run needs before its first step: the Accelerator, the tokenizer, the model with the recipe's
method(s), the optimizer and the schedule, and a check of the output folder. Each is a top-level function.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import RWKVPeftError
from ..recipe import Recipe, resolve_path

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


class TrainingSetupError(RWKVPeftError, ValueError):
    """The run cannot start as configured (bad input: exit code 2)."""


def make_accelerator(tc):
    """An Accelerator for ``train.mixed_precision``; without CUDA, ``cpu=True`` is what lets ``accelerate
    launch`` processes join as gloo ranks. A second run in one process (notebooks, tests) may change precision.
    """
    from accelerate import Accelerator
    cpu = not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu)
    except ValueError as e:
        from accelerate.state import AcceleratorState
        if "already been initialized" not in str(e) or AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu)


def lockstep(acc) -> bool:
    """FSDP2 and DeepSpeed: every forward and backward is a collective (parameters are gathered, gradients
    reduced), so every process must run the same number of them, in the same order, with the same shapes."""
    from accelerate.utils import DistributedType
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_engine(acc, recipe: Recipe) -> None:
    """Tell FSDP2 / DeepSpeed what the recipe decides (before ``prepare``); refuse what they cannot run here."""
    from accelerate.utils import DistributedType
    refuse_unsupported(acc, recipe)
    if acc.distributed_type == DistributedType.FSDP and acc.mixed_precision in ("bf16", "fp16"):
        acc.state.fsdp_plugin.mixed_precision_policy = fsdp2_precision(acc.mixed_precision)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config, recipe.train)


def refuse_unsupported(acc, recipe: Recipe) -> None:
    """FSDP1; PiSSA / OLoRA with sharded weights (their adapter is converted from the model's own weights)."""
    from accelerate.utils import DistributedType
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp and not getattr(acc, "is_fsdp2", False):
        raise TrainingSetupError("the accelerate config asks for FSDP1; rwkv-peft trains with FSDP2: set "
                                 "fsdp_version: 2 (see recipes/accelerate/fsdp2.yaml)")
    zero3 = acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3
    lora = recipe.method.lora
    if (fsdp or acc.distributed_type == DistributedType.DEEPSPEED) and recipe.method.kind == "state":
        raise TrainingSetupError("state tuning alone trains a few hundred thousand parameters: run it with DDP "
                                 "(accelerate launch --multi_gpu, recipes/accelerate/ddp.yaml), not FSDP or "
                                 "DeepSpeed")
    if (fsdp or zero3) and lora.enabled and lora.init in ("pissa", "olora"):
        raise TrainingSetupError(f"method.lora.init: {lora.init} is not supported with FSDP2 or DeepSpeed ZeRO-3 "
                                 f"(use DDP or ZeRO-2, or init: gaussian)")


def fsdp2_precision(mixed_precision: str):
    """16-bit weights for the compute, gradients reduced in fp32, inputs and outputs left as they are: the RWKV
    state carried between chunks and the loss stay fp32 (accelerate's own policy casts them to 16 bits)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=False)


def fill_deepspeed_config(ds: dict, tc) -> None:
    """The micro-batch and clipping from the recipe; DeepSpeed's own accumulation stays 1 (the loop accumulates
    ``train.grad_accum`` micro-batches and scales the loss itself)."""
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise TrainingSetupError("the DeepSpeed config sets gradient_accumulation_steps; use the recipe's "
                                 "train.grad_accum and leave it at 1 or auto")
    for key, value in (("train_micro_batch_size_per_gpu", tc.batch_size), ("gradient_accumulation_steps", 1),
                       ("gradient_clipping", tc.grad_clip or 0.0)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value


def load_tokenizer(mcfg, log=print):
    """The recipe's tokenizer: ``world``, a tokenizer folder, or the model folder's own."""
    spec = mcfg.tokenizer
    if spec is None:
        mpath = resolve_path(mcfg.path)
        spec = str(mpath) if mpath.is_dir() and (mpath / "tokenizer_config.json").is_file() else "world"
    if spec == "world":
        from ..tokenization import RWKVWorldTokenizer
        return RWKVWorldTokenizer()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(resolve_path(spec)))
    except Exception as e:  # noqa: BLE001
        raise TrainingSetupError(f"model.tokenizer: cannot load a tokenizer from {spec!r} "
                                 f"({type(e).__name__}: {e})") from None


def build_model(recipe: Recipe, device: Optional[torch.device] = None, log=print):
    """The recipe's base model (on ``device``; a quantized base is placed there as it loads) with its
    method(s) attached. Parameters that take no part in the loss are frozen (see ``freeze_unused``)."""
    from .. import methods
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    mcfg, meth = recipe.model, recipe.method
    device_map = None
    if device is not None:
        device_map = {"": device.index or 0} if device.type == "cuda" else device.type
    try:
        model = methods.load_base_model(str(resolve_path(mcfg.path)), dtype=mcfg.dtype,
                                        quantization=mcfg.quantization, double_quant=mcfg.double_quant,
                                        device_map=device_map)
    except CheckpointError as e:
        raise TrainingSetupError(f"model.path: {e}") from None
    if meth.lora.enabled:
        lo = meth.lora
        try:
            model = methods.apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets,
                                       variant=lo.variant, modules_to_save=lo.modules_to_save, init=lo.init,
                                       rank_pattern=lo.rank_pattern, alpha_pattern=lo.alpha_pattern)
        except ValueError as e:  # a target, rank_pattern or alpha_pattern key that names no module of this model
            raise TrainingSetupError(f"method.lora: {e}") from None
    if meth.state_tuning.enabled:
        init = meth.state_tuning.init
        model = methods.apply_state_tuning(model, init=init if init in ("zeros", "keep") else str(resolve_path(init)),
                                           full=meth.state_tuning.full)
    if meth.miss.enabled:  # after state tuning, which freezes every parameter but LoRA's; apply_miss keeps states
        mi = meth.miss
        try:
            model = methods.apply_miss(model, r=mi.r, dropout=mi.dropout, targets=mi.targets, variant=mi.variant,
                                       mini_r=mi.mini_r, modules_to_save=mi.modules_to_save)
        except ValueError as e:
            raise TrainingSetupError(f"method.miss: {e}") from None
    if meth.kind == "full" and mcfg.dtype != "float32":
        log(f"note: a full fine-tune keeps its weights in {mcfg.dtype}; float32 weights with "
            f"train.mixed_precision: bf16 train more reliably")
    freeze_unused(model)
    return model


def freeze_unused(model) -> List[str]:
    """Stop training what never reaches the loss: RWKV-7's layer 0 takes its value residual from itself, so its
    ``v0`` and ``v_lora`` (and any adapter on them) get no gradient, which would also stall DDP's all-reduce."""
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and ".blocks.0.att." in f".{name}" and (".v_lora." in name or name.endswith(".v0")):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under whichever name the installed transformers has:
    ``activation_checkpointing_enable`` (5.23+, where the old name warns) or ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def base_model(model):
    """The RWKV ...ForCausalLM inside wrappers (DDP, peft)."""
    m = model
    for _ in range(4):
        m = getattr(m, "module", m)
        if type(m).__name__.startswith("Peft") and hasattr(m, "base_model"):
            m = m.base_model
        if type(m).__name__ in ("LoraModel",) or (hasattr(m, "model") and not hasattr(m, "head")
                                                  and hasattr(getattr(m, "model"), "head")):
            m = m.model
        if hasattr(m, "head") and hasattr(m, "model"):
            return m
    return m


def param_groups(model, tc, state_lr: Optional[float]) -> List[Dict]:
    """AdamW groups: matrices decay; norms, biases, per-channel vectors and the learned state do not."""
    decay, no_decay, state = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(("time_state", "shift_state")):
            state.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [g for g in ({"params": decay, "weight_decay": tc.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0},
                          {"params": state, "weight_decay": 0.0, "lr": state_lr or tc.lr}) if g["params"]]
    if not groups:
        raise TrainingSetupError("the model has no trainable parameters (check the method section)")
    return groups


def make_optimizer(groups, tc):
    if tc.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)


def make_scheduler(optimizer, tc, total_steps: int):
    from transformers import get_scheduler
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(round((tc.warmup_ratio or 0) * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tc.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def find_checkpoints(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-")[1]))


def check_output(recipe: Recipe, main: bool) -> Optional[Path]:
    """Which checkpoint to resume from, after checking the output folder is fit to use."""
    out = recipe.output_dir
    ckpts = find_checkpoints(out / CHECKPOINTS)
    resume = recipe.train.resume
    if isinstance(resume, str):
        p = resolve_path(resume)
        if not (p / STATE_FILE).is_file():
            raise TrainingSetupError(f"train.resume: {resume} is not a checkpoint folder (no {STATE_FILE})")
        return p
    if resume:
        return ckpts[-1] if ckpts else None
    if ckpts and not recipe.output.overwrite:
        raise TrainingSetupError(f"{out} already has checkpoints from an earlier run ({ckpts[-1].name}): set "
                                 f"train.resume: true to continue it, output.overwrite: true to start afresh, or "
                                 f"another output.run_name")
    if ckpts and main:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return None


def check_hub_token(recipe: Recipe) -> None:
    if recipe.hub.push:
        from huggingface_hub import get_token
        if not get_token():
            raise TrainingSetupError("hub.push is true but there is no Hugging Face token: set HF_TOKEN or run "
                                     "`huggingface-cli login` (or set hub.push: false and publish later)")


def say_to(main: bool, log: Optional[Callable[[str], None]]) -> Callable[[str], None]:
    """What the run prints with: ``log`` or stderr, on the main process only."""
    import sys

    def say(msg: str) -> None:
        if main:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    return say
