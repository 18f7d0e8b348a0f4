"""rwkv-peft merge [--base BASE] --adapter DIR [--adapter DIR2 --weights 0.7,0.3 --combine ties] --out OUT"""
import sys

from ._common import UsageError

HELP = "merge LoRA / state adapters into a base and write a .pth or Hugging Face folder"

EPILOG = """\
examples:
  rwkv-peft merge --adapter outputs/quickstart/adapter --out outputs/quickstart/merged   (base: from the adapter)
  rwkv-peft merge --base rwkv7-0.4B.pth --adapter outputs/run1/adapter --out merged.pth
  rwkv-peft merge --base base_hf/ --adapter a1/ --adapter a2/ --weights 0.7,0.3 --combine ties --out merged/
  rwkv-peft merge --base base.pth --adapter persona.pth --out base_with_state.pth   (a runtime state file)

Adapters trained on a quantized base are merged into the full-precision base given by --base (or the path
recorded in the adapter), never into re-quantized weights. Several LoRA adapters are combined with peft's
add_weighted_adapter (--combine); several states are summed with the same weights.
"""


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--base", help="the full-precision base: BlinkDL .pth, HF or fla folder, or assets:NAME (default: "
                                  "the base recorded in the first adapter's manifest)")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="an adapter folder (LoRA and/or state) or a state file (.pth / .safetensors); repeatable")
    p.add_argument("--weights", help="comma-separated weights, one per adapter (default: 1 for one adapter, "
                                     "1/n each for n)")
    p.add_argument("--combine", default="linear",
                   help="how several LoRA adapters combine: linear, cat, svd, ties, dare_linear, dare_ties, "
                        "magnitude_prune, ... (peft's add_weighted_adapter; default linear)")
    p.add_argument("--density", type=float, help="fraction kept by ties / dare / magnitude_prune (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed for DARE (default 0)")
    p.add_argument("--out", required=True, help="a file ending in .pth (BlinkDL) or a folder (Hugging Face; the "
                                                "tokenizer of the adapter or base goes with it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32: the merge is computed in float32)")


OUTPUTS = {".pth": "BlinkDL checkpoint", "": "Hugging Face model"}


def run(args) -> int:
    from ..merge import merge_adapters
    from ..methods.adapter_io import AdapterMismatchError
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from ._common import check_output, is_adapter_dir, resolve_base, resolve_input, shown, write_model

    out, kind = check_output(args.out, OUTPUTS, arg="--out", command="merge")
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights {args.weights!r}: expected numbers separated by commas") from None
        if len(weights) != len(args.adapter):
            raise UsageError(f"--weights {args.weights!r}: {len(weights)} weights for {len(args.adapter)} adapters")
    adapters = [resolve_input(a, "--adapter", kind="adapter") for a in args.adapter]
    first = adapters[0] if is_adapter_dir(adapters[0]) else None
    if args.base is None and first is None:
        raise UsageError(f"--adapter {args.adapter[0]!r} is a state file, which records no base: pass --base")
    base_spec, base = resolve_base(args.base, first, model_arg="--base")
    try:
        model = merge_adapters(base, adapters, weights=weights, combine=args.combine, density=args.density,
                               seed=args.seed)
        desc = write_model(model, out, kind, dtype=args.dtype, tokenizer_from=[first, base])
    except (CheckpointError, AdapterMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {', '.join(shown(a) for a in args.adapter)} into {shown(base_spec)} -> {desc}")
    return 0
