#!/usr/bin/env python3
"""Compare llama.cpp's logits on a GGUF written by `rwkv-peft export` with ours on the same tokens.

    python scripts/check_gguf.py MODEL model.gguf [--text "User: hi\\n\\nAssistant:"] [--tokens 0,261,33] [--tol X]

MODEL is what the GGUF was exported from (a .pth, one of our folders, or an adapter folder, merged onto its base).
llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`; it builds llama.cpp from source, about 25
minutes on 2 cores). Prints max |difference|, the relative error (max |diff| / max |ours|) and how often the top
token agrees, per position; with --text it also checks that llama.cpp tokenizes the text as we do (the token list
and types in the file). Exit codes: 0 within --tol, 1 outside it (or tokenization differs), 2 when llama-cpp-python
is not importable or an argument is bad. Default --tol by the file's type: f32 1e-3, f16/bf16 3e-2, q8_0 0.15
(measured with llama-cpp-python 0.3.36 on random 2-layer, width-256 models, World vocabulary: f32 5.6e-7 /
1.6e-6, f16 7.1e-4 / 2.8e-3, q8_0 1.9e-2 / 7.8e-2 for RWKV-7 / RWKV-6; q8_0's error depends on the weights). llama.cpp's ln_x group-norm eps is fixed at 64e-5: a model whose head size
is not 64 differs a little more.
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_TOL = {0: 1e-3, 1: 3e-2, 32: 3e-2, 7: 0.15}  # by general.file_type
DEFAULT_TEXT = "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.\n\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help="the model the GGUF was exported from (.pth, folder, adapter folder)")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--text", default=None, help=f"text to tokenize and run (default: {DEFAULT_TEXT!r})")
    p.add_argument("--tokens", default=None, help="comma-separated token ids to run instead of --text")
    p.add_argument("--tol", type=float, default=None, help="largest relative error accepted (default: by type)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def llama_logits(path: str, tokens, threads: int):
    """(llama.cpp logits [T, V] as a list of rows, the Llama object)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(tokens) + 8), n_batch=max(8, len(tokens)),
                          logits_all=True, n_threads=threads, verbose=False)
    llm.reset()
    llm.eval(tokens)
    return [list(row) for row in llm.scores[:len(tokens)]], llm


def our_logits(model_spec: str, tokens):
    import torch

    from rwkv_peft.commands._common import is_adapter_dir, resolve_input
    from rwkv_peft.methods import load_base_model
    src = resolve_input(model_spec, "MODEL")
    if is_adapter_dir(src):
        from rwkv_peft.merge import merge_adapters
        model = merge_adapters(None, [src], dtype="float32")
    else:
        model = load_base_model(src, dtype="float32")
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokens])).logits[0].float()


def file_type(path: str) -> int:
    import gguf
    field = gguf.GGUFReader(path).fields.get("general.file_type")
    return int(field.parts[field.data[0]][0]) if field is not None else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"llama-cpp-python is not importable here ({e}); nothing was compared.\n"
              f"Install it (`pip install llama-cpp-python`, a source build of llama.cpp: about 25 minutes on 2 "
              f"cores) and run this again.", file=sys.stderr)
        return 2
    import torch

    from rwkv_peft.tokenization import RWKVWorldTokenizer
    text = args.text if args.text is not None else DEFAULT_TEXT
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else RWKVWorldTokenizer().encode(text)
    if not tokens:
        print("error: no tokens to run", file=sys.stderr)
        return 2
    theirs, llm = llama_logits(args.gguf, tokens, args.threads)
    theirs = torch.tensor(theirs, dtype=torch.float32)
    ours = our_logits(args.model, tokens)
    diff = (theirs - ours).abs()
    rel = float(diff.max() / ours.abs().max())
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    tol = args.tol if args.tol is not None else DEFAULT_TOL.get(file_type(args.gguf), 0.15)
    print(f"{'pos':>4} {'token':>6} {'max|diff|':>10} {'top ours':>9} {'top llama':>9}")
    for t, tok in enumerate(tokens):
        print(f"{t:>4} {tok:>6} {float(diff[t].max()):>10.3g} {int(ours[t].argmax()):>9} {int(theirs[t].argmax()):>9}")
    same_tokens = None
    if not args.tokens:
        theirs_tok = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        same_tokens = list(theirs_tok) == tokens
        print(f"tokenization: {'same' if same_tokens else 'DIFFERENT'} ({len(tokens)} ids ours, "
              f"{len(theirs_tok)} llama.cpp)")
    ok = rel <= tol and same_tokens is not False
    print(f"relative error {rel:.3g} (tolerance {tol:g}), top-token agreement {agree:.0%}: {'OK' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gguf": args.gguf, "model": args.model, "tokens": tokens, "rel_err": rel,
                       "max_abs": float(diff.max()), "top_agree": agree, "tol": tol,
                       "same_tokenization": same_tokens, "ok": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
