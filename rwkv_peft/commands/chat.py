"""rwkv-peft chat [MODEL] [--adapter DIR | --state FILE]"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

from ._common import MODEL_OPTIONAL_HELP, StreamDecoder, UsageError, add_placement_arguments, shown

HELP = "chat in the terminal; the RNN state carries the conversation (a persona state or adapter sets who speaks)"

COMMANDS_HELP = """\
commands:
  /regen        answer the last message again, from the state before that answer
  /save FILE    save the conversation (the RNN state and the transcript) to FILE (.safetensors)
  /load FILE    continue a conversation saved with /save (made with a model of the same sizes)
  /reset        start the conversation again from the starting state (the persona state, after --system)
  /help         this list
  /exit, /quit  leave (so does Ctrl-D; Ctrl-C stops a reply that is being written)
A line that starts with // is sent as a message starting with /."""

EPILOG = """\
examples:
  rwkv-peft chat assets:quickstart/model --adapter outputs/quickstart/adapter
  rwkv-peft chat --adapter outputs/quickstart/adapter          (the base recorded in the adapter)
  rwkv-peft chat models/RWKV-x070-World-1.5B.pth --state persona_state.pth
  rwkv-peft chat models/RWKV-x070-World-1.5B.pth --temperature 1 --top-p 0.3 --presence-penalty 0.2 \\
      --frequency-penalty 0.2 --penalty-decay 0.996        (the official package's penalties)
  printf 'hi\\n/reset\\nhi\\n' | rwkv-peft chat --adapter outputs/quickstart/adapter --temperature 0

sampling (as the official rwkv package): the penalties on the raw logits, then top-p and top-k, then the
temperature; the penalties count the tokens of the reply being written, each count multiplied by
--penalty-decay at every token.

""" + COMMANDS_HELP

CONVERSATION_FORMAT = "rwkv-peft-conversation"
SAVE_SUFFIX = ".safetensors"


class ConversationFileError(UsageError):
    """A /save or /load that cannot be done: the file, and what is wrong with it."""


def add_arguments(p):
    import argparse

    from .generate import add_sampling_arguments
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("model", nargs="?", help=MODEL_OPTIONAL_HELP)
    p.add_argument("--adapter", help="an adapter folder written by training (LoRA and/or a persona state), or its "
                                     "Hub repository id")
    p.add_argument("--state", help="a state file in the runtime format (blocks.N.att.time_state) or .safetensors")
    p.add_argument("--tokenizer", help="'world' or a tokenizer folder (default: the adapter's, else the model "
                                       "folder's, else the World tokenizer)")
    p.add_argument("--user", default="User", help="the user's role name in the template")
    p.add_argument("--assistant", default="Assistant", help="the assistant's role name in the template")
    p.add_argument("--system", help="a system text before the conversation (a 'System:' turn, as training writes a "
                                    "persona)")
    from ..tokenization.chat_templates import CHAT_TEMPLATES
    p.add_argument("--template", default="rwkv", choices=sorted(CHAT_TEMPLATES),
                   help="the chat template (as data.template.name in training): rwkv (User: ... Assistant: ...) or "
                        "g1 (RWKV-7 G1 reasoning models: the reply starts with a think block)")
    p.add_argument("--no-think", dest="think", action="store_false",
                   help="g1: open an empty think block (the 'fake think' prompt), so the model answers at once")
    add_sampling_arguments(p, temperature=1.0, top_p=0.5, top_k=0, max_new_tokens=300)
    add_placement_arguments(p)


# ---- the template ---------------------------------------------------------------------------------------------
# Prompts are rendered by the same chat templates training uses (rwkv_peft/tokenization/chat_templates.py), so a
# fine-tuned model is asked exactly in the format it was trained on.

def render(messages, user: str = "User", assistant: str = "Assistant", template: str = "rwkv",
           add_generation_prompt: bool = False, think: bool = True) -> str:
    """``messages`` as the chat template writes them; ``add_generation_prompt`` ends with the assistant's name
    (g1: and the opening of its think block; ``think=False``: an empty one, the "fake think" prompt)."""
    from ..tokenization.chat_templates import render_segments
    pieces = render_segments(messages, template, add_generation_prompt=add_generation_prompt, user_name=user,
                             assistant_name=assistant, enable_thinking=think)
    return "".join(text for text, _ in pieces)


def user_turn(message: str, user: str = "User", assistant: str = "Assistant", template: str = "rwkv",
              think: bool = True) -> str:
    """What chat feeds for one user message: the user's turn, then the assistant's name (the reply follows)."""
    return render([{"role": "user", "content": message}], user, assistant, template, True, think)


def system_turn(text: str, template: str = "rwkv") -> str:
    """What chat feeds for a system text (``--system``): a ``System:`` turn, as training writes a persona."""
    return render([{"role": "system", "content": text}], template=template)


def render_messages(messages, user: str = "User", assistant: str = "Assistant", template: str = "rwkv",
                    think: bool = True) -> str:
    """A conversation ``[{"role", "content"}, ...]`` as chat feeds it, ending with the assistant's name for the
    answer to the last (user) message; roles may be written as in datasets (user/human, assistant/gpt/bot,
    system). ValueError names the message."""
    from ..data.formats import ROLE_ALIASES
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"should be a non-empty list of messages, found {type(messages).__name__}")
    last, normal = None, []
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {j} should be an object with 'role' and 'content', found {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            raise ValueError(f"message {j}: role {role!r} is not one of user/human, assistant/gpt/bot, system")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {j}: 'content' should be text, found {type(content).__name__}")
        last = ROLE_ALIASES[role.strip().lower()]
        normal.append({**m, "role": last})
    if last != "user":
        raise ValueError(f"the last message should be the user's (the completion answers it), found {last!r}")
    return render(normal, user, assistant, template, True, think)


# ---- a conversation -------------------------------------------------------------------------------------------

def model_signature(model) -> Dict:
    """The sizes a conversation state depends on (what /load checks)."""
    cfg = model.config
    sig = {"model_type": getattr(cfg, "model_type", None)}
    for key in ("num_hidden_layers", "hidden_size", "attention_hidden_size", "head_size", "vocab_size"):
        value = getattr(cfg, key, None)
        if value is not None:
            sig[key] = value
    return sig


def _describe(sig: Dict) -> str:
    names = {"num_hidden_layers": "layers", "hidden_size": "width", "attention_hidden_size": "attention width",
             "head_size": "head size", "vocab_size": "vocabulary"}
    return ", ".join([str(sig.get("model_type"))] + [f"{names[k]} {sig[k]}" for k in names if k in sig])


class Conversation:
    """Feeds each turn once: the state after a reply is where the next turn starts.

    ``mark_start()`` remembers the current state (after a system prompt, say) and ``reset()`` goes back to it;
    without a mark, ``reset()`` goes back to the model's own initial state (its persona state, if any).
    ``regen()`` answers the last message again from the state before its answer; ``save()`` / ``load()`` write and
    read the whole conversation (states and transcript). ``transcript`` lists ``{"role", "content"}``.
    """

    def __init__(self, model, tok, user="User", assistant="Assistant", state=None, template="rwkv", think=True):
        self.model, self.tok, self.user, self.assistant = model, tok, user, assistant
        self.template, self.think = template, think
        self.state = state
        self._start = copy.deepcopy(state)
        self.transcript: List[Dict[str, str]] = []
        self._start_transcript: List[Dict[str, str]] = []
        self._before = None  # (the state before the last user turn, that message)
        self._uncounted = None
        stop = {0}  # RWKV's end of text
        if getattr(tok, "eos_token_id", None) is not None:
            stop.add(int(tok.eos_token_id))
        self.stop_ids = stop

    def system(self, text: str) -> None:
        """Feed a system text (as ``--system``) and make the state after it the starting state."""
        self.feed(system_turn(text, self.template))
        self.transcript.append({"role": "system", "content": text.rstrip()})
        self.mark_start()

    def mark_start(self) -> None:
        self._start = copy.deepcopy(self.state)
        self._start_transcript = copy.deepcopy(self.transcript)

    def reset(self) -> None:
        self.state = copy.deepcopy(self._start)
        self.transcript = copy.deepcopy(self._start_transcript)
        self._before = None

    def feed(self, text: str):
        import torch
        ids = torch.tensor([self.tok(text).input_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model(ids, state=self.state, use_cache=True, logits_to_keep=1)
        self.state = out.state
        return out.logits[0, -1]

    def _processors(self, temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay):
        from ..sampling import logits_processors, uncounted_token_ids
        if frequency_penalty and self._uncounted is None:
            self._uncounted = uncounted_token_ids(self.tok)
        return logits_processors(temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay,
                                 prompt_length=0, uncounted_ids=self._uncounted or ())

    def reply(self, message: str, max_new_tokens=300, temperature=1.0, top_p=0.5, generator=None, top_k=0,
              presence_penalty=0.0, frequency_penalty=0.0, penalty_decay=0.996):
        """Yield the reply's text as it is generated; stops at a blank line (the turn separator) or end of text.

        Sampling follows :mod:`rwkv_peft.sampling` (penalties over the reply's own tokens). Trailing newlines are
        held back until it is clear they do not start the blank line. If the caller stops early (Ctrl-C),
        ``close_turn()`` still closes the turn in the state.
        """
        import torch

        from ..sampling import next_token
        procs = self._processors(temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay)
        self._before = (copy.deepcopy(self.state), message)
        self.transcript.append({"role": "user", "content": message})
        self.transcript.append({"role": "assistant", "content": ""})
        self._reply_text = ""
        logits = self.feed(user_turn(message, self.user, self.assistant, self.template, self.think))
        stream = StreamDecoder(self.tok, skip_special_tokens=True)
        text, sent, ended, generated = "", 0, False, []
        for _ in range(max_new_tokens):
            t = next_token(procs, generated, logits, temperature, generator)
            if t in self.stop_ids:
                break
            generated.append(t)
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

    def regen(self, max_new_tokens=300, temperature=1.0, top_p=0.5, generator=None, **sampling):
        """Answer the last message again, from the state before its answer (the old answer is dropped)."""
        if self._before is None:
            raise UsageError("nothing to regenerate: no answer yet since the start (or the last /reset)")
        self.close_turn()
        state, message = self._before
        self.state = copy.deepcopy(state)
        if len(self.transcript) >= 2 and self.transcript[-2:][0] == {"role": "user", "content": message}:
            del self.transcript[-2:]
        return self.reply(message, max_new_tokens, temperature, top_p, generator, **sampling)

    def close_turn(self) -> None:
        """Feed the template's separator unless the reply ended with it: the turn closes in the state as in the
        training data."""
        text = getattr(self, "_reply_text", None)
        if text is None:
            return
        self._reply_text = None
        cut = text.find("\n\n")
        if self.transcript and self.transcript[-1]["role"] == "assistant":
            self.transcript[-1]["content"] = (text[:cut] if cut >= 0 else text).strip()
        if "\n\n" not in text:
            self.feed("\n" if text.endswith("\n") else "\n\n")

    # ---- /save and /load ----

    def save(self, path) -> Path:
        """Write the conversation to ``path`` (a .safetensors file; the suffix is added to a name without one),
        atomically: the current, starting and before-the-last-answer states, the transcript and the model's
        sizes. Returns the path written."""
        from safetensors.torch import save_file

        from ..convert import atomic_path
        self.close_turn()
        path = Path(os.path.expanduser(os.fspath(path)))
        if not path.suffix:
            path = path.with_suffix(SAVE_SUFFIX)
        if path.is_dir():
            raise ConversationFileError(f"{shown(path)} is a folder; /save writes a file (e.g. chat.safetensors)")
        tensors = {}
        slots = {}
        saved = [("state", self.state), ("start", self._start)]
        if self._before is not None:
            saved.append(("before", self._before[0]))
        for slot, state in saved:
            if state is None:  # the model's own initial state (nothing read yet)
                slots[slot] = None
                continue
            slots[slot] = [len(layer) for layer in state]
            for i, layer in enumerate(state):
                for j, t in enumerate(layer):
                    tensors[f"{slot}.{i}.{j}"] = t.detach().to("cpu").contiguous()
        meta = {"format": CONVERSATION_FORMAT, "format_version": "1",
                "model": json.dumps(model_signature(self.model)), "slots": json.dumps(slots),
                "transcript": json.dumps(self.transcript, ensure_ascii=False),
                "start_transcript": json.dumps(self._start_transcript, ensure_ascii=False),
                "last_message": json.dumps(None if self._before is None else self._before[1], ensure_ascii=False),
                "user": self.user, "assistant": self.assistant}
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        except OSError as e:
            raise ConversationFileError(f"cannot write {shown(path)}: {e.strerror or e}") from None
        return path

    def load(self, path) -> Path:
        """Continue the conversation saved in ``path``; :class:`ConversationFileError` if it is not one, or was
        made with a model of other sizes. Nothing changes on an error."""
        from safetensors import safe_open
        path = Path(os.path.expanduser(os.fspath(path)))
        if not path.exists() and not path.suffix and path.with_suffix(SAVE_SUFFIX).is_file():
            path = path.with_suffix(SAVE_SUFFIX)
        if not path.is_file():
            raise ConversationFileError(f"{shown(path)}: no such file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - not a safetensors file
            raise ConversationFileError(f"{shown(path)}: not a conversation saved by /save (cannot read it as "
                                        f"safetensors: {e})") from None
        if meta.get("format") != CONVERSATION_FORMAT:
            raise ConversationFileError(f"{shown(path)}: not a conversation saved by /save (no "
                                        f"'{CONVERSATION_FORMAT}' mark in its metadata)")
        try:
            saved = json.loads(meta["model"])
            slots = json.loads(meta["slots"])
            transcript = json.loads(meta["transcript"])
            start_transcript = json.loads(meta["start_transcript"])
            last_message = json.loads(meta["last_message"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ConversationFileError(f"{shown(path)}: the conversation's metadata is damaged ({e})") from None
        mine = model_signature(self.model)
        if saved != mine:
            diff = ", ".join(f"{k} {saved.get(k)} (this model: {mine.get(k)})"
                             for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
            raise ConversationFileError(
                f"{shown(path)} was saved with another model's sizes: {diff}. Its state fits a model with "
                f"{_describe(saved)}; this one has {_describe(mine)}. Load it with the model it was made with.")
        device = self.model.device
        states = {}
        try:
            for slot, sizes in slots.items():
                states[slot] = None if sizes is None else [
                    tuple(tensors[f"{slot}.{i}.{j}"].to(device) for j in range(n)) for i, n in enumerate(sizes)]
        except KeyError as e:
            raise ConversationFileError(f"{shown(path)}: the tensor {e} is missing") from None
        if states.get("state") is not None:
            self._check_shapes(path, states["state"])
        self.close_turn()
        self.state = states.get("state")
        self._start = states.get("start")
        self._before = (states["before"], last_message) if "before" in states and last_message is not None \
            else None
        self.transcript, self._start_transcript = transcript, start_transcript
        return path

    def _check_shapes(self, path, state) -> None:
        """The saved state against one the model makes now (the sizes can agree while the layout does not)."""
        import torch
        with torch.no_grad():
            probe = self.model(torch.tensor([[0]], device=self.model.device), use_cache=True, logits_to_keep=1).state
        want = [[tuple(t.shape) for t in layer] for layer in probe]
        have = [[tuple(t.shape) for t in layer] for layer in state]
        if want != have:
            raise ConversationFileError(f"{shown(path)}: the saved state's shapes {have[0]} (first layer, "
                                        f"{len(have)} layers) do not fit this model's {want[0]} ({len(want)} layers)")


# ---- the command ----------------------------------------------------------------------------------------------

def _sampling(args) -> Dict:
    return dict(top_k=args.top_k, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                penalty_decay=args.penalty_decay)


def _print_reply(pieces, chat, assistant) -> None:
    print(f"{assistant}:", end="", flush=True)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        chat.close_turn()
        print(" [stopped]", end="")
    print("\n", flush=True)


def run(args) -> int:
    import torch

    from ._common import load_for_inference, resolve_base
    from .generate import settings_of

    if not (args.model or args.adapter):
        if args.state:
            raise UsageError("--state needs a model to put the state on: pass MODEL (a .pth, a model folder or "
                             "assets:NAME)")
        resolve_base(None, None)  # raises the "no model given" error
    settings_of(args)  # the sampling options' ranges, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_for_inference(args.model, args.adapter, args.tokenizer, args.dtype, device, state=args.state,
                                    cpu_weights=args.cpu_weights)
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    chat = Conversation(model, tok, args.user, args.assistant, template=args.template, think=args.think)
    if args.system:
        chat.system(args.system)
    chat.mark_start()
    sample = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  generator=gen, **_sampling(args))
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
            command, _, rest = message.partition(" ")
            command, rest = command.lower(), rest.strip()
            if command in ("/exit", "/quit"):
                break
            try:
                if command == "/help":
                    print(COMMANDS_HELP + "\n")
                elif command == "/reset":
                    chat.reset()
                    print("(conversation reset to the starting state)\n")
                elif command == "/regen":
                    pieces = chat.regen(**sample)
                    _print_reply(pieces, chat, args.assistant)
                elif command in ("/save", "/load"):
                    if not rest:
                        print(f"(usage: {command} FILE, e.g. {command} chat{SAVE_SUFFIX})\n")
                    elif command == "/save":
                        print(f"(conversation saved to {shown(chat.save(rest))})\n")
                    else:
                        where = chat.load(rest)
                        turns = sum(1 for m in chat.transcript if m["role"] == "assistant")
                        print(f"(conversation loaded from {shown(where)}: {turns} answer{'' if turns == 1 else 's'} "
                              f"so far)\n")
                else:
                    print(f"(unknown command {command}; /help lists the commands; start a line with // to send a "
                          f"message that begins with /)\n")
            except UsageError as e:  # a bad /save, /load or /regen: the conversation goes on
                print(f"error: {e}\n", file=sys.stderr, flush=True)
            continue
        if message.startswith("//"):
            message = message[1:]
        _print_reply(chat.reply(message, **sample), chat, args.assistant)
    return 0
