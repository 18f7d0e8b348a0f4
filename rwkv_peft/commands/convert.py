"""rwkv-peft convert SRC DST"""
import sys

HELP = "convert a checkpoint: BlinkDL .pth -> Hugging Face folder, HF or fla folder -> .pth (DST ends in .pth) or HF"

OUTPUTS = {".pth": "BlinkDL checkpoint", "": "Hugging Face model, with the source folder's tokenizer"}


def add_arguments(p):
    p.add_argument("src", help="a BlinkDL .pth file, one of our HF folders, a flash-linear-attention RWKV-7 folder, "
                               "or assets:NAME")
    p.add_argument("dst", help="a folder (Hugging Face layout) or a file ending in .pth (BlinkDL layout)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast every tensor (default: keep each tensor's dtype, so the round trip is lossless)")


def run(args) -> int:
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from ._common import check_output, convert_model, resolve_input
    src = resolve_input(args.src, "SRC")
    dst, kind = check_output(args.dst, OUTPUTS, arg="DST", command="convert")
    try:
        print(convert_model(src, dst, kind, dtype=args.dtype))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
