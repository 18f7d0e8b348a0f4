"""rwkv-peft eval RECIPE [--adapter DIR | --model PATH | --base]"""
import json
import sys

HELP = "loss and perplexity of a trained run (or its base model) on the recipe's held-out data"


def add_arguments(p):
    p.add_argument("recipe", help="the recipe of the run (its data and eval sections say what to evaluate on)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="an adapter folder to put on the recipe's base model")
    which.add_argument("--model", help="a full model (.pth or HF folder) instead of the recipe's base")
    which.add_argument("--base", action="store_true", help="the recipe's base model as it is")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import math

    from ..data import DataError, build_datasets
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from ..recipe import RecipeError, load_recipe, resolve_path
    from ..training.loop import TrainingSetupError, _plain_load, evaluate_rows, load_tokenizer

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        quiet = (lambda m: print(m, file=sys.stderr))
        tokenizer = load_tokenizer(recipe.model, quiet)
        _, rows = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, log=quiet)
        if rows is None:
            return fail(f"{args.recipe}: no held-out data: set data.eval or data.eval_split")
        out = recipe.output_dir
        target = args.adapter or args.model
        if not (target or args.base):
            for cand in (out / "adapter", out / "model"):
                if cand.is_dir():
                    target = str(cand)
                    break
            else:
                return fail(f"{out}: no trained adapter/ or model/ here yet; pass --adapter, --model or --base")
        mcfg = recipe.model
        if target and (resolve_path(target) / "adapter_config.json").is_file() or args.adapter:
            from .. import methods
            base = methods.load_base_model(str(resolve_path(mcfg.path)), dtype=mcfg.dtype,
                                           quantization=mcfg.quantization, double_quant=mcfg.double_quant)
            model = methods.load_adapter(base, str(resolve_path(target)))
            what = f"{target} on {mcfg.path}"
        elif target:
            model = _plain_load(mcfg.model_copy(update={"path": str(target), "quantization": None}))
            what = str(target)
        else:
            model = _plain_load(mcfg)
            what = f"{mcfg.path} (base)"
        chunk = recipe.data.long_context.chunk_len if recipe.data.long_context.mode == "chunk" else None
        loss_sum, tokens = evaluate_rows(model, rows, recipe.eval.batch_size or recipe.train.batch_size, chunk,
                                         max_batches=recipe.eval.max_batches)
    except (RecipeError, DataError, CheckpointError, TrainingSetupError) as e:
        return fail(str(e))
    loss = float(loss_sum / tokens.clamp_min(1))
    result = {"model": what, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens),
              "rows": len(rows)}
    print(json.dumps(result) if args.json else
          f"{what}: loss {loss:.4f}, perplexity {result['ppl']:.3f} over {int(tokens)} tokens ({len(rows)} rows)")
    return 0
