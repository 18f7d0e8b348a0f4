"""The training loop on Accelerate: ``train(recipe)``, read top to bottom.

    setup      (setup.py)       Accelerator, tokenizer, data, model + method(s), optimizer, schedule, resume
    each step  (step.py)        ``grad_accum`` micro-batches forward + backward, clip, optimizer step
               (evaluation.py)  every ``eval_every`` steps: eval loss and greedy samples
               (checkpoint.py)  every ``save_every`` steps: a checkpoint that resumes bit for bit
    the end                     final eval, adapter (or model) + tokenizer, summary.json, loss.png, Hub push

Data order is ours (batches.py): the data position is ``step * grad_accum`` micro-batches, which makes resume
exact. One host sync per step reads the micro-batch losses (the log line and the non-finite check).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..recipe import Recipe
from .batches import Stream, batch_of
from .checkpoint import (install_state_hooks, push_to_hub, resume, rng_snapshot, save_checkpoint, save_final)
from .evaluation import eval_metrics, evaluate_rows, print_samples
from .logging import RunLogger, Throughput, format_seconds, plot_losses
from .setup import (CHECKPOINTS, STATE_FILE, TrainingSetupError, base_model, build_model, check_hub_token,
                    check_output, enable_checkpointing, find_checkpoints, load_tokenizer, make_accelerator,
                    make_optimizer, make_scheduler, param_groups, say_to)
from .step import TrainingDiverged, TrainingError, check_finite, forward_backward

__all__ = ["train", "TrainResult", "TrainingError", "TrainingDiverged", "TrainingInterrupted",
           "TrainingSetupError", "build_model", "load_tokenizer", "enable_checkpointing", "evaluate_rows",
           "CHECKPOINTS", "STATE_FILE"]


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


@dataclass
class Run:
    """What the steps of one run share."""
    recipe: Recipe
    acc: Any
    model: Any
    optimizer: Any
    scheduler: Any
    stream: Stream
    train_rows: Any
    eval_rows: Any
    tokenizer: Any
    logger: RunLogger
    say: Callable[[str], None]
    total_steps: int
    save_adapter: Optional[Callable]                          # None in a full fine-tune
    step: int = 0
    history: Dict[str, Any] = field(default_factory=lambda: {"losses": [], "evals": [], "tokens": 0})

    @property
    def out(self) -> Path:
        return self.recipe.output_dir


def train(recipe: Recipe, *, tokenizer=None, progress: Optional[bool] = None, log: Callable[[str], None] = None,
          on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Run the recipe. ``on_step(step, loss)`` is called after every optimizer step (tests use it to interrupt).

    Raises TrainingSetupError / RecipeError / DataError (bad input), TrainingError (the run failed) and
    TrainingInterrupted (Ctrl-C; a checkpoint was saved).
    """
    # Once the loss gets small, CPU matmuls in the backward crawl on denormal numbers (a 1.2M model went from
    # ~1 s to several seconds a step); flushing them to zero during training keeps steps fast.
    flush = not torch.cuda.is_available() and torch.set_flush_denormal(True)
    try:
        run = setup_run(recipe, tokenizer, log)
        t0 = time.perf_counter()
        speed = run_steps(run, progress, on_step)
        return finish(run, speed, time.perf_counter() - t0)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def setup_run(recipe: Recipe, tokenizer, log) -> Run:
    from accelerate.utils import set_seed

    from ..data import build_datasets
    tc, dc = recipe.train, recipe.data
    acc = make_accelerator(tc)
    main, world = acc.is_main_process, acc.num_processes
    say = say_to(main, log)
    if tc.mixed_precision == "fp16" and acc.device.type == "cpu":
        say("note: fp16 mixed precision does nothing on a CPU (it is a GPU feature); bf16 works on both")
    check_hub_token(recipe)
    resume_from = check_output(recipe, main)
    acc.wait_for_everyone()
    if main:
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        (recipe.output_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    set_seed(tc.seed)

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model, say)
    with acc.main_process_first():
        train_rows, eval_rows = build_datasets(dc, tokenizer, seed=tc.seed, log=say if main else (lambda m: None))
    stream = Stream(len(train_rows), tc.batch_size, acc.process_index, world, tc.seed)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * stream.batches_per_epoch / tc.grad_accum))

    model = build_model(recipe, acc.device, say)
    vocab = base_model(model).config.vocab_size
    if len(tokenizer) > vocab:
        raise TrainingSetupError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                 f"{vocab}: they do not belong together (model.tokenizer)")
    if tc.gradient_checkpointing:
        enable_checkpointing(base_model(model))
    model.train()
    optimizer = make_optimizer(param_groups(model, tc, recipe.method.state_tuning.lr), tc)
    scheduler = make_scheduler(optimizer, tc, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    install_state_hooks(acc)
    from .. import methods
    run = Run(recipe, acc, model, optimizer, scheduler, stream, train_rows, eval_rows, tokenizer,
              RunLogger(recipe.output_dir, tc.report_to, recipe.to_dict(), recipe.run_name, enabled=main, log=say),
              say, total_steps, None if recipe.method.kind == "full" else methods.save_adapter)
    if resume_from is not None:
        run.step, run.history = resume(acc, resume_from, world, tc.batch_size, say)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{base_model(model).config.describe()} | method {recipe.method.kind} | trainable {n_train:,} of "
        f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(train_rows)} train rows"
        + (f", {len(eval_rows)} eval rows" if eval_rows is not None else "")
        + f" | {world} process(es) x batch {tc.batch_size} x accum {tc.grad_accum} | {total_steps} steps "
          f"({math.ceil(stream.batches_per_epoch / tc.grad_accum)} per epoch)")
    return run


def run_steps(run: Run, progress: Optional[bool], on_step) -> Throughput:
    """Optimizer steps until ``total_steps``, with logging, evaluation and checkpoints along the way."""
    tc, acc = run.recipe.train, run.acc
    show_bar = acc.is_main_process and (progress if progress is not None else sys.stderr.isatty())
    from tqdm.auto import tqdm
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not show_bar, unit="step", dynamic_ncols=True,
               desc=run.recipe.run_name)
    speed, t0, step0 = Throughput(), time.perf_counter(), run.step
    last_saved, rng_at_step = run.step, rng_snapshot()
    if run.step == 0 and run.recipe.eval.prompts:
        run.say("samples before training:")
        samples(run, 0)
    try:
        while run.step < run.total_steps:
            loss, grad_norm, tokens = one_step(run)
            rng_at_step = rng_snapshot()  # the step boundary: what a Ctrl-C checkpoint records
            speed.add(tokens)
            lr = run.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed.rate:,.0f}")
            bar.update(1)
            if run.step % tc.log_every == 0 or run.step == run.total_steps:
                log_step(run, loss, lr, grad_norm, speed, None if show_bar else (t0, step0))
            if run.eval_rows is not None and tc.eval_every and run.step % tc.eval_every == 0 \
                    and run.step < run.total_steps:
                evaluate(run)
            if tc.save_every and run.step % tc.save_every == 0 and run.step < run.total_steps:
                checkpoint(run)
                last_saved = run.step
            if on_step is not None:
                on_step(run.step, loss)
    except KeyboardInterrupt:
        bar.close()
        raise TrainingInterrupted(interrupted(run, last_saved, rng_at_step)) from None
    except TrainingDiverged:
        bar.close()
        write_plot(run)
        run.logger.close()
        raise
    bar.close()
    return speed


def one_step(run: Run):
    """One optimizer step; returns (mean token loss over all processes, grad norm or None, real tokens)."""
    tc, dc, acc = run.recipe.train, run.recipe.data, run.acc
    ga, step = tc.grad_accum, run.step
    micro = [run.stream.indices(step * ga + j) for j in range(ga)]
    batches = [batch_of(run.train_rows, idx) for idx in micro]
    losses, tokens = forward_backward(acc, run.model, batches, dc.long_context, dc.long_context.mode == "chunk")

    def where(j: int) -> str:
        epoch, b = run.stream.locate(step * ga + j)
        return f"micro-batch {j + 1} of {ga} (epoch {epoch + 1}, batch {b + 1}, rows {micro[j][:8]})"
    check_finite(losses.tolist(), step + 1, where)                         # the step's one host sync
    trainable = [p for p in run.model.parameters() if p.grad is not None]
    grad_norm = acc.clip_grad_norm_(trainable, tc.grad_clip) if tc.grad_clip else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss = losses.sum() / max(tokens, 1)
    if acc.num_processes > 1:
        loss = acc.reduce(loss, "mean")
    loss = float(loss)
    real = sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes
    run.history["losses"].append(loss)
    run.history["tokens"] += real
    return loss, grad_norm, real


def log_step(run: Run, loss: float, lr: float, grad_norm, speed: Throughput, eta_from) -> None:
    values = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": speed.rate}
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    run.logger.scalars(values, run.step)
    if eta_from is not None:
        t0, step0 = eta_from
        eta = (time.perf_counter() - t0) / max(1, run.step - step0) * (run.total_steps - run.step)
        run.say(f"step {run.step}/{run.total_steps} loss {loss:.4f} lr {lr:.2e} {speed.rate:,.0f} tok/s "
                f"eta {format_seconds(eta)}")


def evaluate(run: Run) -> Dict[str, float]:
    """Eval loss over every process's share of the eval rows, logged, then the samples and the plot."""
    acc, ev_cfg, dc = run.acc, run.recipe.eval, run.recipe.data
    chunk_len = dc.long_context.chunk_len if dc.long_context.mode == "chunk" else None
    batch_size = ev_cfg.batch_size or run.recipe.train.batch_size
    loss_sum, tokens = evaluate_rows(base_model(run.model), run.eval_rows, batch_size, chunk_len, acc.device, ev_cfg.max_batches, acc.process_index,
                                     acc.num_processes, autocast=acc.autocast)
    if acc.num_processes > 1:
        loss_sum, tokens = acc.reduce(loss_sum, "sum"), acc.reduce(tokens, "sum")
    ev = {"step": run.step, **eval_metrics(loss_sum, tokens)}
    if not run.history["evals"] or run.history["evals"][-1]["step"] != run.step:
        run.history["evals"].append(ev)
    run.logger.scalars({"eval/loss": ev["loss"], "eval/ppl": ev["ppl"]}, run.step)
    run.say(f"eval at step {run.step}: loss {ev['loss']:.4f} perplexity {ev['ppl']:.2f}")
    samples(run, run.step)
    write_plot(run)
    return ev


def samples(run: Run, at: int) -> None:
    if run.recipe.eval.prompts and run.acc.is_main_process:
        print_samples(base_model(run.model), run.tokenizer, run.recipe.eval.prompts, run.recipe.eval.max_new_tokens,
                      at, run.say, run.logger)


def checkpoint(run: Run, rng: Optional[dict] = None) -> Path:
    tc = run.recipe.train
    info = {"micro_batch": run.step * tc.grad_accum, "epoch": run.stream.locate(run.step * tc.grad_accum)[0],
            "total_steps": run.total_steps, "world_size": run.acc.num_processes, "batch_size": tc.batch_size,
            "grad_accum": tc.grad_accum, "method": run.recipe.method.kind, **run.history}
    dst = save_checkpoint(run.acc, run.model, run.out, run.step, info, tc.keep_checkpoints, run.save_adapter,
                          run.say, rng=rng)
    write_plot(run)
    return dst


def interrupted(run: Run, last_saved: int, rng_at_step: dict) -> Optional[Path]:
    """Ctrl-C: save a checkpoint at the last step boundary (single process), or name the last one saved."""
    ckpt = None
    if run.acc.num_processes == 1 and run.step > last_saved and run.step > 0:
        run.optimizer.zero_grad(set_to_none=True)
        ckpt = checkpoint(run, rng=rng_at_step)
    elif last_saved > 0:
        found = find_checkpoints(run.out / CHECKPOINTS)
        ckpt = found[-1] if found else None
    write_plot(run)
    run.logger.close()
    run.say(f"interrupted at step {run.step}"
            + (f"; checkpoint {ckpt} (resume with --set train.resume=true)" if ckpt else ""))
    return ckpt


def write_plot(run: Run) -> None:
    if run.acc.is_main_process:
        plot_losses(run.out / "loss.png", run.history["losses"], run.history["evals"], title=run.recipe.run_name)


def finish(run: Run, speed: Throughput, seconds: float) -> TrainResult:
    """The final eval, the adapter (or model) with its tokenizer, summary.json, the plot, the Hub push."""
    acc, recipe = run.acc, run.recipe
    if run.eval_rows is not None and recipe.eval.at_end:
        evaluate(run)
    final = save_final(acc, run.model, run.save_adapter, run.tokenizer, run.out, run.say)
    h = run.history
    if acc.is_main_process:
        summary = {"steps": run.step, "final_loss": h["losses"][-1] if h["losses"] else None, "evals": h["evals"],
                   "tokens": h["tokens"], "seconds": round(seconds, 2), "tokens_per_s": round(speed.rate, 1),
                   "output": str(final) if final else None, "world_size": acc.num_processes,
                   "method": recipe.method.kind}
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plot(run)
    run.logger.close()
    if acc.is_main_process and recipe.hub.push and final is not None:
        push_to_hub(recipe, final, run.say)
    acc.wait_for_everyone()
    return TrainResult(output_dir=run.out, final_dir=final, steps=run.step, losses=list(h["losses"]),
                       evals=list(h["evals"]), tokens=h["tokens"], seconds=seconds)
