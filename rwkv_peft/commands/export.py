"""rwkv-peft export SRC OUT"""
import sys

HELP = "export a state adapter to a runtime state .pth, or an adapter (merged) / checkpoint to .pth or HF"

EPILOG = """\
examples:
  rwkv-peft export outputs/run1/adapter persona_state.pth      state adapter -> runtime state file
  rwkv-peft export persona_state.pth persona.safetensors      runtime state -> self-describing state adapter
  rwkv-peft export outputs/run1/adapter merged.pth --base base.pth --what model   merged model
  rwkv-peft export model.pth model_hf/                        checkpoint layout conversion

A runtime state file holds blocks.N.att.time_state shaped [H, N, N] (S[h, value, key], fp32): the layout the
official rwkv package and RWKV runtimes load as the initial state.
"""


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("src", help="an adapter folder, a state file (.pth / .safetensors) or a model checkpoint")
    p.add_argument("out", help="a .pth file, a .safetensors state file, or a folder (Hugging Face model)")
    p.add_argument("--what", choices=["auto", "state", "model"], default="auto",
                   help="export the state or the merged model (default: the state when SRC holds one and no "
                        "--base is given)")
    p.add_argument("--base", help="base checkpoint to merge an adapter into (default: recorded in the adapter)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of exported model weights")


def run(args) -> int:
    from ..export import export
    from ..models.rwkv7.convert_rwkv7 import CheckpointError

    try:
        print(export(args.src, args.out, what=args.what, base=args.base, dtype=args.dtype))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
