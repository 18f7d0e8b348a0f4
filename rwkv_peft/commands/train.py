"""rwkv-peft train RECIPE [--set KEY=VALUE ...]"""
import sys

HELP = "fine-tune a model as a YAML recipe says (LoRA, state tuning, both, or full); multi-GPU via accelerate launch"


def add_arguments(p):
    p.add_argument("recipe", help="a YAML recipe (see recipes/ and docs/recipes.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set train.lr=2e-4 --set train.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run "
                                                         "(same as --set train.resume=true)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="the progress bar (auto: when stderr is a terminal; otherwise a line every log_every steps)")


def run(args) -> int:
    from ..data import DataError
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from ..recipe import RecipeError, check_paths, load_recipe
    from ..training import TrainingError, TrainingInterrupted, TrainingSetupError, train

    def fail(code, msg):
        print(f"error: {msg}", file=sys.stderr)
        return code

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as e:
        return fail(2, f"{args.recipe} is not a valid recipe:\n  " + "\n  ".join(e.problems))
    problems = check_paths(recipe)
    if problems:
        return fail(2, "files the recipe names are missing:\n  " + "\n  ".join(problems))
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    try:
        result = train(recipe, progress=progress)
    except TrainingInterrupted as e:
        print(f"interrupted; checkpoint: {e.checkpoint}" if e.checkpoint else "interrupted", file=sys.stderr)
        return 130
    except (RecipeError, DataError, CheckpointError, TrainingSetupError) as e:
        return fail(2, str(e))
    except TrainingError as e:
        return fail(1, str(e))
    if result.final_dir is not None:
        print(result.final_dir)
    return 0
