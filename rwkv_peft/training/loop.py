"""The training loop on Accelerate: ``train(recipe)``.

One optimizer step takes ``train.grad_accum`` micro-batches of ``train.batch_size`` rows per process. The loss
is the mean cross-entropy over the step's trained tokens (every micro-batch is weighted by its token count).

Data order is ours, not a DataLoader's: epoch ``e`` shuffles the rows with seed ``train.seed + e``, each process
takes every ``world``-th row of that order, and the stream of micro-batches runs across epochs. The data
position is therefore just ``step * grad_accum`` micro-batches, which is what makes resume exact.

Checkpoints (``<output>/checkpoints/step-NNNNNNN/``) hold the trainable weights (adapter, state, or all weights
in a full fine-tune), the optimizer, scheduler and RNG states (``accelerator.save_state``) and
``trainer_state.json`` (step, losses, evals); each is written to a temporary folder and renamed into place.
Resuming (``train.resume``) loads all of that, so the resumed run continues bit for bit as the uninterrupted
one would have.

Long-context chunk mode runs each row ``chunk_len`` tokens at a time, carrying the RWKV state from chunk to
chunk. The gradient flows through the carried state for ``long_context.grad_chunks`` chunks; then the loss of
those chunks is back-propagated, their graph freed, and the state detached (truncated back-propagation through
time). ``grad_chunks: 1`` keeps the memory of one chunk; larger values trade memory for longer gradients.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..data import DataError
from ..data.packing import IGNORE, chunk_spans, collate, shifted_targets
from ..recipe import Recipe, resolve_path
from .logging import RunLogger, Throughput, format_seconds, plot_losses

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"


class TrainingSetupError(ValueError):
    """The run cannot start as configured (bad input: exit code 2)."""


class TrainingError(RuntimeError):
    """The run started and failed (exit code 1)."""


class TrainingDiverged(TrainingError):
    """A non-finite loss: the message names the step, the micro-batch and its rows."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved (its folder is ``checkpoint``) and the run can be resumed."""

    def __init__(self, checkpoint: Optional[Path]):
        super().__init__(str(checkpoint) if checkpoint else "")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Optional[Path]
    steps: int
    losses: List[float] = field(default_factory=list)        # train loss of every optimizer step
    evals: List[Dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


# ---- model and tokenizer ------------------------------------------------------------------------------------

def _methods():
    import importlib
    try:
        return importlib.import_module("rwkv_peft.methods")
    except ImportError as e:
        if getattr(e, "name", "") not in ("rwkv_peft.methods",):
            raise
        return None


def load_tokenizer(mcfg, log=print):
    """The recipe's tokenizer: ``world``, a tokenizer folder, or the model folder's own."""
    spec = mcfg.tokenizer
    if spec is None:
        mpath = resolve_path(mcfg.path)
        spec = str(mpath) if mpath.is_dir() and (mpath / "tokenizer_config.json").is_file() else "world"
    if spec == "world":
        try:
            from ..tokenization import RWKVWorldTokenizer
        except ImportError as e:
            raise TrainingSetupError(f"the RWKV World tokenizer is not available ({e}); set model.tokenizer to a "
                                     f"tokenizer folder") from None
        return RWKVWorldTokenizer()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(resolve_path(spec)))
    except Exception as e:  # noqa: BLE001
        raise TrainingSetupError(f"model.tokenizer: cannot load a tokenizer from {spec!r} "
                                 f"({type(e).__name__}: {e})") from None


def _plain_load(mcfg):
    """Load a base model without the methods module (full fine-tune of a full-precision model)."""
    from ..convert import causal_lm_class, load_any
    config, sd, _ = load_any(resolve_path(mcfg.path))
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(getattr(torch, mcfg.dtype))


def build_model(recipe: Recipe, log=print):
    """Base model + the recipe's method(s). Returns (model, methods module or None)."""
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    mcfg, meth = recipe.model, recipe.method
    needs_methods = meth.kind != "full" or mcfg.quantization is not None
    methods = _methods() if needs_methods else None
    if needs_methods and methods is None:
        raise TrainingSetupError(f"method {meth.kind!r}{' with quantization' if mcfg.quantization else ''} needs "
                                 f"rwkv_peft.methods, which is not installed in this tree")
    try:
        if methods is not None:
            model = methods.load_base_model(str(resolve_path(mcfg.path)), dtype=mcfg.dtype,
                                            quantization=mcfg.quantization, double_quant=mcfg.double_quant)
        else:
            model = _plain_load(mcfg)
    except CheckpointError as e:
        raise TrainingSetupError(f"model.path: {e}") from None
    if meth.lora.enabled:
        lo = meth.lora
        model = methods.apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets,
                                   variant=lo.variant, modules_to_save=lo.modules_to_save, init=lo.init)
    if meth.state_tuning.enabled:
        init = meth.state_tuning.init
        model = methods.apply_state_tuning(model, init=init if init in ("zeros", "keep") else str(resolve_path(init)))
    if meth.kind == "full":
        # layer 0 takes v from itself: its v0 / v_lora never get a gradient (and would stall DDP)
        base = base_model(model)
        att0 = base.model.blocks[0].att
        if hasattr(att0, "v_lora"):  # RWKV-7 only
            for p in [att0.v0, *att0.v_lora.parameters()]:
                p.requires_grad_(False)
        if mcfg.dtype != "float32":
            log(f"note: a full fine-tune keeps its weights in {mcfg.dtype}; float32 weights with "
                f"train.mixed_precision: bf16 train more reliably")
    return model, methods


def enable_checkpointing(model) -> None:
    """Turn on activation (gradient) checkpointing, non-reentrant, under whichever name the installed transformers
    has: ``activation_checkpointing_enable`` (5.23+, where the old name warns) or ``gradient_checkpointing_enable``
    (older 5.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def base_model(model):
    """The RWKV7ForCausalLM inside wrappers (DDP, peft)."""
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


def trainable_state_dict(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---- data order ---------------------------------------------------------------------------------------------

class Stream:
    """Micro-batches across epochs for one process, addressable by index (so resume is a number)."""

    def __init__(self, n_rows: int, batch_size: int, rank: int, world: int, seed: int):
        self.per_rank = n_rows // world
        if self.per_rank == 0:
            raise DataError(f"{n_rows} training row(s) cannot feed {world} processes")
        self.n, self.bs, self.rank, self.world, self.seed = n_rows, batch_size, rank, world, seed
        self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order, self._epoch = perm[self.rank::self.world][: self.per_rank], epoch
        return self._order

    def locate(self, micro: int):
        return divmod(micro, self.batches_per_epoch)

    def indices(self, micro: int) -> List[int]:
        epoch, b = self.locate(micro)
        return self.order(epoch)[b * self.bs: (b + 1) * self.bs]


def _rows(ds, idx: List[int]) -> List[dict]:
    if hasattr(ds, "select") and hasattr(ds, "column_names"):
        cols = ds[idx]
        return [{"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"])]
    return [ds[i] for i in idx]


# ---- the loop -----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_rows(net, rows, batch_size: int, chunk_len: Optional[int] = None, device=None,
                  max_batches: Optional[int] = None, rank: int = 0, world: int = 1, autocast=None):
    """Summed token loss and token count of ``rows`` (this process's share: every ``world``-th row)."""
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    idx = list(range(rank, len(rows), world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with (autocast() if autocast is not None else contextlib.nullcontext()):
        for b in batches:
            batch = collate(_rows(rows, b))
            ids = batch["input_ids"].to(device)
            targets = shifted_targets(batch["labels"]).to(device)
            spans = chunk_spans(ids.shape[1], chunk_len) if chunk_len else [(0, ids.shape[1])]
            state = None
            for s, e in spans:
                o = net(input_ids=ids[:, s:e], state=state, use_cache=bool(chunk_len))
                state = o.state
                loss_sum += F.cross_entropy(o.logits.float().reshape(-1, o.logits.shape[-1]),
                                            targets[:, s:e].reshape(-1), ignore_index=IGNORE,
                                            reduction="sum").double()
            tokens += (targets != IGNORE).sum()
    net.train(was_training)
    return loss_sum, tokens


def _find_checkpoints(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-")[1]))


def _rng_snapshot():
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        s["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _rng_restore(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "numpy" in s:
        import numpy as np
        np.random.set_state(s["numpy"])
    if "cuda" in s:
        torch.cuda.set_rng_state_all(s["cuda"])


def _param_groups(model, tc, state_lr: Optional[float]):
    decay, no_decay, state = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("time_state"):
            state.append(p)
        elif p.dim() >= 2:  # matrices; norms, biases and per-channel vectors get no decay
            decay.append(p)
        else:
            no_decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": tc.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if state:
        groups.append({"params": state, "weight_decay": 0.0, "lr": state_lr or tc.lr})
    if not groups:
        raise TrainingSetupError("the model has no trainable parameters (check the method section)")
    return groups


def _optimizer(groups, tc):
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingSetupError("train.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") \
                from None
        return bnb.optim.AdamW8bit(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)


def _check_output(recipe: Recipe, main: bool) -> Optional[Path]:
    """Which checkpoint to resume from, after checking the output folder is fit to use."""
    out = recipe.output_dir
    ckpts = _find_checkpoints(out / CHECKPOINTS)
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


def train(recipe: Recipe, *, tokenizer=None, progress: Optional[bool] = None, log: Callable[[str], None] = None,
          on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Run the recipe. ``on_step(step, loss)`` is called after every optimizer step (tests use it to interrupt).

    Raises TrainingSetupError / RecipeError / DataError (bad input), TrainingError (the run failed) and
    TrainingInterrupted (Ctrl-C; a checkpoint was saved).
    """
    # Once the loss gets small, CPU matmuls in the backward pass crawl on denormal numbers (a 1.2M model went
    # from ~1 s to several seconds a step); flushing them to zero during training keeps steps fast.
    flush = not torch.cuda.is_available() and torch.set_flush_denormal(True)
    try:
        return _train(recipe, tokenizer=tokenizer, progress=progress, log=log, on_step=on_step)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _train(recipe: Recipe, *, tokenizer, progress, log, on_step) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    tc, dc = recipe.train, recipe.data
    # without CUDA, cpu=True is what lets `accelerate launch` processes join as gloo ranks (MULTI_CPU)
    cpu = not torch.cuda.is_available()
    try:
        acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu)
    except ValueError as e:  # a second run in one process with another precision (notebooks, tests)
        from accelerate.state import AcceleratorState
        if "already been initialized" not in str(e) or AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=cpu)
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index

    def say(msg: str) -> None:
        if main:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    if tc.mixed_precision == "fp16" and acc.device.type == "cpu":
        say("note: fp16 mixed precision does nothing on a CPU (it is a GPU feature); bf16 works on both")
    if recipe.hub.push:
        from huggingface_hub import get_token
        if not get_token():
            raise TrainingSetupError("hub.push is true but there is no Hugging Face token: set HF_TOKEN or run "
                                     "`huggingface-cli login` (or set hub.push: false and publish later)")
    out = recipe.output_dir
    resume_from = _check_output(recipe, main)
    acc.wait_for_everyone()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    set_seed(tc.seed)

    # tokenizer and data
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model, say)
    with acc.main_process_first():
        from ..data import build_datasets
        train_rows, eval_rows = build_datasets(dc, tokenizer, seed=tc.seed, log=say if main else (lambda m: None))
    stream = Stream(len(train_rows), tc.batch_size, rank, world, tc.seed)
    steps_per_epoch = math.ceil(stream.batches_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * stream.batches_per_epoch / tc.grad_accum))
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(round((tc.warmup_ratio or 0) * total_steps))

    # model, method, optimizer, schedule
    model, methods = build_model(recipe, say)
    vocab = base_model(model).config.vocab_size
    if len(tokenizer) > vocab:
        raise TrainingSetupError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                 f"{vocab}: they do not belong together (model.tokenizer)")
    if tc.gradient_checkpointing:
        enable_checkpointing(base_model(model))
    model.train()
    optimizer = _optimizer(_param_groups(model, tc, recipe.method.state_tuning.lr), tc)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tc.schedule]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    def save_hook(models, weights, output_dir):
        if main:
            from safetensors.torch import save_file
            for i, m in enumerate(models):
                save_file(trainable_state_dict(acc.unwrap_model(m)), os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file
        for i, m in enumerate(models):
            sd = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            target = acc.unwrap_model(m)
            want = {n for n, p in target.named_parameters() if p.requires_grad}
            if set(sd) != want:
                raise TrainingSetupError(f"{input_dir}: the checkpoint's trainable weights do not match this "
                                         f"recipe's method (missing {sorted(want - set(sd))[:3]}, extra "
                                         f"{sorted(set(sd) - want)[:3]})")
            with torch.no_grad():
                params = dict(target.named_parameters())
                for n, t in sd.items():
                    params[n].copy_(t)
        models.clear()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)

    history: Dict[str, Any] = {"losses": [], "evals": [], "tokens": 0}
    step = 0
    if resume_from is not None:
        state = json.loads((resume_from / STATE_FILE).read_text())
        acc.load_state(str(resume_from))
        step = int(state["step"])
        history = {"losses": state["losses"], "evals": state["evals"], "tokens": state.get("tokens", 0)}
        if state.get("world_size", world) != world or state.get("batch_size", tc.batch_size) != tc.batch_size:
            say(f"note: the checkpoint was made with {state.get('world_size')} process(es) x batch "
                f"{state.get('batch_size')}; the data order from here differs from the original run")
        say(f"resumed from {resume_from} at step {step}")

    say(f"{base_model(model).config.describe()} | method {recipe.method.kind} | trainable {n_train:,} of "
        f"{n_all:,} parameters | {len(train_rows)} train rows"
        + (f", {len(eval_rows)} eval rows" if eval_rows is not None else "")
        + f" | {world} process(es) x batch {tc.batch_size} x accum {tc.grad_accum} | {total_steps} steps "
          f"({steps_per_epoch} per epoch)")

    logger = RunLogger(out, tc.report_to, recipe.to_dict(), recipe.run_name, enabled=main, log=say)
    chunked = dc.long_context.mode == "chunk"
    ga = tc.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]

    def forward_loss(batch, denom: float, sync: bool, where: str) -> float:
        """Forward + backward of one micro-batch; returns its summed token loss."""
        ids = batch["input_ids"].to(acc.device)
        targets = shifted_targets(batch["labels"]).to(acc.device)
        spans = chunk_spans(ids.shape[1], dc.long_context.chunk_len) if chunked else [(0, ids.shape[1])]
        total, pending, state = 0.0, None, None
        k = dc.long_context.grad_chunks
        for j, (s, e) in enumerate(spans):
            last_window = j + k >= len(spans) or j == len(spans) - 1
            ctx = contextlib.nullcontext() if (sync and last_window and not chunked) else acc.no_sync(model)
            with ctx:
                # rows are right-padded and padding carries no loss, so no mask is needed: a pad only
                # changes the state after the row's last real token, which nothing reads
                out = model(input_ids=ids[:, s:e], state=state, use_cache=chunked)
                logits = out.logits
                ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, s:e].reshape(-1),
                                     ignore_index=IGNORE, reduction="sum")
                value = float(ce.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the loss is {value} at step {step + 1}, {where}"
                                           + (f", tokens {s}..{e}" if chunked else "")
                                           + ": the run stops (lower train.lr, check the data, or resume from "
                                             "the last checkpoint)")
                total += value
                pending = ce if pending is None else pending + ce
                if chunked:
                    state = out.state
                if (j + 1) % k == 0 or j == len(spans) - 1:
                    acc.backward(pending / denom)
                    pending = None
                    if state is not None:
                        state = [tuple(t.detach() for t in layer) for layer in state]
        return total

    def allreduce_grads():
        if world == 1:
            return
        import torch.distributed as dist
        grads = [p.grad for p in trainable if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        o = 0
        for g in grads:
            g.copy_(flat[o:o + g.numel()].view_as(g).to(g.dtype))
            o += g.numel()

    def evaluate() -> Dict[str, float]:
        loss_sum, tokens = evaluate_rows(base_model(model), eval_rows, recipe.eval.batch_size or tc.batch_size,
                                         dc.long_context.chunk_len if chunked else None, acc.device,
                                         recipe.eval.max_batches, rank, world, autocast=acc.autocast)
        if world > 1:
            loss_sum, tokens = acc.reduce(loss_sum, "sum"), acc.reduce(tokens, "sum")
        loss = float(loss_sum / tokens.clamp_min(1))
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens)}

    def samples(at: int) -> None:
        if not recipe.eval.prompts or not main:
            return
        from .generation import greedy
        net = base_model(model)
        for p in recipe.eval.prompts:
            text = greedy(net, tokenizer, p, recipe.eval.max_new_tokens)
            say(f"  [{at}] {p!r} -> {text!r}")
            logger.text("samples", f"**{p}**{text}", at)

    def save_checkpoint(at: int, rng=None) -> Path:
        root = out / CHECKPOINTS
        dst = root / f"step-{at:07d}"
        tmp = root / f".step-{at:07d}.tmp"
        acc.wait_for_everyone()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        now = None
        if rng is not None:  # the RNG as it was at the step boundary (an interrupt may come mid-step)
            now = _rng_snapshot()
            _rng_restore(rng)
        acc.save_state(str(tmp))
        if now is not None:
            _rng_restore(now)
        acc.wait_for_everyone()
        if main:
            info = {"step": at, "micro_batch": at * ga, "epoch": stream.locate(at * ga)[0],
                    "total_steps": total_steps, "world_size": world, "batch_size": tc.batch_size,
                    "grad_accum": ga, "method": recipe.method.kind, **history}
            (tmp / STATE_FILE).write_text(json.dumps(info, indent=1))
            if methods is not None:
                try:
                    methods.save_adapter(acc.unwrap_model(model), str(tmp / "adapter"))
                except Exception as e:  # noqa: BLE001 - the checkpoint itself is complete without it
                    say(f"note: could not write the adapter into the checkpoint ({type(e).__name__}: {e})")
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
            for old in _find_checkpoints(root)[: -tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return dst

    def write_plot():
        if main:
            plot_losses(out / "loss.png", history["losses"], history["evals"], title=recipe.run_name)

    show_bar = main and (progress if progress is not None else sys.stderr.isatty())
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True,
               desc=recipe.run_name)
    speed = Throughput()
    t_start = time.perf_counter()
    last_saved = step0 = step
    rng_at_step = _rng_snapshot()
    if step == 0 and recipe.eval.prompts:
        say("samples before training:")
        samples(0)
    try:
        while step < total_steps:
            micro = [stream.indices(step * ga + j) for j in range(ga)]
            batches = [collate(_rows(train_rows, idx)) for idx in micro]
            n_tok = sum(int((shifted_targets(b["labels"]) != IGNORE).sum()) for b in batches)
            denom = float(max(n_tok, 1))
            step_loss = 0.0
            for j, (b, idx) in enumerate(zip(batches, micro)):
                epoch, bi = stream.locate(step * ga + j)
                where = f"micro-batch {j + 1} of {ga} (epoch {epoch + 1}, batch {bi + 1}, rows {idx[:8]})"
                step_loss += forward_loss(b, denom, sync=(j == ga - 1), where=where)
            if chunked:
                allreduce_grads()
            grad_norm = None
            if tc.grad_clip:
                grad_norm = float(acc.clip_grad_norm_(trainable, tc.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rng_at_step = _rng_snapshot()  # the step boundary: what a Ctrl-C checkpoint records
            loss = step_loss / denom
            if world > 1:
                loss = float(acc.reduce(torch.tensor(loss, device=acc.device), "mean"))
            history["losses"].append(loss)
            real = sum(int(b["attention_mask"].sum()) for b in batches) * world
            history["tokens"] += real
            speed.add(real)
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed.rate:,.0f}")
            bar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                logger.scalars({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": speed.rate,
                                **({"train/grad_norm": grad_norm} if grad_norm is not None else {})}, step)
                if not show_bar:
                    el = time.perf_counter() - t_start
                    eta = el / max(1, step - step0) * (total_steps - step)
                    say(f"step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} {speed.rate:,.0f} tok/s "
                        f"eta {format_seconds(eta)}")
            if eval_rows is not None and tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                ev = {"step": step, **evaluate()}
                history["evals"].append(ev)
                logger.scalars({"eval/loss": ev["loss"], "eval/ppl": ev["ppl"]}, step)
                say(f"eval at step {step}: loss {ev['loss']:.4f} perplexity {ev['ppl']:.2f}")
                samples(step)
                write_plot()
            if tc.save_every and step % tc.save_every == 0 and step < total_steps:
                save_checkpoint(step)
                last_saved = step
                write_plot()
            if on_step is not None:
                on_step(step, loss)
    except KeyboardInterrupt:
        bar.close()
        ckpt = None
        if world == 1 and step > last_saved and step > 0:
            optimizer.zero_grad(set_to_none=True)
            ckpt = save_checkpoint(step, rng=rng_at_step)
        elif last_saved > 0:
            ckpt = _find_checkpoints(out / CHECKPOINTS)[-1] if _find_checkpoints(out / CHECKPOINTS) else None
        write_plot()
        logger.close()
        say(f"interrupted at step {step}" + (f"; checkpoint {ckpt} (resume with --set train.resume=true)"
                                              if ckpt else ""))
        raise TrainingInterrupted(ckpt) from None
    except TrainingDiverged:
        bar.close()
        write_plot()
        logger.close()
        raise
    bar.close()

    if eval_rows is not None and recipe.eval.at_end:
        ev = {"step": step, **evaluate()}
        if not history["evals"] or history["evals"][-1]["step"] != step:
            history["evals"].append(ev)
        logger.scalars({"eval/loss": ev["loss"], "eval/ppl": ev["ppl"]}, step)
        say(f"eval at step {step}: loss {ev['loss']:.4f} perplexity {ev['ppl']:.2f}")
        samples(step)

    final = _save_final(acc, model, methods, tokenizer, out, say)
    seconds = time.perf_counter() - t_start
    if main:
        summary = {"steps": step, "final_loss": history["losses"][-1] if history["losses"] else None,
                   "evals": history["evals"], "tokens": history["tokens"], "seconds": round(seconds, 2),
                   "tokens_per_s": round(speed.rate, 1), "output": str(final) if final else None,
                   "world_size": world, "method": recipe.method.kind}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plot()
    logger.close()
    if main and recipe.hub.push and final is not None:
        _push(recipe, final, say)
    acc.wait_for_everyone()
    return TrainResult(output_dir=out, final_dir=final, steps=step, losses=list(history["losses"]),
                       evals=list(history["evals"]), tokens=history["tokens"], seconds=seconds)


def _save_final(acc, model, methods, tokenizer, out: Path, say) -> Optional[Path]:
    from ..convert import atomic_path
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    unwrapped = acc.unwrap_model(model)
    if methods is not None:
        dst = out / "adapter"
        with atomic_path(dst, is_dir=True) as tmp:
            methods.save_adapter(unwrapped, str(tmp))
            _save_tokenizer(tokenizer, tmp, say)
    else:
        dst = out / "model"
        with atomic_path(dst, is_dir=True) as tmp:
            base_model(unwrapped).save_pretrained(str(tmp))
            _save_tokenizer(tokenizer, tmp, say)
    say(f"saved {dst}")
    return dst


def _save_tokenizer(tokenizer, folder: Path, say) -> None:
    try:
        tokenizer.save_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - the weights are what matter
        say(f"note: the tokenizer was not saved beside the weights ({type(e).__name__}: {e})")


def _push(recipe: Recipe, folder: Path, say) -> None:
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(recipe.hub.repo_id, private=recipe.hub.private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=recipe.hub.repo_id)
        say(f"pushed {folder} to https://huggingface.co/{recipe.hub.repo_id}")
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"training finished and {folder} is saved, but pushing to the hub failed "
                            f"({type(e).__name__}: {e}); publish it later") from None
