"""rwkv-peft chat MODEL [--adapter DIR | --state FILE]"""
import sys

HELP = "chat in the terminal; the RNN state carries the conversation (a persona state or adapter sets who speaks)"


def add_arguments(p):
    p.add_argument("model", help="our Hugging Face folder or a BlinkDL .pth")
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or a persona state)")
    p.add_argument("--state", help="a state file in the runtime format (blocks.N.att.time_state)")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: the model folder, else the World tokenizer)")
    p.add_argument("--user", default="User", help="the user's role name in the template")
    p.add_argument("--assistant", default="Assistant", help="the assistant's role name in the template")
    p.add_argument("--system", help="text put before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)


def sample(logits, temperature: float, top_p: float, generator=None) -> int:
    """Nucleus sampling on one row of logits (greedy when temperature is 0)."""
    import torch
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    return int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


class Conversation:
    """Feeds each turn once: the state after a reply is where the next turn starts."""

    def __init__(self, model, tok, user="User", assistant="Assistant", state=None):
        self.model, self.tok, self.user, self.assistant = model, tok, user, assistant
        self.state = state

    def feed(self, text: str):
        import torch
        ids = torch.tensor([self.tok(text).input_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model(ids, state=self.state, use_cache=True, logits_to_keep=1)
        self.state = out.state
        return out.logits[0, -1]

    def reply(self, message: str, max_new_tokens=300, temperature=1.0, top_p=0.5, generator=None):
        """Yield the reply's text as it is generated; stops at a blank line or end of text."""
        import torch
        logits = self.feed(f"{self.user}: {message}\n\n{self.assistant}:")
        stream, text = self.tok.stream_decoder(skip_special_tokens=True), ""
        for _ in range(max_new_tokens):
            t = sample(logits, temperature, top_p, generator)
            if t == 0:
                break
            with torch.no_grad():
                out = self.model(torch.tensor([[t]], device=self.model.device), state=self.state, use_cache=True)
            self.state, logits = out.state, out.logits[0, -1]
            piece = stream.put(t)
            text += piece
            if "\n\n" in text:
                yield piece.split("\n\n")[0]
                break
            yield piece
        else:
            yield stream.end()
        # the template's separator closes the turn in the state, as in training data
        if not text.endswith("\n\n"):
            self.feed("\n\n" if not text.endswith("\n") else "\n")


def run(args) -> int:
    import torch

    from ..models.rwkv7.convert_rwkv7 import CheckpointError
    from .generate import load_for_inference
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, device)
        if args.state:
            from ..methods import apply_state_tuning
            model = apply_state_tuning(model, init=args.state)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    chat = Conversation(model, tok, args.user, args.assistant)
    if args.system:
        chat.feed(args.system.rstrip() + "\n\n")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(f"{args.user}: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        print(f"{args.assistant}:", end="", flush=True)
        for piece in chat.reply(message, args.max_new_tokens, args.temperature, args.top_p, gen):
            print(piece, end="", flush=True)
        print("\n")
    return 0
