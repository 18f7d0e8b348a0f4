"""rwkv-peft eval RECIPE [--adapter DIR | --model PATH | --base] [--tasks T1,T2 [--include-path DIR] ...]

Without ``--tasks``: loss and perplexity on the recipe's held-out rows. With ``--tasks`` (or ``--include-path``):
lm-evaluation-harness tasks (``rwkv_peft.lm_eval_support``), the recipe's base and the fine-tuned model side by
side in one table.
"""
import json
import sys

HELP = ("loss and perplexity of a trained run (or its base model) on the recipe's held-out data; or lm-eval "
        "benchmarks (--tasks), base and fine-tuned side by side")

EPILOG = """\
examples:
  rwkv-peft eval recipes/quickstart.yaml                           loss / perplexity on the held-out rows
  rwkv-peft eval recipes/rwkv7-1.5b-lora.yaml --tasks hellaswag,lambada_openai --limit 200
  rwkv-peft eval RECIPE --tasks my_task --include-path my_tasks/   your own YAML tasks (e.g. over a local jsonl)
  rwkv-peft eval RECIPE --include-path my_tasks/qa.yaml --base     one task file, the base model only

With --tasks the table has one row per model: the recipe's base, then the run's adapter on it (or --adapter /
--model); --base gives the base row only. lm-eval's own tasks load their datasets from the Hugging Face Hub (a
network or a filled datasets cache). Needs lm-eval: pip install 'rwkv-peft[eval]'.
"""


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("recipe", help="the recipe of the run (its data and eval sections say what to evaluate on)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="an adapter folder to put on the recipe's base model (default: the run's "
                                         "adapter/ or model/ folder)")
    which.add_argument("--model", help="a full model instead of the recipe's base: a .pth, a model folder or "
                                       "assets:NAME")
    which.add_argument("--base", action="store_true", help="the recipe's base model as it is")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    lm = p.add_argument_group("lm-eval benchmarks (lm-evaluation-harness)")
    lm.add_argument("--tasks", default=None, metavar="T1,T2",
                    help="comma-separated lm-eval task names (hellaswag, lambada_openai, ... or tasks defined in "
                         "--include-path); runs them instead of the loss / perplexity evaluation")
    lm.add_argument("--include-path", default=None, metavar="DIR|TASK.yaml",
                    help="a folder of your own lm-eval YAML tasks, or one task file (its tasks run when --tasks is "
                         "not given)")
    lm.add_argument("--limit", type=_limit, default=None, metavar="N",
                    help="at most N examples per task (a number below 1: that fraction of them)")
    lm.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt "
                    "(default: the task's own setting)")
    lm.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per forward pass (default 8)")
    lm.add_argument("--max-length", type=int, default=4096, metavar="TOKENS",
                    help="longest context + continuation; longer ones are cut on the left (default 4096)")
    lm.add_argument("--bootstrap-iters", type=int, default=0, metavar="N",
                    help="bootstrap resamples for standard errors (default 0: no standard errors; lm-eval's own "
                         "default is 100000)")
    lm.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and the like (default 1234)")
    lm.add_argument("--verbose", action="store_true", help="show lm-eval's own log lines")


def _limit(text: str):
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of examples (or a fraction below 1)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return int(value) if value >= 1 and value.is_integer() else value


def run(args) -> int:
    if getattr(args, "tasks", None) or getattr(args, "include_path", None):
        return run_lm_eval(args)
    stray = [flag for flag, value in (("--limit", getattr(args, "limit", None)),
                                      ("--num-fewshot", getattr(args, "num_fewshot", None))) if value is not None]
    if stray:
        print(f"error: {', '.join(stray)}: lm-eval options; add --tasks (or --include-path) to run lm-eval tasks",
              file=sys.stderr)
        return 2
    import math

    from .. import methods
    from ..data import build_datasets
    from ..recipe import RecipeError, load_recipe, resolve_path
    from ..training.loop import evaluate_rows, load_tokenizer
    from ._common import shown

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.data.format in ("preference", "prompt"):  # DPO / ORPO pairs, GRPO prompts: no next-token targets
            return fail(f"{args.recipe}: data.format {recipe.data.format} (train.objective "
                        f"{recipe.train.objective}) has no targets to score a loss on; evaluate the run with "
                        f"--tasks (lm-eval), or with `rwkv-peft generate --adapter ...` on held-out prompts")
        quiet = (lambda m: print(m, file=sys.stderr))
        tokenizer = load_tokenizer(recipe.model, quiet)
        _, rows = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, log=quiet)
        if rows is None:
            return fail(f"{args.recipe}: no held-out data: set data.eval or data.eval_split")
        mcfg = recipe.model
        target, as_adapter = which_model(args, recipe.output_dir)
        if target is False:
            return fail(as_adapter)
        device, device_map = placement(args)
        if target is None or as_adapter:  # the recipe's base, as the run trained on it
            model = methods.load_base_model(str(resolve_path(mcfg.path)), dtype=mcfg.dtype,
                                            quantization=mcfg.quantization, double_quant=mcfg.double_quant,
                                            device_map=device_map)
            what = f"{mcfg.path} (base)"
            if as_adapter:
                model = methods.load_adapter(model, str(target))
                what = f"{shown(args.adapter or args.model or target)} on {mcfg.path}"
        else:
            model = methods.load_base_model(str(target), dtype=mcfg.dtype, device_map=device_map)
            what = shown(args.model or target)
        chunk = recipe.data.long_context.chunk_len if recipe.data.long_context.mode == "chunk" else None
        loss_sum, tokens = evaluate_rows(model, rows, recipe.eval.batch_size or recipe.train.batch_size, chunk,
                                         device=device, max_batches=recipe.eval.max_batches)
    except RecipeError as e:
        return fail(f"{args.recipe} is not a valid recipe:\n  " + "\n  ".join(e.problems))
    loss = float(loss_sum / tokens.clamp_min(1))
    result = {"model": what, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens),
              "rows": len(rows)}
    print(json.dumps(result) if args.json else
          f"{what}: loss {loss:.4f}, perplexity {result['ppl']:.3f} over {int(tokens)} tokens ({len(rows)} rows)")
    return 0


def which_model(args, out):
    """What ``--adapter`` / ``--model`` / ``--base`` (or nothing: the run's own result in ``out``) name:
    ``(target, is_adapter)``; ``(None, None)`` for the recipe's base; ``(False, message)`` when the run has none."""
    from ._common import is_adapter_dir, resolve_adapter, resolve_input, shown
    if args.adapter:
        return resolve_adapter(args.adapter), True
    if args.model:
        target = resolve_input(args.model, "--model")
        return target, is_adapter_dir(target)
    if args.base:
        return None, None
    target = next((c for c in (out / "adapter", out / "model") if c.is_dir()), None)
    if target is None:
        return False, f"{shown(out)}: no trained adapter/ or model/ here yet; pass --adapter, --model or --base"
    return target, is_adapter_dir(target)


def placement(args):
    """(the device ``--device`` names, default cuda when there is one; the matching ``device_map``)."""
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, ({"": device.index or 0} if device.type == "cuda" else "cpu")


def run_lm_eval(args) -> int:
    """``--tasks``: lm-eval tasks on the recipe's base and the fine-tuned model, one table (or ``--json``)."""

    from .. import methods
    from .. import lm_eval_support as lme
    from ..recipe import RecipeError, load_recipe, resolve_path
    from ..training.loop import load_tokenizer
    from ._common import shown

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        return fail(f"{args.recipe} is not a valid recipe:\n  " + "\n  ".join(e.problems))
    lme.require_lm_eval()
    lme.quiet_lm_eval(args.verbose)
    if args.batch_size < 1 or args.max_length < 2 or args.bootstrap_iters < 0:
        return fail(f"--batch-size {args.batch_size}, --max-length {args.max_length}, --bootstrap-iters "
                    f"{args.bootstrap_iters}: expected at least 1, 2 and 0")
    tasks = (args.tasks or "").split(",")
    manager, tasks = lme.task_manager(tasks, args.include_path)  # unknown tasks fail before any model loads
    log = (lambda m: print(m, file=sys.stderr))
    tokenizer = load_tokenizer(recipe.model, log)
    mcfg = recipe.model
    target, as_adapter = which_model(args, recipe.output_dir)
    if target is False:
        return fail(as_adapter)
    device, device_map = placement(args)

    def evaluate(model, name):
        log(f"lm-eval: {', '.join(tasks)} on {name}")
        lm = lme.wrap(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        res = lme.run_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                            bootstrap_iters=args.bootstrap_iters, seed=args.seed)
        return name, lme.scores(res)

    base = methods.load_base_model(str(resolve_path(mcfg.path)), dtype=mcfg.dtype, quantization=mcfg.quantization,
                                   double_quant=mcfg.double_quant, device_map=device_map)
    rows = [evaluate(base, f"{mcfg.path} (base)")]
    if target is not None:
        if as_adapter:  # on the base just evaluated: the adapter wraps it in place, no second copy is loaded
            tuned = methods.load_adapter(base, str(target))
            name = shown(args.adapter or args.model or target)
        else:
            del base
            tuned = methods.load_base_model(str(target), dtype=mcfg.dtype, device_map=device_map)
            name = shown(args.model or target)
        rows.append(evaluate(tuned, name))
    if args.json:
        print(json.dumps({"tasks": list(tasks), "limit": args.limit, "num_fewshot": args.num_fewshot,
                          "rows": [{"model": name, "results": {t: {m: {"value": v, "stderr": e}
                                                                   for m, (v, e) in ms.items()}
                                                               for t, ms in sc.items()}}
                                   for name, sc in rows]}))
    else:
        print(lme.table(rows))
    return 0
