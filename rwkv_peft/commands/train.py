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
    from ..recipe import RecipeError, check_paths, load_recipe
    from ..training import TrainingInterrupted, train

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
    if result.final_dir is not None:
        print(result.final_dir)
        print(next_steps(recipe, args.recipe, result.final_dir, args.overrides), file=sys.stderr)
    return 0


def next_steps(recipe, recipe_arg: str, final_dir, overrides=()) -> str:
    """The commands that use what a run made, with its real paths as the user gave them (never made absolute)."""
    from pathlib import Path

    from ..tuners.state_tuning import STATE_FILE
    from ._common import quoted

    final_dir = Path(final_dir)
    run_dir, made = final_dir.parent, quoted(final_dir)
    lines = [f"Next steps (from this folder; {made} is what this run made):"]
    if (final_dir / "adapter_config.json").is_file() or (final_dir / STATE_FILE).is_file():
        base = quoted(recipe.model.path)
        merged = quoted(run_dir / "merged")
        lines += [
            "  # chat with it (/help in the chat lists its commands; the base is recorded in the adapter, so "
            f"{base} may be left out)",
            f"  rwkv-peft chat {base} --adapter {made}",
            "  # merge it into the base: a Hugging Face folder with the tokenizer (--out NAME.pth writes a BlinkDL "
            ".pth), then chat with that",
            f"  rwkv-peft merge --base {base} --adapter {made} --out {merged}",
            f"  rwkv-peft chat {merged}",
        ]
        if (final_dir / STATE_FILE).is_file():
            lines += ["  # export the tuned state: the initial-state file RWKV runtimes load (blocks.N.att.time_state)",
                      f"  rwkv-peft export {made} {quoted(run_dir / 'state.pth')}"]
    else:
        lines += ["  # chat with it (/help in the chat lists its commands)",
                  f"  rwkv-peft chat {made}",
                  "  # export it as a BlinkDL .pth for RWKV runtimes",
                  f"  rwkv-peft export {made} {quoted(run_dir / 'model.pth')}"]
    # eval reads the same recipe: the --set values that say where the data and the run are, not how to train
    keep = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] in ("data", "output", "model", "eval")
            and not o.replace(" ", "").startswith("output.overwrite=")]
    if recipe.train.objective == "sft":  # eval reads sft data (preference / prompt rows have no one answer)
        lines += ["  # loss and perplexity on the recipe's held-out data",
                  f"  rwkv-peft eval {quoted(recipe_arg)}" + "".join(f" --set {quoted(o)}" for o in keep)]
    return "\n".join(lines)
