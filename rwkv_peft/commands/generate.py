"""rwkv-peft generate [MODEL] [--adapter DIR] --prompt TEXT"""
import sys

from ._common import MODEL_OPTIONAL_HELP, UsageError, load_for_inference  # noqa: F401 (load_for_inference: API)

HELP = "generate text from a model (.pth, folder or assets:NAME), optionally with an adapter folder or a state file"


def add_arguments(p):
    p.add_argument("model", nargs="?", help=MODEL_OPTIONAL_HELP)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads standard input)")
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or state)")
    p.add_argument("--state", help="a state file (runtime .pth with blocks.N.att.time_state, or .safetensors)")
    p.add_argument("--tokenizer", help="'world' or a tokenizer folder (default: the adapter's, else the model "
                                       "folder's, else the World tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("--prompt is empty")
    model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, device, state=args.state)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             pad_token_id=0, **(sampling if args.temperature > 0 else {"do_sample": False}))
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
