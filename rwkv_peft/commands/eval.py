"""rwkv-peft eval RECIPE [--adapter DIR | --model PATH | --base]"""
import json
import sys

HELP = "loss and perplexity of a trained run (or its base model) on the recipe's held-out data"


def add_arguments(p):
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


def run(args) -> int:
    import math

    import torch

    from .. import methods
    from ..data import build_datasets
    from ..recipe import RecipeError, load_recipe, resolve_path
    from ..training.loop import evaluate_rows, load_tokenizer
    from ._common import is_adapter_dir, resolve_adapter, resolve_input, shown

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
        out, mcfg = recipe.output_dir, recipe.model
        target = as_adapter = None
        if args.adapter:
            target, as_adapter = resolve_adapter(args.adapter), True
        elif args.model:
            target = resolve_input(args.model, "--model")
            as_adapter = is_adapter_dir(target)
        elif not args.base:  # the run's own result
            target = next((c for c in (out / "adapter", out / "model") if c.is_dir()), None)
            if target is None:
                return fail(f"{shown(out)}: no trained adapter/ or model/ here yet; pass --adapter, --model or "
                            f"--base")
            as_adapter = is_adapter_dir(target)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
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
