"""rwkv-peft convert SRC DST"""
import sys

HELP = "convert a checkpoint: BlinkDL .pth -> Hugging Face folder, HF or fla folder -> .pth (DST ends in .pth) or HF"


def add_arguments(p):
    p.add_argument("src", help="a BlinkDL .pth file, one of our HF folders, or a flash-linear-attention RWKV-7 folder")
    p.add_argument("dst", help="a folder (Hugging Face layout) or a file ending in .pth (BlinkDL layout)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast every tensor (default: keep each tensor's dtype, so the round trip is lossless)")


def run(args) -> int:
    from ..convert import convert
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    try:
        print(convert(args.src, args.dst, dtype=args.dtype))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
