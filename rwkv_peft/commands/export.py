"""rwkv-peft export SRC OUT"""
import sys
from pathlib import Path

from ._common import UsageError

HELP = ("export a state adapter to a runtime state file (.pth: official package / RWKV-Runner; .state: Ai00), or "
        "an adapter (merged) / checkpoint to .pth, HF or GGUF (llama.cpp, ollama)")

EPILOG = """\
examples:
  rwkv-peft export outputs/run1/adapter persona_state.pth      state adapter -> runtime state file (RWKV-Runner)
  rwkv-peft export outputs/run1/adapter persona.state          state adapter -> Ai00 state file (--format ai00)
  rwkv-peft export persona_state.pth persona.safetensors      runtime state -> self-describing state adapter
  rwkv-peft export outputs/run1/adapter merged/ --what model  merged model (base: recorded in the adapter)
  rwkv-peft export outputs/run1/adapter merged.pth --base base.pth --what model   merged into a given base
  rwkv-peft export model.pth model_hf/                        checkpoint layout conversion
  rwkv-peft export model.pth model-q8_0.gguf --dtype q8_0     GGUF for llama.cpp / ollama (RWKV-7, RWKV-6)
  rwkv-peft export outputs/run1/adapter merged.gguf           adapter merged onto its base, as GGUF

A runtime state file holds blocks.N.att.time_state shaped [H, N, N] (S[h, value, key], fp32): the layout the
official rwkv package and RWKV-Runner load as the initial state (RWKV-Runner lists state-models/*.pth). A
.state file (--format ai00) is Ai00's: safetensors with the same keys, S[h, key, value], float16 (what Ai00 reads
through web-rwkv; list it under [[state]] in Ai00's Config.toml). Neither runtime reads token-shift states.
--format picks the runtime explicitly and must agree with OUT's suffix. SRC and --base accept what a recipe's
model.path accepts (assets:NAME, ~, .pth files, folders). A .gguf output always holds the (merged) model, with
the RWKV World tokenizer; --dtype f32/f16/bf16/q8_0 (default: bf16 for a bf16 model, else f16). GGUF cannot
hold a learned initial state (state tuning): export that as a runtime state .pth instead.
"""

STATE_OUTPUTS = {".pth": "runtime state", ".safetensors": "state adapter"}
MODEL_OUTPUTS = {".pth": "BlinkDL checkpoint", ".gguf": "GGUF for llama.cpp / ollama", "": "Hugging Face model"}
DTYPES = ["float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0"]


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("src", help="an adapter folder, a state file (.pth / .safetensors / Ai00 .state) or a model "
                               "checkpoint (.pth, folder, assets:NAME)")
    p.add_argument("out", help="a .pth file, a .safetensors state file, an Ai00 .state file, a .gguf, or a folder "
                               "(Hugging Face model)")
    p.add_argument("--what", choices=["auto", "state", "model"], default="auto",
                   help="export the state or the merged model (default: the state when SRC holds one and no "
                        "--base is given)")
    p.add_argument("--base", help="base checkpoint to merge an adapter into (default: recorded in the adapter)")
    p.add_argument("--format", choices=["runner", "ai00"], default=None, dest="runtime_format",
                   help="the runtime a state file is for: runner (RWKV-Runner / official package .pth, fp32, "
                        "S[h, value, key]) or ai00 (Ai00 / web-rwkv .state, safetensors fp16, S[h, key, value]); "
                        "default: by OUT's suffix (.pth: runner, .state: ai00)")
    p.add_argument("--dtype", choices=DTYPES, metavar="DTYPE",
                   help="dtype of exported model weights: float32, bfloat16, float16; for .gguf also f32, bf16, "
                        "f16 and q8_0")


def run(args) -> int:
    from ..export import ExportError, _is_state_source, export_state
    from ..methods.adapter_io import AdapterMismatchError
    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from ._common import (check_output, convert_model, is_adapter_dir, resolve_base, resolve_input, shown,
                          write_model)

    src = resolve_input(args.src, "SRC")
    try:
        state_source = _is_state_source(src)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    to_gguf = Path(args.out).suffix.lower() == ".gguf"
    runtime_format = getattr(args, "runtime_format", None)
    runtime_file = runtime_format is not None or Path(args.out).suffix.lower() == ".state"
    as_state = not to_gguf and (args.what == "state" or (args.what == "auto" and args.base is None and state_source))
    if runtime_format is not None and not as_state:
        raise UsageError(f"--format {runtime_format} is for state files; this export writes a model (OUT "
                         f"{args.out!r}" + (", --what model" if args.what == "model" else "")
                         + (", --base given" if args.base else "") + ")")
    if args.dtype and args.dtype not in ("float32", "bfloat16", "float16") and not to_gguf:
        raise UsageError(f"--dtype {args.dtype}: {args.dtype} is a GGUF type; a .pth or Hugging Face export takes "
                         f"float32, bfloat16 or float16")
    try:
        if to_gguf:
            return _export_gguf(args, src, state_source)
        if as_state:
            if not state_source:
                raise UsageError(f"SRC {args.src!r} holds no state to export (no state_adapter.safetensors, no "
                                 f"blocks.N.att.time_state); use --what model to export the model")
            if runtime_file:
                from ..runtime_states import format_for_output
                out = Path(args.out)
                format_for_output(args.out, runtime_format)  # OUT's suffix agrees with --format
            else:
                more = "a .state file is Ai00's runtime state (--format ai00)"
                out, _ = check_output(args.out, STATE_OUTPUTS, arg="OUT", command="export (a state)",
                                      hint=f"add --what model to export the merged model instead; {more}"
                                      if is_adapter_dir(src) and args.what == "auto" else more)
            msg = export_state(src, out, runtime_format=runtime_format).replace(str(src), shown(args.src), 1)
            if is_adapter_dir(src) and (src / "adapter_config.json").is_file():
                msg += (" (the folder's LoRA is not part of a state file: use --what model to export the merged "
                        "model)")
            print(msg)
            return 0
        out, kind = check_output(args.out, MODEL_OUTPUTS, arg="OUT", command="export (a model)")
        if is_adapter_dir(src):
            from ..merge import merge_adapters
            base_spec, base = resolve_base(args.base, src, model_arg="--base")
            model = merge_adapters(base, [src], dtype="float32")
            desc = write_model(model, out, kind, dtype=args.dtype, tokenizer_from=[src, base])
            print(f"merged {shown(args.src)} into {shown(base_spec)} -> {desc}")
            return 0
        if args.base:
            raise UsageError(f"--base is for merging an adapter; SRC {args.src!r} is a model checkpoint")
        print(convert_model(src, out, kind, dtype=args.dtype))
    except (CheckpointError, AdapterMismatchError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _export_gguf(args, src, state_source: bool) -> int:
    """SRC -> .gguf (rwkv_peft.export_gguf): a checkpoint as it is, an adapter merged onto its base first."""
    from ..export_gguf import export_gguf
    from ._common import is_adapter_dir, resolve_base, shown

    if args.what == "state" or (state_source and not is_adapter_dir(src)):
        raise UsageError(f"OUT {args.out!r}: a GGUF holds a model, not a state; export the state to a .pth "
                         f"(runtime state) or .safetensors file")
    if is_adapter_dir(src):
        base_spec, base = resolve_base(args.base, src, model_arg="--base")
        msg = export_gguf(src, args.out, dtype=args.dtype, base=base)
        print(f"merged {shown(args.src)} into {shown(base_spec)} -> " + msg.replace(str(args.out), shown(args.out), 1))
        return 0
    if args.base:
        raise UsageError(f"--base is for merging an adapter; SRC {args.src!r} is a model checkpoint")
    print(f"{shown(args.src)} -> " + export_gguf(src, args.out, dtype=args.dtype).replace(str(args.out),
                                                                                          shown(args.out), 1))
    return 0
