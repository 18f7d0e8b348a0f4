"""Objectives beyond SFT, through TRL: ``train.objective: dpo | orpo | grpo`` (``sft`` is ``loop.py``).

``train_objective(recipe)`` runs one, read top to bottom:

    check      what is not supported here (several processes); what a recipe cannot say is refused by recipe.py
    data       preference rows (prompt, chosen, rejected) or prompt rows -> TRL's plain-text columns; a prompt
               that is a list of messages is rendered in the recipe's chat format and its answers become the
               assistant's turn
    model      the recipe's base and method(s), built as the SFT loop builds them (LoRA, MiSS, state, both)
    trainer    TRL's config from the recipe (train + the objective's section), TRL's trainer, our optimizer (the
               state's own learning rate) and callbacks: progress and log lines, TensorBoard / W&B scalars,
               eval samples, our adapter in every checkpoint, Ctrl-C
    finish     ``<run>/adapter`` (``save_adapter``; ``<run>/model`` for a full fine-tune) with the tokenizer,
               ``summary.json``, ``loss.png``, the Hub push

The reference of DPO (and of GRPO with ``grpo.beta > 0``) is the base: with peft, TRL switches the adapter off
and our state follows it (``tuners/trl_support.py``); without peft (state tuning alone, a full fine-tune) it is
``reference_model``, a frozen copy that shares the frozen weights.

The run folder is the SFT loop's: ``recipe.yaml``, ``checkpoints/`` (TRL's ``checkpoint-N``, each also an adapter
folder ``load_adapter`` reads), ``logs/``, ``adapter/``, ``loss.png``, ``summary.json``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..recipe import Recipe, resolve_path
from .setup import CHECKPOINTS, TrainingSetupError

TRAINER_NAMES = {"dpo": "DPOTrainer", "orpo": "ORPOTrainer", "grpo": "GRPOTrainer"}


# ---- check ------------------------------------------------------------------------------------------------------

def check_supported(recipe: Recipe) -> None:
    """What recipe validation cannot see: several processes (not tested with these trainers yet), and TRL."""
    obj = recipe.train.objective
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingSetupError(f"train.objective: {obj} runs in one process so far; start it with "
                                 f"`rwkv-peft train`, not accelerate launch / torchrun")
    if importlib.util.find_spec("trl") is None:
        raise TrainingSetupError(f"train.objective: {obj} trains through TRL, which is not installed: "
                                 f"pip install 'rwkv-peft[trl]'")


# ---- data -------------------------------------------------------------------------------------------------------

def _row_error(msg: str):
    from ..data.formats import RowError
    return RowError(msg)


def _value(row: dict, key: str, what: str):
    if key not in row or row[key] is None:
        raise _row_error(f"missing field '{key}' ({what}); the row has: "
                         f"{', '.join(sorted(map(str, row))) or 'nothing'}")
    value = row[key]
    if isinstance(value, str) and value.lstrip().startswith("["):  # a list of messages stored as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, str) and not value.strip():
        raise _row_error(f"field '{key}' ({what}) is empty")
    if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
        raise _row_error(f"field '{key}' ({what}) should be text or a non-empty list of messages, found "
                         f"{type(value).__name__}")
    return value


def _reply(value, key: str, dc) -> str:
    """An answer: text, or the assistant's message (a list holding one message, as chat datasets store it)."""
    if isinstance(value, str):
        return value
    f = dc.fields
    if len(value) != 1 or not isinstance(value[0], dict) or not isinstance(value[0].get(f.content), str):
        raise _row_error(f"field '{key}' should be the answer: text, or a list holding the assistant's one message "
                         f"(with '{f.content}'); found a list of {len(value)}")
    return value[0][f.content]


def render_chat(messages: list, reply: str, dc) -> Tuple[str, str]:
    """``(prompt, answer)`` text of a conversation and the assistant's reply, in the recipe's chat format
    (``data.template``): the prompt ends where the model starts answering (``...Assistant:``)."""
    from ..data.formats import render_segments
    f = dc.fields
    cfg = dc.model_copy(update={"format": "chat", "loss_on": "assistant"})
    segments = render_segments({f.messages: list(messages) + [{f.role: "assistant", f.content: reply}]}, cfg)
    start = max(i for i, (_, trained) in enumerate(segments) if not trained) + 1  # the reply's trained run
    return "".join(t for t, _ in segments[:start]), "".join(t for t, _ in segments[start:])


def preference_row(row: dict, dc) -> Dict[str, str]:
    """``{"prompt", "chosen", "rejected"}`` as text. A text prompt is used as it is, with the answers as they
    are; a list of messages is rendered in the chat format, each answer becoming the assistant's turn."""
    f = dc.fields
    prompt = _value(row, f.prompt, "the prompt")
    chosen = _reply(_value(row, f.chosen, "the preferred answer"), f.chosen, dc)
    rejected = _reply(_value(row, f.rejected, "the rejected answer"), f.rejected, dc)
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    text, chosen_turn = render_chat(prompt, chosen, dc)
    return {"prompt": text, "chosen": chosen_turn, "rejected": render_chat(prompt, rejected, dc)[1]}


def prompt_row(row: dict, dc) -> Dict[str, Any]:
    """``{"prompt": text, **the row's other columns}`` (the reward functions read them)."""
    f = dc.fields
    prompt = _value(row, f.prompt, "the prompt")
    text = prompt if isinstance(prompt, str) else render_chat(prompt, "...", dc)[0]  # the prompt part only
    return {**{k: v for k, v in row.items() if k != f.prompt}, "prompt": text}


def convert_rows(ds, dc, source: str, say) -> Any:
    """A ``datasets.Dataset`` of TRL's columns from raw rows; a malformed row names its row (or line) and field
    and fails or is skipped (``data.on_bad_row``)."""
    from datasets import Dataset

    from ..data import DataError
    from ..data.binidx import BinIdx
    from ..data.formats import RowError
    if isinstance(ds, BinIdx):
        raise DataError(f"{source}: a binidx corpus holds token ids; data.format: {dc.format} needs rows of text")
    convert = preference_row if dc.format == "preference" else prompt_row
    out, bad = [], []
    for i, row in enumerate(ds):
        where = f"{source} {'line' if '_line' in row else 'row'} {row.get('_line', i + 1)}"
        try:
            if "_json" in row:  # a JSON file arrow could not type, read line by line (data/loading.py)
                row = json.loads(row["_json"])
                if not isinstance(row, dict):
                    raise _row_error(f"expected a JSON object, found {type(row).__name__}")
            out.append(convert(row, dc))
        except (RowError, json.JSONDecodeError) as e:
            bad.append(f"{where}: {e}")
    if bad and dc.on_bad_row == "fail":
        more = f" (and {len(bad) - 1} more malformed rows)" if len(bad) > 1 else ""
        raise DataError(bad[0] + more + "; set data.on_bad_row: skip to leave such rows out")
    if bad:
        say(f"skipping {len(bad)} malformed row(s) of {len(bad) + len(out)} in {source}:\n  " + "\n  ".join(bad[:5]))
    if not out:
        raise DataError(f"{source}: no usable rows")
    return Dataset.from_list(out)


def objective_datasets(recipe: Recipe, say) -> Tuple[Any, Optional[Any]]:
    """(train, eval or None) in TRL's columns; ``data.eval`` or ``data.eval_split`` as the SFT loop splits."""
    from ..data.loading import _split, load_source
    dc = recipe.data

    def name(spec):
        return spec if isinstance(spec, str) else f"{spec[0]} (+{len(spec) - 1} more)"
    train = convert_rows(load_source(dc.train, dc.split, dc.cache_dir, dc.on_bad_row, say), dc, name(dc.train), say)
    if dc.eval:
        return train, convert_rows(load_source(dc.eval, dc.split, dc.cache_dir, dc.on_bad_row, say), dc,
                                   name(dc.eval), say)
    if dc.eval_split and len(train) >= 2:
        return _split(train, dc.eval_split, recipe.train.seed)
    return train, None


# ---- GRPO reward functions ----------------------------------------------------------------------------------------

def load_reward(spec: str, where: str) -> Callable:
    """``'package.module:function'`` (imported with the current folder on the path, as ``python -m`` does) or
    ``'path/to/file.py:function'``; ``where`` names the recipe key in errors."""
    module, _, name = spec.rpartition(":")
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            path = resolve_path(module)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {str(path)!r}")
            loader = importlib.util.spec_from_file_location(f"rwkv_peft_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(module)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except Exception as e:  # noqa: BLE001 - whatever the module raises, the recipe key is what to fix
        raise TrainingSetupError(f"{where}: {spec!r}: cannot import {module!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod.__name__)
        raise TrainingSetupError(f"{where}: {spec!r}: {module!r} has no function {name!r}"
                                 + (f" (it has: {', '.join(found[:10])})" if found else ""))
    return fn


def reward_functions(recipe: Recipe) -> List[Callable]:
    from ..recipe import _source_line
    return [load_reward(spec, f"{_source_line(recipe, ('grpo', 'reward_funcs', i))}: grpo.reward_funcs[{i}]")
            for i, spec in enumerate(recipe.grpo.reward_funcs)]


# ---- output folder and resume -----------------------------------------------------------------------------------

def last_checkpoint(folder: Path) -> Optional[Path]:
    from transformers.trainer_utils import get_last_checkpoint
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def checkpoint_to_resume(recipe: Recipe) -> Optional[Path]:
    """Which TRL checkpoint to resume from, after checking the output folder (as the SFT loop does)."""
    import shutil
    root, resume = recipe.output_dir / CHECKPOINTS, recipe.train.resume
    if isinstance(resume, str):
        p = resolve_path(resume)
        if not (p / "trainer_state.json").is_file():
            raise TrainingSetupError(f"train.resume: {resume} is not a checkpoint folder (no trainer_state.json)")
        return p
    found = last_checkpoint(root)
    if resume:
        return found
    if found is not None and not recipe.output.overwrite:
        raise TrainingSetupError(f"{recipe.output_dir} already has checkpoints from an earlier run ({found.name}): "
                                 f"set train.resume: true to continue it, output.overwrite: true to start afresh, "
                                 f"or another output.run_name")
    if found is not None:
        shutil.rmtree(root, ignore_errors=True)
    return None


# ---- the trainer --------------------------------------------------------------------------------------------------

def trl_config(recipe: Recipe, has_eval: bool):
    """TRL's config for the objective: the recipe's train section, then the objective's own."""
    import dataclasses

    tc, obj, dc = recipe.train, recipe.train.objective, recipe.data
    if obj == "dpo":
        from trl import DPOConfig as Config
        own = dict(beta=recipe.dpo.beta, loss_type=[recipe.dpo.loss_type],
                   label_smoothing=recipe.dpo.label_smoothing, max_length=dc.max_length)
    elif obj == "orpo":
        with warnings.catch_warnings():  # "You are importing from 'trl.experimental'": ORPO lives there in TRL 1.x
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig as Config
        own = dict(beta=recipe.orpo.beta, max_length=dc.max_length, remove_unused_columns=False)
    else:
        from trl import GRPOConfig as Config
        g = recipe.grpo
        own = dict(num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                   temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, beta=g.beta, epsilon=g.epsilon,
                   num_iterations=g.num_iterations, loss_type=g.loss_type, scale_rewards=g.scale_rewards,
                   reward_weights=g.reward_weights, log_completions=g.log_completions,
                   num_generations_eval=g.num_generations)
    fields = {f.name for f in dataclasses.fields(Config)}
    warmup: Dict[str, Any] = {"warmup_steps": tc.warmup_steps or 0}
    if tc.warmup_ratio is not None:  # transformers 5.x: a ratio is a float warmup_steps (warmup_ratio went away)
        warmup = {"warmup_ratio": tc.warmup_ratio} if "warmup_ratio" in fields else {"warmup_steps": tc.warmup_ratio}
    eval_batch = recipe.eval.batch_size or tc.batch_size
    if obj == "grpo":  # answers per evaluation batch: a multiple of the group size
        eval_batch = math.ceil(eval_batch / recipe.grpo.num_generations) * recipe.grpo.num_generations
    args = dict(
        output_dir=str(recipe.output_dir / CHECKPOINTS), seed=tc.seed, data_seed=tc.seed,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        per_device_eval_batch_size=eval_batch, num_train_epochs=tc.epochs, max_steps=tc.max_steps or -1,
        learning_rate=tc.lr, weight_decay=tc.weight_decay, adam_beta1=tc.betas[0], adam_beta2=tc.betas[1],
        adam_epsilon=tc.eps, max_grad_norm=tc.grad_clip or 0.0, **warmup,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tc.schedule],
        bf16=tc.mixed_precision == "bf16", fp16=tc.mixed_precision == "fp16", use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=tc.gradient_checkpointing,  # TRL's configs turn it on by default; the recipe decides
        logging_steps=1, report_to="none", disable_tqdm=True,  # our callback logs, draws the bar and writes TB/W&B
        save_strategy="steps" if tc.save_every else "no", save_steps=tc.save_every or 500,
        save_total_limit=tc.keep_checkpoints,
        eval_strategy="steps" if has_eval and tc.eval_every else "no", eval_steps=tc.eval_every,
        dataloader_num_workers=0, **own)
    with warnings.catch_warnings():  # transformers 5.2x renames gradient_checkpointing; TRL still sets it
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        return Config(**args)


def make_trainer(recipe: Recipe, model, tokenizer, train_ds, eval_ds, callbacks, rewards=None):
    """TRL's trainer for the objective, with our optimizer (the recipe's param groups, the state's own lr)."""
    from ..tuners.trl_support import reference_model
    from .setup import make_optimizer, param_groups

    tc, obj = recipe.train, recipe.train.objective
    optimizer = make_optimizer(param_groups(model, tc, recipe.method.state_tuning.lr), tc)
    args = trl_config(recipe, eval_ds is not None)
    common = dict(args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  callbacks=callbacks, optimizers=(optimizer, None))
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|experimental).*")
        if obj == "dpo":
            from trl import DPOTrainer
            ref = None if _is_peft(model) else reference_model(model)
            trainer = DPOTrainer(model=model, ref_model=ref, **common)
        elif obj == "orpo":
            from trl.experimental.orpo import ORPOTrainer
            trainer = ORPOTrainer(model=model, **common)
        else:
            from trl import GRPOTrainer
            trainer = GRPOTrainer(model=model, reward_funcs=rewards, **common)
    drop_reference_adapter(trainer.model)
    keep_trainable(trainer.model, dtypes)
    return trainer


def _is_peft(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def drop_reference_adapter(model) -> None:
    """TRL's DPOTrainer gives a ``PeftModel`` it is handed a frozen copy of its adapter (``"ref"``) for the
    reference pass. Our adapter is fresh (PiSSA / OLoRA are refused for DPO), so switching it off is the same
    reference; without the copy, checkpoints and the adapter hold only what trains."""
    if _is_peft(model) and "ref" in model.peft_config and len(model.peft_config) > 1:
        model.delete_adapter("ref")


def keep_trainable(model, dtypes: Dict[str, torch.dtype]) -> None:
    """What trained before the trainer was made trains after it, in its dtype: peft's ``add_adapter`` (DPO's
    reference copy) freezes every parameter but the adapters', the state included, and TRL casts a quantized
    model's trainable parameters to bf16 (our state and adapters stay as our loop keeps them)."""
    for n, p in model.named_parameters():
        if n in dtypes:
            p.requires_grad_(True)
            if p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])


# ---- callbacks: progress, logs, samples, Ctrl-C -------------------------------------------------------------------

def _run_callback_class():
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """The SFT loop's console and logs for a TRL trainer: a progress bar (or a line every ``train.log_every``
        steps), scalars to TensorBoard / W&B, eval lines and greedy samples, the loss plot, a stop at a non-finite
        loss, and Ctrl-C: the first one saves a checkpoint at the end of the step and stops."""

        def __init__(self, recipe: Recipe, tokenizer, logger, say, progress: bool, on_step=None):
            self.recipe, self.tokenizer, self.logger, self.say = recipe, tokenizer, logger, say
            self.progress, self.on_step = progress, on_step
            self.history: Dict[str, Any] = {"losses": [], "evals": [], "tokens": 0}
            self.stop_requested, self.bar, self.t0, self.step0 = False, None, time.perf_counter(), 0
            self.last_eval: Optional[int] = None

        def request_stop(self, *_):
            if not self.stop_requested:
                self.say("stopping: a checkpoint is saved at the end of this step (Ctrl-C again stops at once)")
            self.stop_requested = True
            if signal.getsignal(signal.SIGINT) == self.request_stop:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.step0, self.t0 = state.global_step, time.perf_counter()
            if self.progress:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True,
                                desc=self.recipe.run_name)
            if state.global_step == 0 and self.recipe.eval.prompts:
                self.say("samples before training:")
                self.samples(model, 0)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(1)
            if self.stop_requested:
                control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            logs = dict(logs or {})
            if "loss" in logs and not any(k.startswith("eval_") for k in logs):
                self.train_log(state, control, logs)

        def train_log(self, state, control, logs):
            from .step import TrainingDiverged
            loss, step = float(logs["loss"]), state.global_step
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss is {loss} at step {step}: the run stops (lower train.lr, check "
                                       f"the data, or resume from the last checkpoint)")
            self.history["losses"].append(loss)
            self.history["tokens"] = int(logs.get("num_tokens", self.history["tokens"]) or 0)
            lr = float(logs.get("learning_rate", 0.0))
            scalars = {"train/loss": loss, "train/lr": lr}
            scalars.update({f"train/{k}": float(v) for k, v in logs.items() if isinstance(v, (int, float))
                            and k not in ("loss", "learning_rate", "epoch", "num_tokens")})
            self.logger.scalars(scalars, step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            elif step % self.recipe.train.log_every == 0 or step == state.max_steps:
                from .logging import format_seconds
                eta = (time.perf_counter() - self.t0) / max(1, step - self.step0) * (state.max_steps - step)
                extra = "".join(f" {k.split('/')[-1] if k.startswith('rewards/') else k} {float(logs[k]):.4f}"
                                for k in ("rewards/margins", "rewards/accuracies", "reward") if k in logs)
                self.say(f"step {step}/{state.max_steps} loss {loss:.4f}{extra} lr {lr:.2e} "
                         f"eta {format_seconds(eta)}")
            if self.on_step is not None:
                try:
                    self.on_step(step, loss)
                except KeyboardInterrupt:  # what a Ctrl-C does (tests interrupt this way)
                    self.request_stop()
            if self.stop_requested:
                control.should_save = control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
            metrics, self.last_eval = metrics or {}, state.global_step
            if "eval_loss" in metrics:  # GRPO's evaluation reports rewards only
                self.history["evals"].append({"step": state.global_step, "loss": float(metrics["eval_loss"])})
            self.logger.scalars({f"eval/{k[5:]}": float(v) for k, v in metrics.items()
                                 if k.startswith("eval_") and isinstance(v, (int, float))}, state.global_step)
            shown = [k for k in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_reward")
                     if k in metrics]
            self.say(f"eval at step {state.global_step}:"
                     + "".join(f" {k[5:].split('/')[-1]} {float(metrics[k]):.4f}" for k in shown))
            self.samples(model, state.global_step)
            self.plot()

        def on_save(self, args, state, control, **kw):
            self.plot()

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def samples(self, model, at: int) -> None:
            if self.recipe.eval.prompts and model is not None:
                from .evaluation import print_samples
                from .setup import base_model
                print_samples(base_model(model), self.tokenizer, self.recipe.eval.prompts,
                              self.recipe.eval.max_new_tokens, at, self.say, self.logger)

        def plot(self) -> None:
            from .logging import plot_losses
            plot_losses(self.recipe.output_dir / "loss.png", self.history["losses"], self.history["evals"],
                        title=self.recipe.run_name)

    return RunCallback


# ---- the run ------------------------------------------------------------------------------------------------------

def train_objective(recipe: Recipe, *, tokenizer=None, progress: Optional[bool] = None,
                    log: Callable[[str], None] = None, on_step: Optional[Callable[[int, float], None]] = None):
    """Run a recipe whose ``train.objective`` is dpo, orpo or grpo; returns the SFT loop's ``TrainResult``.

    Raises TrainingSetupError / RecipeError / DataError (bad input), TrainingError (the run failed) and
    TrainingInterrupted (Ctrl-C; a checkpoint was saved at the end of the step)."""
    from accelerate.utils import set_seed

    from ..tuners.trl_support import RWKVAdapterCallback
    from .logging import RunLogger
    from .loop import TrainResult
    from .setup import base_model, build_model, check_hub_token, load_tokenizer, say_to

    tc, obj = recipe.train, recipe.train.objective
    say = say_to(True, log)
    check_supported(recipe)
    check_hub_token(recipe)
    rewards = reward_functions(recipe) if obj == "grpo" else None
    resume_from = checkpoint_to_resume(recipe)
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    set_seed(tc.seed)

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model, say)
    train_ds, eval_ds = objective_datasets(recipe, say)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(recipe, device, say)
    vocab = base_model(model).config.vocab_size
    if len(tokenizer) > vocab:
        raise TrainingSetupError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                 f"{vocab}: they do not belong together (model.tokenizer)")
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    show_bar = progress if progress is not None else sys.stderr.isatty()
    logger = RunLogger(out, tc.report_to, recipe.to_dict(), recipe.run_name, enabled=True, log=say)
    run_cb = _run_callback_class()(recipe, tokenizer, logger, say, show_bar, on_step)
    adapter_cb = RWKVAdapterCallback(adapter_dir=False)  # checkpoints hold our state; the final save is below
    trainer = make_trainer(recipe, model, tokenizer, train_ds, eval_ds,
                           [run_cb] + ([adapter_cb] if recipe.method.kind != "full" else []), rewards)
    for cls in _printing_callbacks():  # our callback prints (a bar, or a line every log_every steps)
        trainer.remove_callback(cls)
    say(f"{base_model(model).config.describe()} | objective {obj} (TRL {TRAINER_NAMES[obj]}) | method "
        f"{recipe.method.kind} | trainable {n_train:,} of {n_all:,} parameters | {len(train_ds)} train rows"
        + (f", {len(eval_ds)} eval rows" if eval_ds is not None else "")
        + f" | batch {tc.batch_size} x accum {tc.grad_accum}")
    if resume_from is not None:
        resume_state(recipe, trainer, run_cb, resume_from, say)
    seconds = run_trainer(trainer, run_cb, resume_from, out, logger, say)
    with quiet_trainer_warnings():  # the final evaluation runs TRL's reference pass too
        return finish(recipe, trainer, run_cb, tokenizer, logger, say, seconds, TrainResult)


def resume_state(recipe: Recipe, trainer, run_cb, folder: Path, say) -> None:
    """What TRL's resume leaves out: our state (its weights restore peft's adapter only) and the loss history."""
    say(f"resuming from {folder}")
    if recipe.method.state_tuning.enabled:
        from ..tuners.trl_support import load_state_from
        load_state_from(trainer.model, folder)
    logged = json.loads((folder / "trainer_state.json").read_text()).get("log_history", [])
    run_cb.history["losses"] = [float(e["loss"]) for e in logged if "loss" in e and "eval_loss" not in e]


def run_trainer(trainer, run_cb, resume_from: Optional[Path], out: Path, logger, say) -> float:
    """``trainer.train()``; returns the seconds it took. The first Ctrl-C lets the step finish, saves a checkpoint
    there and stops (``TrainingInterrupted`` naming it); a second one stops at once (naming the last one)."""
    from .loop import TrainingInterrupted
    t0 = time.perf_counter()
    flush = not torch.cuda.is_available() and torch.set_flush_denormal(True)  # as the SFT loop (loop.py)
    old_handler, installed = signal.getsignal(signal.SIGINT), False
    try:
        if old_handler is signal.default_int_handler:
            try:
                signal.signal(signal.SIGINT, run_cb.request_stop)
                installed = True
            except ValueError:  # not the main thread: Ctrl-C stops at once
                pass
        with quiet_trainer_warnings():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        run_cb.stop_requested = True
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if installed:
            signal.signal(signal.SIGINT, old_handler)
    if run_cb.stop_requested:
        run_cb.on_train_end(None, None, None)
        found = last_checkpoint(out / CHECKPOINTS)
        run_cb.plot()
        logger.close()
        say(f"interrupted at step {trainer.state.global_step}"
            + (f"; checkpoint {found} (resume with --set train.resume=true)" if found else ""))
        raise TrainingInterrupted(found)
    return time.perf_counter() - t0


@contextlib.contextmanager
def quiet_trainer_warnings():
    """Notices a run through TRL prints at every step or checkpoint that say nothing about it: transformers 5.2x
    renaming gradient checkpointing (TRL's reference pass toggles it), and peft looking for a config.json beside a
    ``.pth`` base when the trainer saves a checkpoint (the vocabulary is never resized here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Could not find a config file in .* - will assume that the "
                                                  r"vocabulary was not modified", category=UserWarning)
        yield


def _printing_callbacks():
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    return PrinterCallback, ProgressCallback


def finish(recipe: Recipe, trainer, run_cb, tokenizer, logger, say, seconds: float, result_class):
    """The final evaluation, the adapter (or model) with its tokenizer, summary.json, the plot, the Hub push."""
    from ..convert import atomic_path
    from ..tuners.trl_support import save_trained_adapter, trained_model
    from .checkpoint import push_to_hub
    from .setup import base_model

    out, steps = recipe.output_dir, trainer.state.global_step
    if trainer.eval_dataset is not None and recipe.eval.at_end and run_cb.last_eval != steps:
        trainer.evaluate()
    model = trained_model(trainer.model)
    full = recipe.method.kind == "full"
    final = out / ("model" if full else "adapter")
    with atomic_path(final, is_dir=True) as tmp:
        if full:
            base_model(model).save_pretrained(str(tmp))
        else:
            save_trained_adapter(model, tmp)
        try:
            tokenizer.save_pretrained(str(tmp))
        except Exception as e:  # noqa: BLE001 - the weights are what matter
            say(f"note: the tokenizer was not saved beside the weights ({type(e).__name__}: {e})")
    say(f"saved {final}")
    h = run_cb.history
    summary = {"steps": steps, "objective": recipe.train.objective, "final_loss": h["losses"][-1] if h["losses"]
               else None, "evals": h["evals"], "tokens": h["tokens"], "seconds": round(seconds, 2),
               "output": str(final), "world_size": 1, "method": recipe.method.kind}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    run_cb.plot()
    logger.close()
    if recipe.hub.push:
        push_to_hub(recipe, final, say)
    return result_class(output_dir=out, final_dir=final, steps=steps, losses=list(h["losses"]),
                        evals=list(h["evals"]), tokens=h["tokens"], seconds=seconds)
