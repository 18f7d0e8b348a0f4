"""rwkv-peft validate RECIPE [--set KEY=VALUE ...]"""
import sys

HELP = "check a recipe (keys, values, the files it names) without loading anything; --print shows it resolved"


def add_arguments(p):
    p.add_argument("recipe", help="a YAML recipe (see recipes/ and docs/recipes.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--no-check-files", action="store_true",
                   help="check only the recipe itself, not that its model and data files exist")
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved recipe (defaults filled in)")


def run(args) -> int:
    from ..recipe import RecipeError, check_paths, load_recipe
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {args.recipe} is not a valid recipe:", file=sys.stderr)
        for line in e.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    problems = [] if args.no_check_files else check_paths(recipe)
    if problems:
        print(f"error: {args.recipe}: files it names are missing:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.show:
        print(recipe.to_yaml(), end="")
    print(f"{args.recipe}: valid ({recipe.method.kind} on {recipe.model.path}, {recipe.data.format} data; "
          f"outputs in {recipe.output_dir})", file=sys.stderr)
    return 0
