"""rwkv-peft doctor"""
import platform

HELP = ("print the versions, devices and the WKV kernel path in use, and why (on a GPU this builds the kernel, "
        "or loads its cached build)")


def add_arguments(p):
    pass


def run(args) -> int:
    import torch
    import transformers
    import peft

    from .. import __version__
    from ..ops.wkv6 import select_backend as select_v6
    from ..ops.wkv7 import select_backend

    print(f"rwkv-peft {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  peft {peft.__version__}")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    for dev in (["cuda"] if cuda else []) + ["cpu"]:
        for title, select in (("WKV-7", select_backend), ("WKV-6", select_v6)):
            try:
                name, why = select(torch.device(dev))
            except RuntimeError as e:
                name, why = "error", str(e)
            print(f"{title} path on {dev}: {name} ({why})")
    print(cpu_decoding_line())
    try:
        from ..ops import wkv7_cuda
        describe = getattr(wkv7_cuda, "describe", None) or getattr(wkv7_cuda, "build_info", None)
        if describe:
            print(describe())
    except ImportError:
        pass
    return 0


def cpu_decoding_line() -> str:
    """What ``chat`` / ``generate --cpu-weights`` can use on this machine's CPU."""
    import torch

    from ..methods.cpu_decoding import fbgemm_engine, reduce_range_needed
    if not fbgemm_engine():
        return (f"CPU decoding (--cpu-weights): fp32 only (PyTorch's quantized engine is "
                f"{torch.backends.quantized.engine!r}, not fbgemm)")
    bits = 7 if reduce_range_needed() else 8
    return f"CPU decoding (--cpu-weights): fp32, fp16, int8 (fbgemm; int8 activations in {bits} bits)"
