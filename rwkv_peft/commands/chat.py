"""rwkv-peft chat [MODEL] [--adapter DIR | --state FILE]"""
import copy
import sys

from ._common import MODEL_OPTIONAL_HELP, StreamDecoder, UsageError

HELP = "chat in the terminal; the RNN state carries the conversation (a persona state or adapter sets who speaks)"

COMMANDS_HELP = """\
commands:
  /reset        start the conversation again from the starting state (the persona state, after --system)
  /help         this list
  /exit, /quit  leave (so does Ctrl-D; Ctrl-C stops a reply that is being written)
A line that starts with // is sent as a message starting with /."""

EPILOG = """\
examples:
  rwkv-peft chat assets:quickstart/model --adapter outputs/quickstart/adapter
  rwkv-peft chat --adapter outputs/quickstart/adapter          (the base recorded in the adapter)
  rwkv-peft chat models/RWKV-x070-World-1.5B.pth --state persona_state.pth
  printf 'hi\\n/reset\\nhi\\n' | rwkv-peft chat --adapter outputs/quickstart/adapter --temperature 0

""" + COMMANDS_HELP


def add_arguments(p):
    import argparse
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("model", nargs="?", help=MODEL_OPTIONAL_HELP)
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or a persona state)")
    p.add_argument("--state", help="a state file in the runtime format (blocks.N.att.time_state) or .safetensors")
    p.add_argument("--tokenizer", help="'world' or a tokenizer folder (default: the adapter's, else the model "
                                       "folder's, else the World tokenizer)")
    p.add_argument("--user", default="User", help="the user's role name in the template")
    p.add_argument("--assistant", default="Assistant", help="the assistant's role name in the template")
    p.add_argument("--system", help="text put before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


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
    """Feeds each turn once: the state after a reply is where the next turn starts.

    ``mark_start()`` remembers the current state (after a system prompt, say) and ``reset()`` goes back to it;
    without a mark, ``reset()`` goes back to the model's own initial state (its persona state, if any).
    """

    def __init__(self, model, tok, user="User", assistant="Assistant", state=None):
        self.model, self.tok, self.user, self.assistant = model, tok, user, assistant
        self.state = state
        self._start = copy.deepcopy(state)
        stop = {0}  # RWKV's end of text
        if getattr(tok, "eos_token_id", None) is not None:
            stop.add(int(tok.eos_token_id))
        self.stop_ids = stop

    def mark_start(self) -> None:
        self._start = copy.deepcopy(self.state)

    def reset(self) -> None:
        self.state = copy.deepcopy(self._start)

    def feed(self, text: str):
        import torch
        ids = torch.tensor([self.tok(text).input_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model(ids, state=self.state, use_cache=True, logits_to_keep=1)
        self.state = out.state
        return out.logits[0, -1]

    def reply(self, message: str, max_new_tokens=300, temperature=1.0, top_p=0.5, generator=None):
        """Yield the reply's text as it is generated; stops at a blank line (the turn separator) or end of text.

        Trailing newlines are held back until it is clear they do not start the blank line. If the caller stops
        early (Ctrl-C), ``close_turn()`` still closes the turn in the state.
        """
        import torch
        self._reply_text = ""
        logits = self.feed(f"{self.user}: {message}\n\n{self.assistant}:")
        stream = StreamDecoder(self.tok, skip_special_tokens=True)
        text, sent, ended = "", 0, False
        for _ in range(max_new_tokens):
            t = sample(logits, temperature, top_p, generator)
            if t in self.stop_ids:
                break
            with torch.no_grad():
                out = self.model(torch.tensor([[t]], device=self.model.device), state=self.state, use_cache=True)
            self.state, logits = out.state, out.logits[0, -1]
            text += stream.put(t)
            self._reply_text = text
            cut = text.find("\n\n")
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                sent, ended = cut, True
                break
            safe = len(text.rstrip("\n"))
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if not ended:
            text += stream.end()
            self._reply_text = text
            tail = text[sent:].rstrip("\n")
            if tail:
                yield tail
        self.close_turn()

    def close_turn(self) -> None:
        """Feed the template's separator unless the reply ended with it: the turn closes in the state as in the
        training data."""
        text = getattr(self, "_reply_text", None)
        if text is None:
            return
        self._reply_text = None
        if "\n\n" not in text:
            self.feed("\n" if text.endswith("\n") else "\n\n")


def run(args) -> int:
    import torch

    from ._common import load_for_inference, resolve_base, shown

    if not (args.model or args.adapter):
        if args.state:
            raise UsageError("--state needs a model to put the state on: pass MODEL (a .pth, a model folder or "
                             "assets:NAME)")
        resolve_base(None, None)  # raises the "no model given" error
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, device, state=args.state)
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    chat = Conversation(model, tok, args.user, args.assistant)
    if args.system:
        chat.feed(args.system.rstrip() + "\n\n")
    chat.mark_start()
    interactive = sys.stdin.isatty()
    if interactive:
        what = shown(resolve_base(args.model, args.adapter)[0])
        what += "".join(f" + {k} {shown(v)}" for k, v in (("adapter", args.adapter), ("state", args.state)) if v)
        print(f"chatting with {what}; /help lists the commands, /exit leaves", file=sys.stderr)
    while True:
        if interactive:
            print(f"{args.user}: ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print()
            break
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message.startswith("/") and not message.startswith("//"):
            command = message.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                print(COMMANDS_HELP + "\n")
            elif command == "/reset":
                chat.reset()
                print("(conversation reset to the starting state)\n")
            else:
                print(f"(unknown command {command}; /help lists the commands; start a line with // to send a "
                      f"message that begins with /)\n")
            continue
        if message.startswith("//"):
            message = message[1:]
        print(f"{args.assistant}:", end="", flush=True)
        try:
            for piece in chat.reply(message, args.max_new_tokens, args.temperature, args.top_p, gen):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            chat.close_turn()
            print(" [stopped]", end="")
        print("\n", flush=True)
    return 0
