"""rwkv-peft generate MODEL --prompt TEXT"""
import sys

HELP = "generate text from a model folder or .pth (optionally with an adapter folder or a state file)"


def add_arguments(p):
    p.add_argument("model", help="our Hugging Face folder or a BlinkDL .pth")
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads standard input)")
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or state)")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: the model folder, else the World tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda():
    import torch
    return torch.cuda.is_available()


def load_for_inference(model_path, adapter=None, tokenizer=None, dtype="float32", device="cpu"):
    """(model, tokenizer) ready for generation; shared by ``generate`` and ``chat``."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..convert import causal_lm_class, load_any
    from ..tokenization import RWKVWorldTokenizer

    path = Path(model_path)
    if path.is_file():
        config, sd, _ = load_any(path)
        with torch.device("meta"):
            model = causal_lm_class(config)(config)
        model.load_state_dict(sd, assign=True)
        model = model.to(getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if adapter:
        from ..methods import load_adapter
        model = load_adapter(model, adapter)
    model = model.to(device).eval()
    tok_src = tokenizer or (path if path.is_dir() and (path / "tokenizer_config.json").is_file() else None)
    tok = AutoTokenizer.from_pretrained(tok_src) if tok_src else RWKVWorldTokenizer()
    return model, tok


def run(args) -> int:
    import torch

    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    ids = tok(prompt, return_tensors="pt").input_ids.to(args.device)
    sample = args.temperature > 0
    kw = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if sample else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=sample, pad_token_id=0, **kw)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
